"""Steps 10-11 of the GPU check: step throughput against insightface's fp16 step (the reference copy
loaded from ``--reference``) and bf16 extraction."""

from __future__ import annotations

import importlib.util
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch import nn

from facecompat.features import embed_batches
from facecompat.gpu_check.context import (
    CheckContext,
    CheckFailed,
    _backend_flags,
    _ensure_group,
    _random_batch,
    _release,
    _sync,
)
from facecompat.models import get_model
from facecompat.train.bench import StepBenchSpec, bench_train_step

THROUGHPUT_TARGET = 1.3  # our bf16 samples/s over insightface's fp16, at rho 1.0


def step_throughput(ctx: CheckContext) -> dict:
    """Our step (:func:`bench_train_step`) in bf16 and fp16 at every rho (and layout), and
    insightface's fp16 step from ``--reference`` in the same process; ratios of samples/s. The
    reference copy is loaded first, so that a broken one fails the step at once."""
    s = ctx.sizes
    ref = load_reference(ctx.reference) if ctx.reference.is_dir() else None
    ours = _time_ours(ctx)
    _release(ctx)
    reference = _reference_throughput(ctx, ref)
    result = {"network": s.network, "batch_size": s.batch_size, "num_classes": s.num_classes,
              "steps": s.bench_steps, "warmup": s.bench_warmup, "ours": ours, "reference": reference,
              "target": THROUGHPUT_TARGET, **_throughput_ratios(ours, reference)}
    result["summary"] = _throughput_line(result)
    return result


def _time_ours(ctx: CheckContext) -> dict[str, dict]:
    """``{"<precision>[+channels_last]@<rho>": samples/s, ms/step, peak memory, loss}``."""
    s = ctx.sizes
    ours: dict[str, dict] = {}
    with _backend_flags(benchmark=True, tf32=True):  # as the trainer sets them (train.deterministic off)
        for rate in (1.0, 0.1):
            for precision in ("bf16", "fp16"):
                for channels_last in s.layouts:
                    spec = StepBenchSpec(network=s.network, embedding_size=s.embedding_size,
                                         batch_size=s.batch_size, num_classes=s.num_classes, sample_rate=rate,
                                         precision=precision, channels_last=channels_last,
                                         steps=s.bench_steps, warmup=s.bench_warmup)
                    r = bench_train_step(spec, ctx.device)
                    ours[f"{precision}{'+channels_last' if channels_last else ''}@{rate}"] = {
                        k: r[k] for k in ("samples_per_s", "ms_per_step", "peak_memory_gib", "loss")}
    return ours


def _throughput_ratios(ours: dict, reference: dict) -> dict:
    """Per rho, each of our variants' samples/s over insightface's; whether the best bf16 meets the
    target at rho 1.0 (None when the reference was not timed)."""
    ratios: dict[str, dict] = {}
    for key, row in ours.items():
        variant, rate = key.split("@")
        ref = reference.get(f"rho_{rate}", {}).get("samples_per_s")
        if ref:
            ratios.setdefault(f"rho_{rate}", {})[variant] = round(row["samples_per_s"] / ref, 3)
    best = max((v for k, v in ratios.get("rho_1.0", {}).items() if k.startswith("bf16")), default=None)
    return {"ratios": ratios, "best_bf16_ratio_rho_1.0": best,
            "target_met": None if best is None else best >= THROUGHPUT_TARGET}


def _throughput_line(result: dict) -> str:
    ours = ", ".join(f"{k} {v['samples_per_s']:.0f}/s" for k, v in result["ours"].items())
    ref = result["reference"]
    if "skipped" in ref:
        return f"{ours}; reference: {ref['skipped']}"
    theirs = ", ".join(f"{k} {v['samples_per_s']:.0f}/s" for k, v in ref.items() if isinstance(v, dict))
    met = result["target_met"]
    verdict = f"best bf16/ref at rho 1.0 {result['best_bf16_ratio_rho_1.0']} " \
              f"(target >= {THROUGHPUT_TARGET}: {'met' if met else 'NOT met'})"
    return f"{ours}; insightface fp16 {theirs}; {verdict}"


def load_reference(directory: Path) -> SimpleNamespace:
    """insightface's ``backbones/iresnet.py``, ``partial_fc_v2.py`` and ``losses.py`` from ``directory``
    (a copy of recognition/arcface_torch; never part of this project), loaded with ``directory`` on
    sys.path for the time of the import (they import each other as top-level modules)."""
    files = {"iresnet": directory / "backbones" / "iresnet.py",
             "partial_fc_v2": directory / "partial_fc_v2.py", "losses": directory / "losses.py"}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"--reference {directory}: {path.relative_to(directory)} is missing")
    sys.path.insert(0, str(directory))
    try:
        return SimpleNamespace(**{name: _load_module(f"_gpu_check_reference_{name}", path)
                                  for name, path in files.items()})
    finally:
        sys.path.remove(str(directory))


