"""The only module that talks to torch.distributed.

Everything here has a single-process default (rank 0, world size 1, collectives that are
no-ops), so library code runs unchanged in one CPU process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank(group: tdist.ProcessGroup | None = None) -> int:
    return tdist.get_rank(group) if is_initialized() else 0


def get_world_size(group: tdist.ProcessGroup | None = None) -> int:
    return tdist.get_world_size(group) if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


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
        torch.cuda.set_device(get_local_rank())
    tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return get_rank(), get_world_size()


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
