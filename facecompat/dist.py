"""The only module that talks to torch.distributed.

Everything here has a single-process default (rank 0, world size 1, collectives that are
no-ops), so library code runs unchanged in one CPU process.
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from facecompat.errors import UserError


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank(group: tdist.ProcessGroup | None = None) -> int:
    return tdist.get_rank(group) if is_initialized() else 0


def get_world_size(group: tdist.ProcessGroup | None = None) -> int:
    return tdist.get_world_size(group) if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


BACKEND_ENV = "FACECOMPAT_DIST_BACKEND"


def default_backend() -> str:
    """``$FACECOMPAT_DIST_BACKEND`` when set (``gloo`` lets several ranks share one GPU, which NCCL
    refuses), else NCCL with CUDA and gloo without."""
    chosen = os.environ.get(BACKEND_ENV, "").strip().lower()
    if chosen:
        if chosen not in ("nccl", "gloo"):
            raise DeviceError(f"{BACKEND_ENV}={chosen!r}: expected nccl or gloo")
        return chosen
    return "nccl" if torch.cuda.is_available() else "gloo"


# --- devices: the one place a device name becomes a torch.device ----------------------------------


class DeviceError(UserError, ValueError):
    """A device that cannot be used here (malformed name, no CUDA, no such GPU); one line."""


def local_gpu_index() -> int:
    """This process's GPU: ``LOCAL_RANK`` modulo the visible GPUs.

    torchrun gives every process all the node's GPUs and a distinct LOCAL_RANK; launchers that
    give each process one visible GPU (SLURM with ``--gpus-per-task=1``, Kubernetes device
    plugins) still number LOCAL_RANK 0..n-1, and each must use its only GPU, index 0.
    """
    count = torch.cuda.device_count()
    if count == 0:
        raise DeviceError("CUDA is not available here")
    return get_local_rank() % count


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """A device name (or None) → the torch.device this process computes on.

    ``None`` → this process's GPU (:func:`local_gpu_index`) when CUDA is available, else the CPU;
    ``"cuda"`` without an index → this process's GPU; ``"cuda:i"`` → GPU i, checked to exist.
    Raises :class:`DeviceError` for a malformed name, CUDA that is absent or a GPU index out of range.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"not a device: {device!r} ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{device}: CUDA is not available here")
        if device.index is None:
            return torch.device("cuda", local_gpu_index())
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"{device}: this process sees {torch.cuda.device_count()} GPU(s)")
    elif device.type not in ("cpu", "meta"):
        raise DeviceError(f"{device}: unsupported device type (cpu or cuda[:index])")
    return device


