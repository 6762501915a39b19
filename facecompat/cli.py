"""Pieces every command-line tool shares: one-line argument errors (exit 2), value types, device choice.

Light on purpose: importing it (for ``--help``) does not import torch.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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


def resolve_device(name: str | None) -> torch.device:
    """``--device`` value -> torch.device: default cuda (this rank's GPU under torchrun) when
    available, else cpu. Raises ValueError (one line) for a malformed name or CUDA that is absent."""
    import torch

    from facecompat import dist

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.get_local_rank())
    return device
