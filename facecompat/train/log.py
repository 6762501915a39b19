"""What a training run reports: ``train.log``, ``metrics.jsonl``, TensorBoard events, console.

Only rank 0 writes files; other ranks log warnings and errors to stderr, prefixed with their rank.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(run_dir: Path | None, rank: int) -> logging.Logger:
    """The ``facecompat.train`` logger: console + ``<run_dir>/train.log`` on rank 0, warnings elsewhere."""
    logger = logging.getLogger("facecompat.train")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    fmt = _FORMAT if rank == 0 else f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    console.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    logger.addHandler(console)
    if rank == 0 and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
    return logger


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    A resumed run appends to the same files; each record carries its ``step`` so readers can
    keep the last record per step.
    """

    def __init__(self, run_dir: Path | None, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled and run_dir is not None
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a core dependency; keep training if it is broken
                logging.getLogger("facecompat.train").warning("tensorboard unavailable; no events written")
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Throughput:
    """Samples per second over training time only: pauses (evaluation, checkpoints) are excluded."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._samples = 0
        self._paused = 0.0
        self._pause_start: float | None = None

    def add(self, samples: int) -> None:
        self._samples += samples

    def pause(self) -> None:
        if self._pause_start is None:
            self._pause_start = time.perf_counter()

    def resume(self) -> None:
        if self._pause_start is not None:
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def rate(self, reset: bool = True) -> float:
        """Samples/s since the last reset."""
        self.resume()
        elapsed = time.perf_counter() - self._start - self._paused
        rate = self._samples / elapsed if elapsed > 0 else 0.0
        if reset:
            self._start, self._samples, self._paused = time.perf_counter(), 0, 0.0
        return rate


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"
