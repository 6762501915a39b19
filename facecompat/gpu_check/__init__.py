"""The project's whole GPU path checked in one command (``bash tools/gpu_check.sh``).

Thirteen steps (:data:`STEPS`), in order, each timed and recorded as passed, failed (a one-line
reason; the traceback goes to the log) or skipped (with the reason); a failure does not stop the
later steps. One process holds a world-size-1 process group (NCCL on a GPU, gloo on the CPU) for
the in-process steps; training, the quickstart and the gpu-marked tests run as subprocesses whose
output goes to ``<out>/logs/<name>.log`` and into ``<out>/gpu_check.log``.

Outputs in ``out``: ``summary.json``, rewritten atomically before and after every step (a killed
run leaves what it measured and the step it was in), and ``gpu_check.log`` (everything printed).
``summary.json``::

    {"format": 1, "status": "running" | "passed" | "failed" | "interrupted",
     "started": ISO time, "finished": ISO time or null, "elapsed_s": float,
     "command": [...], "dry_run": bool, "device": "cuda:0", "out": DIR, "reference": DIR,
     "time_budget_s": float, "counts": {"passed": n, "failed": n, "skipped": n},
     "steps": {name: {"index": 1..13, "description": str,
                      "status": "pending" | "running" | "passed" | "failed" | "skipped",
                      "seconds": float or null, "reason": str or null,
                      "result": {... measurements, "summary": one line ...}}}}

``dry_run`` runs the same steps at tiny sizes (:data:`TINY`); on the CPU the CUDA-only steps are
skipped with that reason. Nothing needs DALI or faiss: loaders are ``data.loader=torch``.
"""

from __future__ import annotations

from facecompat.gpu_check.context import (
    FULL,
    TINY,
    CheckContext,
    CheckFailed,
    GpuCheckError,
    Sizes,
    StepSkipped,
)
from facecompat.gpu_check.runner import (
    FORMAT_VERSION,
    STEP_NAMES,
    STEPS,
    format_table,
    resolve_check_device,
    run_gpu_check,
    select_steps,
)
from facecompat.gpu_check.steps_env import step_collectives, step_ddp, step_versions
from facecompat.gpu_check.steps_runs import step_gpu_tests, step_quickstart, step_train_resume, step_two_ranks
from facecompat.gpu_check.steps_speed import (
    THROUGHPUT_TARGET,
    load_reference,
    step_extraction,
    step_throughput,
)
from facecompat.gpu_check.steps_train import (
    PRECISION_TOLERANCE,
    PRECISIONS,
                                         step_fp16_nan_batch,
    step_no_host_sync,
    step_partial_fc,
    step_precisions,
)

__all__ = [
    "FORMAT_VERSION", "FULL", "PRECISIONS", "PRECISION_TOLERANCE", "STEPS", "STEP_NAMES", "THROUGHPUT_TARGET",
    "TINY", "CheckContext", "CheckFailed", "GpuCheckError", "Sizes", "StepSkipped", "format_table",
    "load_reference", "resolve_check_device", "run_gpu_check", "select_steps", "step_collectives", "step_ddp",
    "step_extraction", "step_fp16_nan_batch", "step_gpu_tests", "step_no_host_sync", "step_partial_fc",
    "step_precisions", "step_quickstart", "step_throughput", "step_train_resume", "step_two_ranks",
    "step_versions",
]
