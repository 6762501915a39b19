"""Steps 4-7 of the GPU check, the train step: first-step loss per precision, no host sync in a bf16
step (plain and MixBCT), the fp16 NaN batch, Partial FC on the GPU against the CPU."""

from __future__ import annotations

import math
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facecompat import dist
from facecompat.compat.base import CompatContext
from facecompat.compat.registry import get_method
from facecompat.config import HeadConfig, OptimConfig
from facecompat.gpu_check.context import (
    CheckContext,
    CheckFailed,
    Sizes,
    StepSkipped,
    _backend_flags,
    _one_line,
    _random_batch,
)
from facecompat.heads import PartialFC, build_head
from facecompat.models import get_model
from facecompat.train.bench import StepBenchSpec, bench_train_step
from facecompat.train.bench_compat import make_bench_bank
from facecompat.train.objective import ArcFaceObjective
from facecompat.train.precision import LossScaler, autocast_dtype
from facecompat.train.step import TrainStep, build_optimizer

PRECISION_TOLERANCE = 0.02  # first-step loss of bf16/fp16 against fp32, relative


@dataclass
class _Built:
    step: TrainStep
    backbone: nn.Module
    head: PartialFC
    scaler: LossScaler
    method: nn.Module | None = None


def _build_train_step(ctx: CheckContext, *, network: str, num_classes: int, precision: str,
                      view: Any = None, bank: Any = None) -> _Built:
    """Backbone, Partial FC head, optimiser and :class:`TrainStep` as the trainer builds them for one
    rank (no DDP at world size 1; the head checks labels per step on the CPU only), with MixBCT between
    backbone and head when ``bank`` is given (``view``: its records, as train/bench_compat.py builds it)."""
    torch.manual_seed(0)
    size = ctx.sizes.embedding_size
    backbone = get_model(network, size).to(ctx.device)
    head = build_head(HeadConfig(), num_classes=num_classes, embedding_size=size, seed=0,
                      check_labels=ctx.device.type == "cpu").to(ctx.device)
    method = None
    if bank is not None:
        method_ctx = CompatContext(params={}, weight=1.0, view=view, head=head, embedding_size=size,
                                   device=ctx.device, seed=0, bank=bank)
        method = get_method("mixbct")(method_ctx).to(ctx.device)
    optim = OptimConfig()
    objective = ArcFaceObjective(head, method)
    optimizer = build_optimizer(backbone, objective, optim, ctx.device)
    scaler = LossScaler(enabled=precision == "fp16")
    step = TrainStep(backbone, backbone, objective, optimizer, scaler, amp_dtype=autocast_dtype(precision),
                     channels_last=False, grad_clip=optim.grad_clip, world_size=dist.get_world_size())
    return _Built(step, backbone, head, scaler, method)


PRECISIONS = (("fp32", False), ("bf16", False), ("bf16", True), ("fp16", False))


def step_precisions(ctx: CheckContext) -> dict:
    """First-step loss of the same backbone, head and batch in each precision
    (:func:`facecompat.train.bench.bench_train_step` with one step, no warm-up; TF32 off)."""
    s = ctx.sizes
    rows: dict[str, dict] = {}
    with _backend_flags(benchmark=False, tf32=False):
        for precision, channels_last in PRECISIONS:
            spec = StepBenchSpec(network=s.network, embedding_size=s.embedding_size, batch_size=s.batch_size,
                                 num_classes=s.num_classes, precision=precision, channels_last=channels_last,
                                 steps=1, warmup=0)
            r = bench_train_step(spec, ctx.device)
            label = precision + ("+channels_last" if channels_last else "")
            rows[label] = {"loss": r["loss"], "channels_last": r["channels_last"],
                           "peak_memory_gib": r["peak_memory_gib"]}
    reference = rows["fp32"]["loss"]
    for row in rows.values():
        row["rel_diff"] = abs(row["loss"] - reference) / abs(reference)
    bad = [k for k, r in rows.items()
           if not math.isfinite(r["loss"]) or not r["rel_diff"] <= PRECISION_TOLERANCE]
    result = {"network": s.network, "num_classes": s.num_classes, "batch_size": s.batch_size,
              "tolerance": PRECISION_TOLERANCE, "losses": rows}
    result["summary"] = "; ".join(f"{k} {r['loss']:.4f} ({100 * r['rel_diff']:.2f}%)"
                                  for k, r in rows.items())
    if bad:
        raise CheckFailed(f"first-step loss off fp32's by more than {100 * PRECISION_TOLERANCE:g}%: "
                          + ", ".join(f"{k} {rows[k]['loss']:.4f}" for k in bad), result)
    return result


