"""facecompat.dist: single-process defaults and the collectives under a 3-process gloo group."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist

from facecompat import dist
from tests.helpers.dist import DistributedTestError, run_distributed

WORLD = 3


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s [2, 3] input and a [WORLD * 2, 3] weight for its loss (sum(w * gathered))."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2 * WORLD, 3, generator=g,
                                                                            dtype=torch.float64)


def _gather_grad(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = _rank_data(rank)
    x.requires_grad_(True)
    gathered = dist.all_gather_with_grad(x)
    (gathered * w).sum().backward()
    return gathered.detach(), x.grad


def _collectives(rank: int, world: int) -> dict:
    out: dict = {}
    out["gathered"], out["grad"] = _gather_grad(rank)
    # The all_reduce + slice fallback for backends without reduce-scatter gives the same gradient.
    dist._NO_REDUCE_SCATTER.add("gloo")
    try:
        out["gathered_fb"], out["grad_fb"] = _gather_grad(rank)
    finally:
        dist._NO_REDUCE_SCATTER.discard("gloo")

    out["labels"] = dist.all_gather_tensor(torch.tensor([rank, 10 * rank], dtype=torch.int64))
    for op in ("sum", "max", "min"):
        t = torch.tensor([float(rank), -float(rank)])
        assert dist.all_reduce_(t, op) is t  # in place
        out[op] = t
    out["flag_any"] = dist.all_reduce_flag(rank == 1)
    out["flag_none"] = dist.all_reduce_flag(False)
    # The DDP hook on a stand-in bucket (building a real DDP model imports torch._dynamo, ~3 s/process).
    bucket = SimpleNamespace(buffer=lambda: torch.tensor([1.0, float(rank)]))
    out["hook"] = dist.sum_allreduce_hook(None, bucket).wait()

    return out


def test_collectives_gloo() -> None:
    results = run_distributed(_collectives, WORLD)
    xs = [_rank_data(r)[0] for r in range(WORLD)]
    ws = [_rank_data(r)[1] for r in range(WORLD)]
    full = torch.cat(xs)
    w_sum = sum(ws)
    for r, res in enumerate(results):
        for suffix in ("", "_fb"):
            torch.testing.assert_close(res["gathered" + suffix], full, rtol=0, atol=0)
            # d/dx_r sum_r' sum(w_r' * gathered) = sum_r' w_r'[rows of r]: no world-size factor.
            torch.testing.assert_close(res["grad" + suffix], w_sum[2 * r : 2 * r + 2], rtol=1e-12, atol=1e-12)
        assert res["labels"].tolist() == [0, 0, 1, 10, 2, 20]
        assert res["sum"].tolist() == [3.0, -3.0]
        assert res["max"].tolist() == [2.0, 0.0]
        assert res["min"].tolist() == [0.0, -2.0]
        assert res["flag_any"] is True and res["flag_none"] is False
        assert res["hook"].tolist() == [3.0, 3.0]  # summed, not averaged


def test_single_process_defaults() -> None:
    assert not dist.is_initialized()
    x = torch.randn(2, 3, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x
    assert dist.all_gather_tensor(x) is x
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_(t, "max") is t and t.tolist() == [1.0, 2.0]
    assert dist.all_reduce_flag(True) is True and dist.all_reduce_flag(False) is False
    with pytest.raises(ValueError, match="unknown reduce op 'mean'"):
        dist.all_reduce_(t, "mean")


def test_sum_hook_signature_is_accepted_by_ddp() -> None:
    """DDP.register_comm_hook rejects hooks whose annotations are not these objects (it compares them
    as objects, so postponed string annotations fail); same check as DDP's _check_comm_hook."""
    sig = inspect.signature(dist.sum_allreduce_hook)
    assert sig.parameters["bucket"].annotation is tdist.GradBucket
    assert sig.return_annotation == torch.futures.Future[torch.Tensor]
    assert list(sig.parameters) == ["process_group", "bucket"]


