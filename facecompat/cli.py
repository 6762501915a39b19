"""Pieces every command-line tool shares: one-line argument errors (exit 2), value types, the
common flags (``--device``, ``--json``), output paths checked before the work, and the one way a
tool ends on a user's error (:func:`run_main`).

Light on purpose: importing it (for ``--help``) does not import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from facecompat.errors import UserError

if TYPE_CHECKING:
    import torch


T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a count such as ``--workers``)."""
    return _int_at_least(text, 0)


def output_file(text: str) -> Path:
    """argparse type: a file the tool will write (checked now, before the work): not a directory,
    in a folder that exists or can be made. ``-`` (standard output) passes through."""
    if text == "-":
        return Path(text)
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file to write")
    parent = next((q for q in (path.parent, *path.parent.parents) if q.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write under {parent}")
    return path


def output_dir(text: str) -> Path:
    """argparse type: a folder the tool will write into (checked now, before the work): not a file,
    and writable or under a folder where it can be made."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, expected a folder")
    parent = next((q for q in (path, *path.parents) if q.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write under {parent}")
    return path


def writable_dir(text: str) -> Path:
    """argparse type: an existing folder this process can write in (scratch space)."""
    path = Path(text)
    if not path.is_dir() or not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: not a writable folder")
    return path


def unit_fraction(text: str) -> float:
    """argparse type: a share in (0, 1] (a Partial FC sample rate, a credible-sample keep ratio)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def far_value(text: str) -> float:
    """argparse type: one false accept rate in (0, 1) (an operating FAR)."""
    try:
        far = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a FAR in (0, 1), got {text!r}") from None
    if not 0.0 < far < 1.0:
        raise argparse.ArgumentTypeError(f"expected a FAR in (0, 1), got {text!r}")
    return far


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device``: cpu, cuda (this process's GPU) or cuda:N; default cuda when available."""
    parser.add_argument("--device", help="cpu, cuda (this process's GPU: LOCAL_RANK modulo the visible "
                        "GPUs) or cuda:N (default: cuda when available, else cpu)")


def add_json_arg(parser: argparse.ArgumentParser, what: str = "the results") -> None:
    """``--json [OUT]``: print ``what`` as JSON on standard output, or write it to ``OUT``."""
    parser.add_argument("--json", nargs="?", const=Path("-"), type=output_file, metavar="OUT",
                        help=f"{what} as JSON: on standard output, or written to OUT")


def write_json(obj: Any, dest: Path | None) -> None:
    """``obj`` as JSON to ``dest`` (``-``: standard output; None: nothing), written atomically."""
    if dest is None:
        return
    text = json.dumps(obj, indent=2, sort_keys=False, default=str)
    if str(dest) == "-":
        print(text)
        return
    from facecompat.fileio import atomic_write

    with atomic_write(dest, "w") as f:
        f.write(text + "\n")


def run_main(prog: str, main: Callable[[], int | None]) -> int:
    """Run a tool's ``main``: a :class:`~facecompat.errors.UserError` (bad input the user can fix)
    becomes one line ``prog: error: ...`` and exit status 2, Ctrl-C exit status 130; anything else
    is a bug and keeps its traceback."""
    try:
        return int(main() or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


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
    Raises DeviceError (a UserError and ValueError) naming the flag, in one line, for a malformed name,
    absent CUDA or a missing GPU."""
    from facecompat import dist

    try:
        return dist.use_device(name)
    except dist.DeviceError as exc:
        raise dist.DeviceError(f"--device: {exc}") from None


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
