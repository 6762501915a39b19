"""Rendering jobs in spawned worker processes, results in job order (independent of the worker count)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
from tqdm import tqdm


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would only compete


def render_parallel(fn: Callable[[Any], list], jobs: Sequence, workers: int | None = None, *,
                    desc: str = "render", total: int | None = None, progress: bool = True) -> Iterator[list]:
    """Run ``fn`` over ``jobs`` in worker processes and yield the results in job order.

    Each job's result must depend only on the job (seeded streams, no shared state), so the
    output is the same for any number of workers. ``fn`` must be a module-level function
    (workers are spawned, not forked: safe beside torch and OpenCV threads).

    Args:
        fn: job -> list of items (e.g. encoded images); the progress bar counts items.
        jobs: the jobs, in output order.
        workers: processes; ``None`` = ``os.cpu_count()``; 1 = in this process.
        desc, total: progress bar label and total item count (``None``: unknown).
        progress: show a tqdm bar.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                result = fn(job)
                bar.update(len(result))
                yield result
            return
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(16, len(jobs) // (8 * workers)))
        with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
            for result in pool.imap(fn, jobs, chunksize=chunk):
                bar.update(len(result))
                yield result