def step_no_host_sync(ctx: CheckContext) -> dict:
    """A warmed-up bf16 step under ``torch.cuda.set_sync_debug_mode("error")``, plain (r50, the full
    head) and with MixBCT over a generated old-feature bank; any synchronising call is a finding."""
    if not ctx.cuda:
        raise StepSkipped("CUDA only")
    s = ctx.sizes
    built = _build_train_step(ctx, network=s.network, num_classes=s.num_classes, precision="bf16")
    images, labels = _random_batch(s.small_batch, s.num_classes, ctx.device)
    found = {"plain": _sync_free(ctx, built.step, [(images, labels)])}
    del built
    with tempfile.TemporaryDirectory(dir=ctx.out, prefix="bank-") as tmp:
        view, bank = make_bench_bank(Path(tmp) / "bank", num_records=2 * s.small_classes,
                                     num_classes=s.small_classes, embedding_size=s.embedding_size)
        bank.class_stats()
        built = _build_train_step(ctx, network=s.network, num_classes=view.num_classes, precision="bf16",
                                  view=view, bank=bank)
        micro = _mixbct_batch(ctx, built, view, s.small_batch, images)
        found["mixbct"] = _sync_free(ctx, built.step, [micro])
        del built, bank
    bad = {k: v for k, v in found.items() if v["host_sync"]}
    result = {"network": s.network, "batch_size": s.small_batch, "warmup_steps": 2, "steps": found,
              "scope": "TrainStep.__call__ (inputs already on the GPU; head built with check_labels=False "
                       "as the trainer does on GPU; rho 1.0)"}
    result["summary"] = "no host sync in plain and MixBCT bf16 steps" if not bad else "; ".join(
        f"{k}: {v['error']} at {v['where']}" for k, v in bad.items())
    if bad:
        raise CheckFailed("host sync in a bf16 step: " + result["summary"], result)
    return result


