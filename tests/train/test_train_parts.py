"""Trainer components: the fp16 loss scaler (one decision for all ranks), precision choice,
throughput accounting, the training-step benchmark."""

from __future__ import annotations

import math
import time

import torch

from facecompat.train.bench import StepBenchSpec, bench_train_step
from facecompat.train.log import Throughput, format_eta
from facecompat.train.precision import LossScaler, autocast_dtype, resolve_precision
from tests.helpers.dist import run_distributed


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