def use_device(device: torch.device | str | None = None) -> torch.device:
    """:func:`resolve_device`, and make a CUDA result the current device (NCCL, ``.cuda()``, new
    tensors without a device); the entry point of a process that computes."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _ddp_accepts(name: str) -> bool:
    return name in inspect.signature(DistributedDataParallel.__init__).parameters


def data_parallel(module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """``module`` wrapped in DDP the way every training here wraps it.

    Buffers (BN statistics) stay per rank, as in insightface (``broadcast_buffers=False``):
    torch >= 2.13 spells that ``forward_sync_buffers=False`` and deprecates the old name, older
    releases (the floor is in setup.py) know only ``broadcast_buffers``; the signature decides.
    Gradients are bucket views (no second copy of the gradients).
    """
    no_sync = {"forward_sync_buffers": False} if _ddp_accepts("forward_sync_buffers") \
        else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_sync)


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT). Without those variables this is a single process and nothing
    is initialised. Returns (rank, world_size)."""
    if is_initialized():
        return get_rank(), get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_gpu_index())
    timeout = timedelta(seconds=timeout_s)
    store = _attempt_store(timeout)
    if store is None:
        tdist.init_process_group(backend=backend, timeout=timeout)
    else:
        tdist.init_process_group(backend=backend, timeout=timeout, store=store,
                                 rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return get_rank(), get_world_size()


def _attempt_store(timeout: timedelta) -> tdist.Store | None:
    """Under torchrun's shared agent store, a store namespace of its own for this attempt.

    torchrun (c10d rendezvous) lets workers use the agent's TCPStore, which outlives worker
    restarts; the process group's keys from the attempt that crashed are still there, and a
    restarted worker can read a dead peer's address and fail to connect ("Gloo connectFullMesh
    failed ... Connection refused", the problem of pytorch/pytorch#135712). Every worker
    counts itself in once per attempt, so ``(count - 1) // world_size`` numbers attempts the
    same way on every node (torchrun's TORCHELASTIC_RESTART_COUNT is per agent and differs
    between nodes when only one of them failed), and the group lives under that prefix.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    client = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                            is_master=False, timeout=timeout)
    joined = client.add("facecompat/workers_joined", 1)
    attempt = (joined - 1) // world_size
    return tdist.PrefixStore(f"facecompat/attempt_{attempt}", client)


def destroy() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_max(value: int) -> int:
    """Maximum of an integer over all ranks (the value itself in one process)."""
    if not is_initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    if default_backend() == "nccl" and tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s Python object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


# --- collectives used by the model code (identity / no-op without a process group) ---------------

_REDUCE_OPS = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
# Backends that raised "not implemented" for reduce-scatter once; they use all_reduce + slice from then on.
_NO_REDUCE_SCATTER: set[str] = set()


def _comm_device(group: tdist.ProcessGroup | None) -> torch.device:
    """Device a small bookkeeping tensor must live on for ``group``'s backend (NCCL: current GPU)."""
    if tdist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_into(out: torch.Tensor, t: torch.Tensor, group: tdist.ProcessGroup | None) -> None:
    # torch >= 2.12 renamed all_gather_into_tensor -> all_gather_single (the old name warns).
    gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor
    gather(out, t.contiguous(), group=group)


def _reduce_scatter_sum(full: torch.Tensor, group: tdist.ProcessGroup | None) -> torch.Tensor:
    """This rank's dim-0 slice of the element-wise sum of ``full`` over ranks.

    One reduce-scatter where the backend has it. gloo builds raise for reduce-scatter where they lack
    it (older releases; CUDA tensors, whose messages differ by release); there we fall back to an
    all_reduce of the whole tensor plus a slice (twice the traffic, same result). The failure is raised
    locally before any communication and identically on every rank, so switching to the fallback
    cannot desynchronise the ranks.
    """
    world, rank = get_world_size(group), get_rank(group)
    n = full.shape[0] // world
    full = full.contiguous()
    backend = str(tdist.get_backend(group))
    if backend not in _NO_REDUCE_SCATTER:
        out = full.new_empty((n, *full.shape[1:]))
        scatter = getattr(tdist, "reduce_scatter_single", None) or tdist.reduce_scatter_tensor
        try:
            scatter(out, full, op=tdist.ReduceOp.SUM, group=group)
            return out
        except (RuntimeError, NotImplementedError):
            if backend != "gloo":  # NCCL has it: a failure there is a real error
                raise
            _NO_REDUCE_SCATTER.add(backend)
    full = full.clone()
    tdist.all_reduce(full, op=tdist.ReduceOp.SUM, group=group)
    return full[rank * n : (rank + 1) * n]


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's tensor along dim 0. Backward: reduce-scatter (sum).

    Rank r's loss depends on all gathered rows, so the gradient of a local row is the sum over ranks of
    the gradient each rank's graph sends to that row: exactly a reduce-scatter of the gathered-gradient
    tensor. No rescaling here: if every rank computes the same global loss from its own part of the
    model (as the Partial FC head does) the sum is the true gradient of that loss.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: tdist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = t.new_empty((get_world_size(group) * t.shape[0], *t.shape[1:]))
        _all_gather_into(out, t, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _reduce_scatter_sum(grad, ctx.group), None


def all_gather_with_grad(t: torch.Tensor, group: tdist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0, differentiable.

    Args:
        t: ``[n, ...]``; every rank must pass the same shape and dtype.
    Returns:
        ``[world * n, ...]``, rank r's rows at ``[r * n, (r + 1) * n)``; ``t`` itself in one process.
        Backward is one reduce-scatter (sum) of the incoming gradient (all_reduce + slice on backends
        without reduce-scatter), returning this rank's slice.
    """
    if not is_initialized() or get_world_size(group) == 1:
        return t
    return _AllGatherWithGrad.apply(t, group)


def all_gather_tensor(t: torch.Tensor, group: tdist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``t`` (same shape everywhere) concatenated along dim 0, without autograd.

    Returns ``[world * n, ...]``; ``t`` itself in one process.
    """
    if not is_initialized() or get_world_size(group) == 1:
        return t
    t = t.detach()
    out = t.new_empty((get_world_size(group) * t.shape[0], *t.shape[1:]))
    _all_gather_into(out, t, group)
    return out


def all_reduce_(t: torch.Tensor, op: str = "sum", group: tdist.ProcessGroup | None = None) -> torch.Tensor:
    """Reduce ``t`` in place over the ranks (``op``: "sum", "max" or "min") and return it.

    A no-op (returning ``t``) in one process. Not differentiable: use it on detached values.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; valid: {', '.join(_REDUCE_OPS)}")
    if is_initialized() and get_world_size(group) > 1:
        tdist.all_reduce(t, op=_REDUCE_OPS[op], group=group)
    return t


def average_gradients(params: list[torch.Tensor], group: tdist.ProcessGroup | None = None) -> None:
    """Average the ``.grad`` of replicated parameters over the ranks, in one flat all-reduce
    (parameters outside DDP, e.g. a compatibility method's discriminator). A no-op in one process;
    a parameter without a gradient counts as zeros."""
    world = get_world_size(group)
    if not is_initialized() or world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(world)
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=group)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone() if p.grad is None else p.grad.copy_(
            flat[offset:offset + n].view_as(g))
        offset += n


def all_reduce_flag(flag: bool, group: tdist.ProcessGroup | None = None) -> bool:
    """True on every rank if ``flag`` is True on any rank (e.g. agree to skip a step with inf grads)."""
    if not is_initialized() or get_world_size(group) == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(group))
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
    return bool(t.item())


def sum_allreduce_hook(
    process_group: tdist.ProcessGroup | None, bucket: tdist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook that SUMS gradients over ranks instead of averaging them.

    Register with ``ddp_model.register_comm_hook(group, sum_allreduce_hook)`` when the loss every rank
    backpropagates is already the global-batch loss (the Partial FC head): each rank's backbone gradient
    is then its share of the true gradient, and the sum is the whole of it. DDP's default average would
    scale the backbone gradient by 1 / world_size (arcface_torch instead multiplies the embedding
    gradient by world_size in its all-gather backward to cancel the average).
    """
    group = process_group if process_group is not None else tdist.group.WORLD
    work = tdist.all_reduce(bucket.buffer(), op=tdist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# DDP validates a hook's annotations as objects; this module's are strings (postponed evaluation).
sum_allreduce_hook.__annotations__.update({
    "process_group": tdist.ProcessGroup | None, "bucket": tdist.GradBucket,
    "return": torch.futures.Future[torch.Tensor]})
