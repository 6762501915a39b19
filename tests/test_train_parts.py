"""Trainer components: the fp16 loss scaler (one decision for all ranks), precision choice,
throughput accounting, the training-step benchmark."""

from __future__ import annotations

import math
import time

import torch
from _dist_util import run_distributed

from facecompat.train.bench import StepBenchSpec, bench_train_step
from facecompat.train.log import Throughput, format_eta
from facecompat.train.precision import LossScaler, autocast_dtype, resolve_precision


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


def _skip_decision(rank: int, world: int) -> bool:
    # Only rank 1's (head-shard) gradient overflowed; every rank must skip the step.
    scaler = LossScaler(enabled=True, init_scale=2.0)
    return scaler.unscale_(_params([1.0, float("inf") if rank == 1 else 1.0]))


def test_every_rank_skips_when_one_rank_overflows():
    assert run_distributed(_skip_decision, 2) == [True, True]


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