def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_throughput(ctx: CheckContext, ref: SimpleNamespace | None) -> dict:
    """insightface's step per rho (``ref`` from :func:`load_reference`, None when the copy is absent),
    or ``{"skipped": reason}``; a copy that does not build raises (the step fails)."""
    if ref is None:
        return {"skipped": f"reference copy absent (--reference {ctx.reference})"}
    if not _ensure_group(ctx):
        return {"skipped": "no process group (insightface's PartialFC_V2 requires torch.distributed)"}
    if not ctx.cuda:
        _reference_smoke(ctx, ref)
        return {"skipped": "timing needs CUDA (PartialFC_V2.forward calls .cuda()); on the CPU the copy was "
                           f"loaded, {ctx.sizes.reference_network} ran forward and PartialFC_V2 was built"}
    out = {}
    with _backend_flags(benchmark=True, tf32=False):  # train_v2.py: cudnn.benchmark, TF32 at defaults
        for rate in (1.0, 0.1):
            out[f"rho_{rate}"] = _time_reference(ctx, ref, rate)
            _release(ctx)
    return out


def _reference_modules(ctx: CheckContext, ref: SimpleNamespace, rate: float) -> tuple[nn.Module, nn.Module]:
    """insightface's backbone (``fp16=True``, as train_v2.py with cfg.fp16) and PartialFC_V2 (its fp16
    argument False, as train_v2.py passes) with CombinedMarginLoss(64, 1.0, 0.5, 0.0)."""
    s = ctx.sizes
    torch.manual_seed(0)
    backbone = getattr(ref.iresnet, s.reference_network)(False, dropout=0.0, fp16=True,
                                                         num_features=s.embedding_size)
    margin = ref.losses.CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0)
    head = ref.partial_fc_v2.PartialFC_V2(margin, s.embedding_size, s.num_classes, rate, False)
    return backbone.to(ctx.device).train(), head.to(ctx.device).train()


def _reference_smoke(ctx: CheckContext, ref: SimpleNamespace) -> None:
    backbone, _ = _reference_modules(ctx, ref, 1.0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.autocast without CUDA: disabled, says so
        emb = backbone.eval()(torch.zeros(2, 3, 112, 112))
    if tuple(emb.shape) != (2, ctx.sizes.embedding_size):
        raise CheckFailed(f"reference backbone gave {tuple(emb.shape)}, "
                          f"expected (2, {ctx.sizes.embedding_size})")


def _time_reference(ctx: CheckContext, ref: SimpleNamespace, rate: float) -> dict:
    """insightface's train_v2.py step with cfg.fp16: GradScaler(growth_interval=100), scale/backward,
    unscale, clip_grad_norm_(backbone, 5), step, update, zero_grad; SGD lr 0.1, momentum 0.9, wd 5e-4.
    Left out, as in our bench: DDP (world size 1 here; train_v2 wraps even one GPU), the LR scheduler
    and the per-step ``loss.item()`` of its logging: each would only slow the reference."""
    s = ctx.sizes
    backbone, head = _reference_modules(ctx, ref, rate)
    opt = torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params": head.parameters()}],
                          lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", growth_interval=100)
    images, labels = _random_batch(s.batch_size, s.num_classes, ctx.device)

    def step() -> None:
        loss = head(backbone(images), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    torch.cuda.reset_peak_memory_stats(ctx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # their torch.cuda.amp.autocast
        elapsed = _timed(ctx, step, s.bench_warmup, s.bench_steps)
    return {"network": s.reference_network, "sample_rate": rate,
            "ms_per_step": round(1000 * elapsed / s.bench_steps, 2),
            "samples_per_s": round(s.batch_size * s.bench_steps / elapsed, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 3),
            "loss_scale": scaler.get_scale()}


def _timed(ctx: CheckContext, fn: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones, the device synchronised."""
    for _ in range(warmup):
        fn()
    _sync(ctx)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(ctx)
    return time.perf_counter() - start


def step_extraction(ctx: CheckContext) -> dict:
    """:func:`facecompat.features.embed_batches` (bf16, flip fusion) on uint8 batches already on
    the device: faces/s over the timed batches after two warm-up batches."""
    s = ctx.sizes
    torch.manual_seed(0)
    model = get_model(s.network, s.embedding_size).to(ctx.device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (s.extract_batch, 3, 112, 112), dtype=torch.uint8, generator=gen)
               .to(ctx.device) for _ in range(s.extract_batches)]
    kw = {"device": ctx.device, "flip": True, "autocast_dtype": torch.bfloat16}
    embed_batches(model, batches[:2], **kw)
    num = s.extract_batch * s.extract_batches
    feats: list[torch.Tensor] = []
    elapsed = _timed(ctx, lambda: feats.append(embed_batches(model, batches, num_rows=num, **kw)), 0, 1)
    out = feats[0]
    result = {"network": s.network, "batch": s.extract_batch, "faces": num, "flip": True, "autocast": "bf16",
              "seconds": round(elapsed, 4), "faces_per_s": round(num / elapsed, 1),
              "shape": list(out.shape), "dtype": str(out.dtype), "device": str(out.device)}
    result["summary"] = (f"{result['faces_per_s']:.0f} faces/s ({num} faces, batch {s.extract_batch}, "
                         "flip, bf16)")
    problems = []
    if tuple(out.shape) != (num, s.embedding_size) or out.dtype != torch.float32 or out.device != ctx.device:
        problems.append(f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if not bool(torch.isfinite(out).all()):
        problems.append("non-finite features")
    if problems:
        raise CheckFailed("; ".join(problems), result)
    return result
