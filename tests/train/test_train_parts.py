"""Trainer components: the fp16 loss scaler (one decision for all ranks), precision choice,
throughput accounting, the training-step benchmark."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from facecompat.train.bench import StepBenchSpec, bench_train_step
from facecompat.train.log import Throughput, format_eta
from facecompat.train.precision import LossScaler, autocast_dtype, resolve_precision
from tests.helpers.dist import run_distributed
from tests.helpers.tools import load_tool, run_tool


def _params(*grads: list[float]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


def test_loss_scaler_unscales_skips_and_backs_off():
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=2)
    assert float(scaler.scale(torch.tensor(1.5))) == 12.0
    params = _params([8.0, 16.0])
    assert scaler.unscale_(params) is False
    assert params[0].grad.tolist() == [1.0, 2.0]
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale_value == 16.0  # grew after growth_interval good steps
    assert scaler.unscale_(_params([1.0, float("inf")])) is True
    scaler.update(True)
    assert scaler.scale_value == 8.0 and scaler.consecutive_skips == 1
    state = scaler.state_dict()
    other = LossScaler(enabled=True)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_disabled_scaler_is_transparent():
    scaler = LossScaler(enabled=False)
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss
    assert scaler.unscale_(_params([float("nan")])) is False


def _skip_decision(rank: int, world: int) -> tuple[bool, int]:
    # Only rank 1's (head-shard) gradient overflowed; every rank must skip the step, and decide it
    # with one read of a device value (on a GPU, one host synchronisation).
    scaler = LossScaler(enabled=True, init_scale=2.0)
    reads = []
    item = torch.Tensor.item

    def counted(t):
        reads.append(t.shape)
        return item(t)

    torch.Tensor.item = counted
    try:
        skipped = scaler.unscale_(_params([1.0, float("inf") if rank == 1 else 1.0]))
    finally:
        torch.Tensor.item = item
    return skipped, len(reads)


def test_every_rank_skips_when_one_rank_overflows_after_one_host_read():
    assert run_distributed(_skip_decision, 2) == [(True, 1), (True, 1)]


def test_loss_scale_grows_after_100_good_steps_as_insightface():
    scaler = LossScaler(enabled=True, init_scale=4.0)
    for _ in range(99):
        scaler.update(False)
    assert scaler.scale_value == 4.0
    scaler.update(False)
    assert scaler.scale_value == 8.0


def test_precision_resolution():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert autocast_dtype("fp16") is torch.float16 and autocast_dtype("fp32") is None


def test_throughput_excludes_pauses():
    meter = Throughput()
    meter.add(100)
    meter.pause()
    time.sleep(0.2)
    meter.resume()
    assert meter.rate() > 100 / 0.2
    assert format_eta(3725) == "1h02m" and format_eta(59) == "0m59s" and format_eta(float("nan")) == "?"


def test_step_benchmark_runs_and_reports():
    spec = StepBenchSpec(network="r18-w0.125", embedding_size=32, batch_size=8, num_classes=50,
                         sample_rate=0.5, steps=2, warmup=1)
    result = bench_train_step(spec, "cpu")
    assert result["samples_per_s"] > 0 and result["precision"] == "fp32"
    assert result["world_size"] == 1 and result["ms_per_step"] > 0
    assert math.isfinite(result["loss"])


def test_a_skipped_fp16_step_leaves_batchnorm_statistics_as_they_were():
    """A NaN image makes the step's gradients non-finite, so the scaler skips it; its forward had
    already folded NaN into the BN running statistics, which the step restores."""
    from facecompat.config import OptimConfig
    from facecompat.heads import PartialFC
    from facecompat.train.objective import ArcFaceObjective
    from facecompat.train.step import TrainStep, build_optimizer

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 6 * 6, 8), torch.nn.BatchNorm1d(8))
    head = PartialFC(8, 10, scale=16.0)
    objective = ArcFaceObjective(head)
    opt = build_optimizer(backbone, objective, OptimConfig(lr=0.1), torch.device("cpu"))
    scaler = LossScaler(enabled=True, init_scale=8.0)
    step = TrainStep(backbone, backbone, objective, opt, scaler, amp_dtype=None, channels_last=False,
                     grad_clip=5.0, world_size=1)
    images, labels = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    assert step([(images, labels)])[1] is False
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    assert step([(poisoned, labels)])[1] is True and scaler.scale_value == 4.0
    after = backbone.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # weights, running stats, counters
    assert step([(images, labels)])[1] is False
    assert all(torch.isfinite(v).all() for v in backbone.state_dict().values())


def _tiny_step(world: int, seed: int = 0):
    """A BN-free backbone + head + SGD, identical on every rank, wrapped in DDP when distributed."""
    from torch.nn.parallel import DistributedDataParallel

    from facecompat.config import OptimConfig
    from facecompat.heads import PartialFC
    from facecompat.train.objective import ArcFaceObjective
    from facecompat.train.step import TrainStep, build_optimizer

    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    head = PartialFC(8, 10, scale=16.0)
    model = DistributedDataParallel(backbone) if world > 1 else backbone
    objective = ArcFaceObjective(head)
    opt = build_optimizer(backbone, objective, OptimConfig(lr=0.5, weight_decay=0.0), torch.device("cpu"))
    step = TrainStep(model, backbone, objective, opt, LossScaler(enabled=False), amp_dtype=None,
                     channels_last=False, grad_clip=None, world_size=world)
    return backbone, head, step


def _data():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, 2, 2, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _accumulated_two_rank_step(rank: int, world: int) -> tuple[dict, torch.Tensor]:
    backbone, head, step = _tiny_step(world)
    images, labels = _data()
    # Global batch 8 = 2 micro-batches x 2 ranks x 2 images; this rank's images of each micro-batch.
    micro = []
    for m in range(2):
        rows = slice(4 * m + 2 * rank, 4 * m + 2 * rank + 2)
        micro.append((images[rows], labels[rows]))
    step(micro)
    return {k: v.clone() for k, v in backbone.state_dict().items()}, head.weight.detach().clone()


def test_accumulation_and_ranks_equal_one_big_step():
    """2 ranks x 2 accumulated micro-batches update the weights as one process does with the
    same images as 2 micro-batches of 4: DDP averaging, the W-scaled head input, no_sync and the
    1/accum loss scale together give the exact gradient."""
    backbone, head, step = _tiny_step(1)
    images, labels = _data()
    step([(images[:4], labels[:4]), (images[4:], labels[4:])])
    results = run_distributed(_accumulated_two_rank_step, 2)
    for state, _ in results:
        for key, value in backbone.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), head.weight.detach(),
                               rtol=1e-5, atol=1e-6)


def test_bench_train_tool_rejects_an_unknown_network(capsys):
    tool = load_tool("bench_train")
    argv = ["--network", "r18-w0.125", "--embedding-size", "16", "--batch-size", "4", "--num-classes", "10",
            "--steps", "1", "--warmup", "0", "--device", "cpu"]
    assert tool.main([*argv, "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["network"] == "r18-w0.125" and result["batch_size"] == 4 and result["samples_per_s"] > 0
    for bad, needle in ((["--network", "r19"], "--network: unknown backbone 'r19'"),
                        (["--warmup", "-1"], "--warmup: must be >= 0"),
                        (["--sample-rate", "0"], "--sample-rate: must be in (0, 1]"),
                        (["--json", "/"], "--json: / is a directory")):
        with pytest.raises(SystemExit) as exc:
            tool.main([*argv, *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("bench_train.py: error: "), err
        assert needle in err[0], err
    with pytest.raises(SystemExit) as exc:
        tool.main(["--device", "gpu0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--device: not a device: 'gpu0'" in err[0]


def test_head_memory_bench_measures_the_formula_peak():
    """tools/bench_head_memory.py in its own process (the peak is the process's): one rank of 2M
    classes over 8 ranks at ρ 0.1 peaks where head_memory_bytes says (1.48 GiB), within 5%."""
    import json

    out = run_tool("bench_head_memory", "--json", timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["num_local"] == 250_000 and result["formula_gib"] > 1.4
    assert abs(result["measured_gib"] / result["formula_gib"] - 1.0) < 0.05, result
    bad = run_tool("bench_head_memory", "--sample-rate", "2")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "2" in bad.stderr


# ----------------------------------------------------------------------------- random streams at a resume


def test_a_generator_restores_its_own_device_types_state_and_reseeds_from_another(caplog):
    from facecompat import rng

    source = torch.Generator().manual_seed(5)
    torch.rand(3, generator=source)
    target = torch.Generator()
    assert rng.restore_generator(target, source.get_state(), seed=5, what="sampler")
    assert torch.equal(torch.rand(4, generator=target), torch.rand(4, generator=source))
    philox = torch.from_numpy(np.array([5, 128], dtype=np.uint64).view(np.uint8).copy())  # a CUDA state
    with caplog.at_level("WARNING", logger="facecompat.train"):
        assert not rng.restore_generator(target, philox, seed=5, step=30, what="the sampler")
    assert "the sampler: the checkpoint's random stream was saved on another device type" in caplog.text
    expected = torch.Generator().manual_seed(rng.resume_seed(5, 30))
    assert torch.equal(torch.rand(4, generator=target), torch.rand(4, generator=expected))
    assert rng.resume_seed(5, 30) not in (5, rng.resume_seed(5, 31), rng.resume_seed(6, 30))


@pytest.mark.gpu
def test_a_cpu_checkpoint_stream_reseeds_a_cuda_generator():
    from facecompat import rng

    cuda = torch.Generator(device="cuda")
    cpu_state = torch.Generator().manual_seed(1).get_state()
    assert not rng.restore_generator(cuda, cpu_state, seed=1, what="sampler")
    expected = torch.Generator(device="cuda").manual_seed(rng.resume_seed(1))
    assert torch.equal(torch.rand(4, device="cuda", generator=cuda),
                       torch.rand(4, device="cuda", generator=expected))
    assert rng.restore_generator(cuda, expected.get_state(), seed=1, what="sampler")  # same type: exact
