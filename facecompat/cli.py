"""Pieces every command-line tool shares: one-line argument errors (exit 2), value types, device choice.

Light on purpose: importing it (for ``--help``) does not import torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch


T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def comma_names(text: str, what: str, choices: tuple[str, ...] | None = None) -> list[str]:
    """argparse helper: distinct comma-separated names (among ``choices`` when given), at least one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if choices is not None and n not in choices]
    if not names or bad or len(set(names)) != len(names):
        among = f" among {', '.join(choices)}" if choices is not None else ""
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated {what}{among}, got {text!r}")
    return names


def comma_floats(text: str, what: str) -> list[float]:
    """argparse helper: comma-separated numbers (``what`` names them in the error)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def resolve_device(name: str | None) -> torch.device:
    """``--device`` value -> torch.device, made this process's current device
    (:func:`facecompat.dist.use_device`: default this rank's GPU when CUDA is available, else cpu).
    Raises ValueError naming the flag (one line) for a malformed name, absent CUDA or a missing GPU."""
    from facecompat import dist

    try:
        return dist.use_device(name)
    except dist.DeviceError as exc:
        raise ValueError(f"--device: {exc}") from None


def run_collective(work: Callable[[], T],
                   errors: tuple[type[BaseException], ...]) -> tuple[int, int, T | None]:
    """Join the torchrun group (or none in one process), run ``work``, leave the group.

    Returns ``(exit status, rank, result)``: 0 and ``work``'s result, or 2 and None when it
    raised one of ``errors``, which is printed as one line (prefixed with the rank on ranks > 0).
    """
    from facecompat import dist

    rank = int(os.environ.get("RANK", "0"))
    try:
        rank, _ = dist.init_distributed()
        return 0, rank, work()
    except errors as exc:
        print(f"{'' if rank == 0 else f'[rank {rank}] '}error: {exc}", file=sys.stderr)
        return 2, rank, None
    finally:
        dist.destroy()
