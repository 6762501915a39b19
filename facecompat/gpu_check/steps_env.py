"""Steps 1-3 of the GPU check: versions, the collectives of a world-size-1 process group, the DDP
wrapper."""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import platform
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facecompat import dist
from facecompat.gpu_check.context import (
    CheckContext,
    CheckFailed,
    _ensure_group,
    _one_line,
    _random_batch,
    _require_group,
)
from facecompat.models import get_model


def step_versions(ctx: CheckContext) -> dict:
    """Versions of everything the GPU path uses, the GPU, and which optional modules import."""
    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": _nccl_version(), "nccl_available": torch.distributed.is_nccl_available(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "modules": {name: _module_version(name) for name in
                    ("numpy", "cv2", "yaml", "onnx", "onnxruntime", "nvidia.dali", "faiss")},
    }
    out["dali_imports"] = "version" in out["modules"]["nvidia.dali"]
    out["faiss_imports"] = "version" in out["modules"]["faiss"]
    gpu = "no GPU"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        out["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                      "bf16": torch.cuda.is_bf16_supported()}
        gpu = f"{props.name} {out['gpu']['memory_gib']} GiB sm_{props.major}{props.minor}"
    out["summary"] = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {out['cudnn']}, "
                      f"NCCL {out['nccl']}; {gpu}; DALI {'yes' if out['dali_imports'] else 'no'}, "
                      f"faiss {'yes' if out['faiss_imports'] else 'no'}")
    return out


def _nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # a CPU build has no NCCL
        return None
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def _module_version(name: str) -> dict:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # absent or broken: both are "does not import"
        return {"error": _one_line(exc)}
    return {"version": str(getattr(module, "__version__", "unknown"))}


def step_collectives(ctx: CheckContext) -> dict:
    """Every collective of :mod:`facecompat.dist` on a real world-size-1 group (the group stays up
    for the later in-process steps)."""
    if not _ensure_group(ctx):
        raise CheckFailed("init_distributed returned without a process group")
    device = ctx.device
    local = torch.randn(4, 8, device=device, requires_grad=True)
    gathered = dist._AllGatherWithGrad.apply(local, None)  # all_gather_with_grad skips it at world size 1
    upstream = torch.randn_like(gathered)
    gathered.backward(upstream)
    full = torch.randn(6, 3, device=device)
    obj = {"step": 2, "names": ["a", "b"], "value": 0.5}
    dist.barrier()
    values = torch.arange(5.0, device=device)
    checks = {
        "all_gather_with_grad_forward": torch.equal(gathered.detach(), local.detach()),
        "all_gather_with_grad_backward": torch.equal(local.grad, upstream),
        "reduce_scatter": torch.equal(dist._reduce_scatter_sum(full, None), full),
        "broadcast_object": dist.broadcast_object(obj) == obj,
        "barrier": True,
        "all_reduce_flag": dist.all_reduce_flag(True) is True and dist.all_reduce_flag(False) is False,
        "all_reduce_": all(torch.equal(dist.all_reduce_(values.clone(), op), values)
                           for op in ("sum", "max", "min")),
        "all_reduce_max": dist.all_reduce_max(7) == 7,
    }
    backend = str(torch.distributed.get_backend())
    result = {"backend": backend, "world_size": dist.get_world_size(), "checks": checks,
              "all_gather_op": "all_gather_single" if hasattr(torch.distributed, "all_gather_single")
              else "all_gather_into_tensor",
              "reduce_scatter_fallback": backend in dist._NO_REDUCE_SCATTER,
              "note": "all_reduce_flag and all_reduce_ return early at world size 1; all_reduce_max and the "
                      "gather/scatter/broadcast/barrier calls reach the backend"}
    bad = [name for name, ok in checks.items() if not ok]
    verdict = f"WRONG {', '.join(bad)}" if bad else f"{len(checks)} checks ok"
    result["summary"] = f"{backend}, world size 1: {verdict}"
    if bad:
        raise CheckFailed(f"wrong results: {', '.join(bad)}", result)
    return result


def step_ddp(ctx: CheckContext) -> dict:
    """:func:`facecompat.dist.data_parallel` (the trainer's wrapper): construction warnings about its
    buffer argument, forward/backward, gradients against an unwrapped copy."""
    _require_group(ctx)
    torch.manual_seed(0)
    backbone = get_model(ctx.sizes.small_network, ctx.sizes.embedding_size).to(ctx.device)
    plain = copy.deepcopy(backbone)
    keyword = ("forward_sync_buffers" if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = dist.data_parallel(backbone, ctx.device)
    images, _ = _random_batch(ctx.sizes.small_batch, 1, ctx.device, seed=1)
    for module in (model, plain):
        module(images).square().mean().backward()
    diff, scale = _grad_difference(backbone, plain)
    messages = [str(w.message).splitlines()[0] for w in caught]
    result = {"torch": torch.__version__, "buffer_argument": f"{keyword}=False",
              "device_ids": getattr(model, "device_ids", None),
              "gradient_as_bucket_view": getattr(model, "gradient_as_bucket_view", None),
              "warnings": messages[:5], "grad_max_abs_diff": diff, "grad_max_abs": scale}
    result["summary"] = f"{keyword}=False accepted; grad diff {diff:.2e} of max {scale:.2e}"
    about_args = [m for m in messages if "broadcast_buffers" in m or "forward_sync_buffers" in m]
    if about_args:
        raise CheckFailed(f"DDP warned about its buffer argument: {about_args[0]}", result)
    if not diff <= 1e-3 * scale + 1e-6:
        raise CheckFailed(f"DDP gradients differ from the plain module's by {diff:.3e} (max {scale:.3e})",
                          result)
    return result


def _grad_difference(a: nn.Module, b: nn.Module) -> tuple[float, float]:
    """(max |grad_a - grad_b|, max |grad_b|) over parameters with gradients."""
    diff = scale = 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        if pa.grad is None or pb.grad is None:
            continue
        diff = max(diff, float((pa.grad - pb.grad).abs().max()))
        scale = max(scale, float(pb.grad.abs().max()))
    return diff, scale
