"""Run a test function in N gloo processes (``run_distributed``); a free local port.

``fn(rank, world_size, *args)`` must be a module-level (picklable) function. It runs after
``facecompat.dist.init_distributed`` has joined a gloo group through a TCP store on a free local port
(the torchrun environment variables are set, so the project's own init path is exercised). Whatever it
returns (tensors, numbers, strings; anything ``torch.save`` takes) comes back as a list ordered by rank,
so comparisons with a single-process reference can run in the test process. Spawn once and run several
checks inside ``fn``: each spawn costs a few seconds of interpreter + torch start-up.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

_TIMEOUT_S = 120.0  # a collective that hangs fails the test instead of the whole run


class DistributedTestError(RuntimeError):
    """A rank of :func:`run_distributed` failed; the message holds its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)  # N processes on a small CI box: no thread oversubscription
    from facecompat import dist

    out = Path(out_dir)
    try:
        dist.init_distributed(backend="gloo", timeout_s=_TIMEOUT_S)
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy()
    # Success: skip the interpreter teardown (about a second with torch loaded, per spawn).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes.

    Returns the ranks' return values, ordered by rank. Raises :class:`DistributedTestError` with the
    traceback of the first failing rank (the others are terminated).
    """
    with tempfile.TemporaryDirectory(prefix="facecompat_dist_") as out_dir:
        try:
            mp.spawn(_worker, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size, join=True)
        except Exception as err:
            # The first rank to fail wrote first; the others often fail only because it went away.
            errors = sorted(Path(out_dir).glob("rank*.err"), key=lambda p: p.stat().st_mtime_ns)
            detail = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in errors) or str(err)
            raise DistributedTestError(f"distributed run of {fn.__name__} failed:\n{detail}") from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