def test_run_distributed_reports_failing_rank() -> None:
    with pytest.raises(DistributedTestError, match="(?s)rank1.*boom on rank 1"):
        run_distributed(_fail_on_rank_1, 2)


def _fail_on_rank_1(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")


# ----------------------------------------------------------------------------- devices


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int, local_rank: int | None = None) -> None:
    """Pretend this process sees ``count`` GPUs (torch.device objects need no real GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))


@pytest.mark.parametrize(("count", "local_rank", "index"), [(8, 5, 5), (1, 3, 0), (2, 3, 1), (4, None, 0)])
def test_cuda_without_an_index_is_this_process_gpu_local_rank_modulo_visible(monkeypatch, count, local_rank,
                                                                             index):
    _gpus(monkeypatch, count, local_rank)
    assert dist.resolve_device("cuda") == torch.device("cuda", index)
    assert dist.resolve_device(None) == torch.device("cuda", index)
    assert dist.local_gpu_index() == index


def test_device_names_resolve_or_fail_in_one_line(monkeypatch):
    _gpus(monkeypatch, 2)
    assert dist.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dist.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(dist.DeviceError, match=r"^cuda:2: this process sees 2 GPU\(s\)$"):
        dist.resolve_device("cuda:2")
    with pytest.raises(dist.DeviceError, match="^not a device: 'gpu0'"):
        dist.resolve_device("gpu0")
    with pytest.raises(dist.DeviceError, match="unsupported device type"):
        dist.resolve_device("mps")
    _gpus(monkeypatch, 0)
    assert dist.resolve_device(None) == torch.device("cpu")
    with pytest.raises(dist.DeviceError, match="^cuda: CUDA is not available here$"):
        dist.resolve_device("cuda")
    with pytest.raises(dist.DeviceError, match="CUDA is not available"):
        dist.local_gpu_index()


def test_the_tools_device_flag_names_itself(monkeypatch):
    from facecompat.cli import resolve_device

    _gpus(monkeypatch, 0)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device: cuda:0: CUDA is not available here$"):
        resolve_device("cuda:0")


def test_data_parallel_passes_what_the_installed_ddp_accepts(monkeypatch):
    """forward_sync_buffers (torch >= 2.13) or broadcast_buffers (older), never both."""
    seen = {}

    class Recorder:
        def __init__(self, module, device_ids=None, broadcast_buffers=True, gradient_as_bucket_view=False):
            seen.update(device_ids=device_ids, broadcast_buffers=broadcast_buffers,
                        gradient_as_bucket_view=gradient_as_bucket_view)

    monkeypatch.setattr(dist, "DistributedDataParallel", Recorder)
    dist.data_parallel(torch.nn.Linear(2, 2), torch.device("cpu"))
    assert seen == {"device_ids": None, "broadcast_buffers": False, "gradient_as_bucket_view": True}

    class Recorder213(Recorder):
        def __init__(self, module, device_ids=None, broadcast_buffers=None, gradient_as_bucket_view=False,
                     forward_sync_buffers=None):
            assert broadcast_buffers is None
            seen.update(device_ids=device_ids, forward_sync_buffers=forward_sync_buffers)

    monkeypatch.setattr(dist, "DistributedDataParallel", Recorder213)
    dist.data_parallel(torch.nn.Linear(2, 2), torch.device("cuda", 3))
    assert seen["device_ids"] == [3] and seen["forward_sync_buffers"] is False


def test_backend_override_lets_ranks_share_a_gpu_over_gloo(monkeypatch):
    monkeypatch.setenv(dist.BACKEND_ENV, "GLOO")
    assert dist.default_backend() == "gloo"
    monkeypatch.setenv(dist.BACKEND_ENV, "mpi")
    with pytest.raises(dist.DeviceError, match="^FACECOMPAT_DIST_BACKEND='mpi': expected nccl or gloo$"):
        dist.default_backend()
    monkeypatch.delenv(dist.BACKEND_ENV)
    _gpus(monkeypatch, 0)
    assert dist.default_backend() == "gloo"