def _mixbct_batch(ctx: CheckContext, built: _Built, view: Any, num: int, images: torch.Tensor) -> tuple:
    """(images, labels, inputs) of ``num`` bank records, the method's inputs already on the device."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(view.num_images, size=num, replace=False))
    labels = view.labels[rows]
    inputs = built.method.batch_inputs(view.record_ids[rows], rng.random(num) < 0.5, labels)
    return images, torch.from_numpy(labels).to(ctx.device), {k: v.to(ctx.device) for k, v in inputs.items()}


def _sync_free(ctx: CheckContext, step: TrainStep, micro: list, warmup: int = 2) -> dict:
    """Run ``warmup`` steps, then one under sync debug mode "error": whether it synchronised, where."""
    for _ in range(warmup):
        step(micro)
    torch.cuda.synchronize(ctx.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(micro)
    except Exception as exc:  # the synchronising call's error is the finding
        return {"host_sync": True, "error": _one_line(exc), "where": _innermost_project_frame(exc, ctx.repo)}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(ctx.device)
    return {"host_sync": False}


def _innermost_project_frame(exc: BaseException, repo: Path) -> str:
    """``file:line in function`` of the deepest traceback frame inside the repo."""
    where = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        if path.is_relative_to(repo):
            where = f"{path.relative_to(repo)}:{frame.lineno} in {frame.name}"
    return where


def step_fp16_nan_batch(ctx: CheckContext) -> dict:
    """An fp16 step on a batch holding NaN, after clean steps have brought the loss scale down to
    where a clean step passes (it starts at 2^16, above what a fresh model's fp16 gradients hold):
    skipped (found_inf), parameters unchanged, scale halved; the next clean step is reported."""
    s = ctx.sizes
    built = _build_train_step(ctx, network=s.small_network, num_classes=s.small_classes, precision="fp16")
    images, labels = _random_batch(s.small_batch, s.small_classes, ctx.device)
    calibration = _first_clean_step(built, [(images, labels)])
    poisoned = images.clone()
    poisoned[0, :, :8, :8] = float("nan")
    params = [*built.backbone.parameters(), *built.head.parameters()]
    before = [p.detach().clone() for p in params]
    scale_before = float(built.scaler.scale_value)
    _, found_inf = built.step([(poisoned, labels)])
    unchanged = all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    scale_after = float(built.scaler.scale_value)
    buffers_finite = all(bool(torch.isfinite(b).all())
                         for b in built.backbone.buffers() if b.is_floating_point())
    _, clean_inf = built.step([(images, labels)])
    moved = any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    result = {"clean_steps_skipped_before": calibration, "found_inf": bool(found_inf),
              "params_unchanged": unchanged, "scale_before": scale_before, "scale_after": scale_after,
              "bn_buffers_finite_after_nan_batch": buffers_finite,
              "next_clean_step": {"found_inf": bool(clean_inf), "params_moved": moved}}
    problems = _nan_step_problems(result, float(getattr(built.scaler, "backoff_factor", 0.5)))
    result["summary"] = "; ".join(problems) if problems else (
        f"skipped, weights and BN statistics unchanged, scale {scale_before:g} -> {scale_after:g}; "
        f"next clean step {'skipped' if clean_inf else 'taken'}")
    if problems:
        raise CheckFailed("; ".join(problems), result)
    return result


def _first_clean_step(built: _Built, micro: list, limit: int = 24) -> int:
    """Steps on the clean batch until one is taken; returns how many were skipped before it."""
    for skipped in range(limit):
        if not bool(built.step(micro)[1]):
            return skipped
    raise CheckFailed(f"{limit} clean fp16 steps in a row were skipped (loss scale now "
                      f"{float(built.scaler.scale_value):g})")


def _nan_step_problems(result: dict, backoff: float) -> list[str]:
    problems = []
    if not result["found_inf"]:
        problems.append("the NaN batch's step was not skipped (found_inf False)")
    if not result["params_unchanged"]:
        problems.append("parameters changed")
    if not result["bn_buffers_finite_after_nan_batch"]:
        problems.append("BatchNorm running statistics non-finite after the skipped step")
    if not math.isclose(result["scale_after"], result["scale_before"] * backoff):
        problems.append(f"loss scale {result['scale_before']:g} -> {result['scale_after']:g}, "
                        f"expected x{backoff:g}")
    return problems


def step_partial_fc(ctx: CheckContext) -> dict:
    """The same head weights, embeddings and labels on two devices/dtypes: loss, embedding and weight
    gradients. On a GPU: CUDA float32 against CPU float32 (TF32 off). Dry run: CPU float32 against
    CPU float64. At rho < 1 the second side runs rho 1 over exactly the rows the first one sampled
    (its generator state is replayed through ``sample_classes``): the CPU and CUDA generators draw
    different streams, so the same seed cannot give the same sample."""
    s = ctx.sizes
    cpu = torch.device("cpu")
    first, second = ((ctx.device, torch.float32), (cpu, torch.float32)) if ctx.cuda else \
        ((cpu, torch.float32), (cpu, torch.float64))
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(s.batch_size, s.embedding_size, generator=gen)
    labels = torch.randint(0, s.num_classes, (s.batch_size,), generator=gen)
    result: dict[str, Any] = {"compared": f"{first[0].type} {first[1]} vs {second[0].type} {second[1]}",
                              "num_classes": s.num_classes, "batch_size": s.batch_size, "tolerance": 1e-4}
    with _backend_flags(benchmark=False, tf32=False):
        for rate in (1.0, 0.1):
            result[f"rho_{rate}"] = _compare_heads(s, emb, labels, rate, first, second)
    bad = [k for k, r in result.items() if k.startswith("rho_") and not r["ok"]]
    result["summary"] = f"{result['compared']}: " + ", ".join(
        f"{k} loss {r['loss_rel_diff']:.1e}, grads {r['emb_grad_rel_diff']:.1e} / "
        f"{r['weight_grad_rel_diff']:.1e}"
        for k, r in result.items() if k.startswith("rho_"))
    if bad:
        raise CheckFailed(f"loss or gradients differ beyond 1e-4 (relative): {', '.join(bad)}", result)
    return result


def _head_pass(head: PartialFC, emb: torch.Tensor, labels: torch.Tensor, device: torch.device,
               dtype: torch.dtype) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d emb, d loss / d weight) of ``head`` on ``device`` in ``dtype``, as float64 CPU."""
    x = emb.to(device, dtype, copy=True).requires_grad_(True)
    loss = head(x, labels.to(device))
    loss.backward()
    return float(loss.detach()), x.grad.detach().cpu().double(), head.weight.grad.detach().cpu().double()


def _compare_heads(s: Sizes, emb: torch.Tensor, labels: torch.Tensor, rate: float,
                   first: tuple[torch.device, torch.dtype], second: tuple[torch.device, torch.dtype]) -> dict:
    head = PartialFC(s.embedding_size, s.num_classes, sample_rate=rate, seed=0).to(*first)
    state = head.generator.get_state()
    loss_a, emb_grad_a, weight_grad_a = _head_pass(head, emb, labels, *first)
    rows, labels_b = None, labels
    if rate < 1.0:
        head.generator.set_state(state)
        rows = head.sample_classes(labels.to(first[0])).cpu()
        labels_b = torch.searchsorted(rows, labels)  # every label is a positive, so among the rows
    weight = head.weight.detach().cpu() if rows is None else head.weight.detach().cpu()[rows]
    other = PartialFC(s.embedding_size, weight.shape[0], sample_rate=1.0, seed=0).to(*second)
    with torch.no_grad():
        other.weight.copy_(weight.to(*second))
    loss_b, emb_grad_b, weight_grad_b = _head_pass(other, emb, labels_b, *second)
    kept = weight_grad_a if rows is None else weight_grad_a[rows]
    unsampled = 0.0
    if rows is not None:
        mask = torch.ones(weight_grad_a.shape[0], dtype=torch.bool)
        mask[rows] = False
        unsampled = float(weight_grad_a[mask].abs().max()) if bool(mask.any()) else 0.0
    out = {"loss": [loss_a, loss_b], "loss_rel_diff": abs(loss_a - loss_b) / abs(loss_b),
           "emb_grad_max_abs_diff": float((emb_grad_a - emb_grad_b).abs().max()),
           "emb_grad_rel_diff": _rel(emb_grad_a, emb_grad_b),
           "weight_grad_max_abs_diff": float((kept - weight_grad_b).abs().max()),
           "weight_grad_rel_diff": _rel(kept, weight_grad_b),
           "sampled_rows": int(weight.shape[0]), "unsampled_rows_grad_max_abs": unsampled}
    out["ok"] = (out["loss_rel_diff"] <= 1e-4 and out["emb_grad_rel_diff"] <= 1e-4
                 and out["weight_grad_rel_diff"] <= 1e-4 and unsampled == 0.0)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|."""
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)
