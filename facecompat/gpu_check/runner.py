"""The runner of the GPU check: the step table, step selection, the device, the run loop,
``summary.json``, ``gpu_check.log`` and the end-of-run table."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from facecompat import dist
from facecompat.fileio import atomic_write
from facecompat.gpu_check.context import FULL, TINY, CheckContext, GpuCheckError, StepSkipped, _one_line
from facecompat.gpu_check.steps_env import step_collectives, step_ddp, step_versions
from facecompat.gpu_check.steps_runs import step_gpu_tests, step_quickstart, step_train_resume, step_two_ranks
from facecompat.gpu_check.steps_speed import step_extraction, step_throughput
from facecompat.gpu_check.steps_train import (
    step_fp16_nan_batch,
    step_no_host_sync,
    step_partial_fc,
    step_precisions,
)

FORMAT_VERSION = 1


# name -> what the step checks (also the --help list), in the order the steps run
STEPS: dict[str, str] = {
    "versions": "python, torch, CUDA, cuDNN, NCCL, GPU, numpy, cv2, onnxruntime; whether DALI and faiss "
                "import",
    "collectives": "a world-size-1 process group (NCCL; gloo on the CPU): all-gather with gradient, "
                   "reduce-scatter, broadcast_object, barrier, all_reduce_flag, all_reduce_, all_reduce_max",
    "ddp": "dist.data_parallel as the trainer wraps its model: DDP takes the arguments, forward/backward, "
           "gradients equal the plain module's",
    "precisions": "r50 + Partial FC (93,431 classes), batch 128, one TrainStep in fp32, bf16, "
                  "bf16 + channels_last, fp16: first-step loss within 2% of fp32's",
    "no_host_sync": "torch.cuda.set_sync_debug_mode('error') around a warmed-up bf16 step, plain and with "
                    "MixBCT (CUDA only)",
    "fp16_nan_batch": "an fp16 step on a batch with NaN is skipped: found_inf, weights unchanged, loss scale "
                      "halved",
    "partial_fc_gpu_equals_cpu": "the same head weights, embeddings and labels on the GPU and the CPU "
                                 "(rho 1.0 and 0.1 with the GPU's sample): loss and gradients",
    "train_resume": "generated data, an old model (tools/train.py), MixBCT (configs/ms1mv3_mixbct.yaml) "
                    "under torchrun: one epoch; resumed mid-epoch vs uninterrupted model.pt",
    "quickstart_tiny": "tools/quickstart.py --size tiny: wall time, verdict lines, report.json",
    "step_throughput": "r50 step samples/s, bf16 and fp16, rho 1.0 and 0.1, against insightface's fp16 step "
                       "(iresnet50 + PartialFC_V2 from --reference) in the same process",
    "extraction": "r50 bf16 extraction with flip fusion (features.embed_batches): faces/s",
    "two_ranks_share_gpu": "torchrun --nproc_per_node=2 training with both ranks on one GPU "
                           "(FACECOMPAT_DIST_BACKEND=gloo)",
    "gpu_tests": "the gpu-marked tests: FACECOMPAT_TEST_GPU=1 pytest -m gpu (CUDA only)",
}
STEP_NAMES = tuple(STEPS)


# ============================================================================================ runner


def select_steps(only: Sequence[str] | None, skip: Sequence[str] | None) -> list[str]:
    """The step names to run, in order: ``only`` (default all) less ``skip``; unknown names raise."""
    for flag, names in (("--only", only), ("--skip", skip)):
        bad = [n for n in names or () if n not in STEPS]
        if bad:
            raise GpuCheckError(f"{flag}: unknown step {bad[0]!r} (steps: {', '.join(STEP_NAMES)})")
    return [n for n in STEP_NAMES if (not only or n in only) and n not in (skip or ())]


def resolve_check_device(name: str | None, dry_run: bool) -> torch.device:
    """``--device`` -> the device the check runs on: CUDA is required unless ``dry_run``."""
    name = name or ("cpu" if dry_run else "cuda")
    if name not in ("cuda", "cpu"):
        raise GpuCheckError(f"--device {name}: expected cuda or cpu")
    if name == "cpu" and not dry_run:
        raise GpuCheckError("--device cpu: the full-size check needs a GPU; add --dry-run for the tiny "
                            "CPU run")
    if name == "cuda" and not torch.cuda.is_available():
        raise GpuCheckError("--device cuda: torch sees no CUDA GPU here (torch "
                            f"{torch.__version__}); add --dry-run for the tiny CPU run")
    return dist.resolve_device(name)


def run_gpu_check(*, out: Path, device: torch.device, dry_run: bool, reference: Path, steps: Sequence[str],
                  time_budget_s: float, repo: Path, command: Sequence[str] = ()) -> int:
    """Run the selected steps (the others are recorded as skipped); returns the exit status:
    1 when a step failed, else 0. Writes ``out/summary.json`` and ``out/gpu_check.log``."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gpu_check.log", "w", buffering=1) as log_file, _tee(log_file):
        ctx = CheckContext(repo=repo.resolve(), out=out, device=device, dry_run=dry_run,
                           sizes=TINY if dry_run else FULL, reference=reference.resolve(),
                           budget_s=time_budget_s, log_file=log_file)
        summary = _new_summary(ctx, command)
        _say(f"{'dry run' if dry_run else 'full check'} on {device}; out {out}; budget {time_budget_s:g} s")
        _write_summary(ctx, summary)
        try:
            first = True
            for index, name in enumerate(STEP_NAMES, 1):
                why_not = None if name in steps else "not selected (--only/--skip)"
                if why_not is None and not first and ctx.remaining() <= 0:
                    why_not = f"time budget spent ({ctx.elapsed():.0f} s of --time-budget {ctx.budget_s:g})"
                first = first and why_not is not None
                _run_step(ctx, summary, index, name, why_not)
            summary["status"] = "failed" if summary["counts"]["failed"] else "passed"
        except KeyboardInterrupt:
            summary["status"] = "interrupted"
            raise
        finally:
            _teardown(ctx)
            summary.update(finished=_now(), elapsed_s=round(ctx.elapsed(), 1))
            _write_summary(ctx, summary)
            print(format_table(summary), flush=True)
    return 1 if summary["counts"]["failed"] else 0


def _new_summary(ctx: CheckContext, command: Sequence[str]) -> dict:
    steps = {name: {"index": i, "description": STEPS[name], "status": "pending", "seconds": None,
                    "reason": None, "result": {}} for i, name in enumerate(STEP_NAMES, 1)}
    return {"format": FORMAT_VERSION, "status": "running", "started": _now(), "finished": None,
            "elapsed_s": 0.0, "command": list(command), "dry_run": ctx.dry_run, "device": str(ctx.device),
            "out": str(ctx.out), "reference": str(ctx.reference), "time_budget_s": ctx.budget_s,
            "counts": {"passed": 0, "failed": 0, "skipped": 0}, "steps": steps}


def _run_step(ctx: CheckContext, summary: dict, index: int, name: str, why_not: str | None) -> None:
    """Run one step (or record why not), timing it; the summary is rewritten before and after."""
    entry = summary["steps"][name]
    total = len(STEP_NAMES)
    if why_not is not None:
        entry.update(status="skipped", reason=why_not)
    else:
        _say(f"step {index}/{total} {name} ... ({ctx.elapsed():.0f} s elapsed)")
        entry["status"] = "running"
        _write_summary(ctx, summary)
        start = time.perf_counter()
        status, reason, result = _call_step(ctx, name)
        entry.update(status=status, reason=reason, result=result,
                     seconds=round(time.perf_counter() - start, 2))
    summary["counts"][entry["status"]] += 1
    summary["elapsed_s"] = round(ctx.elapsed(), 1)
    _write_summary(ctx, summary)
    detail = entry["reason"] or entry["result"].get("summary", "")
    took = f" ({entry['seconds']:.1f} s)" if entry["seconds"] is not None else ""
    _say(f"step {index}/{total} {name} {entry['status']}{took}{': ' + detail if detail else ''}")


def _call_step(ctx: CheckContext, name: str) -> tuple[str, str | None, dict]:
    """(status, reason, result) of one step; a failure's traceback goes to the log only."""
    try:
        return "passed", None, _jsonable(_STEP_FUNCTIONS[name](ctx))
    except StepSkipped as exc:
        return "skipped", str(exc), _jsonable(exc.result)
    except Exception as exc:  # any failure is this step's finding; the next step still runs
        ctx.log_file.write(f"----- {name} failed -----\n{traceback.format_exc()}\n")
        ctx.log_file.flush()
        if ctx.cuda:  # after an out-of-memory error, give the next step the memory back
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
        return "failed", _one_line(exc), _jsonable(getattr(exc, "result", {}))


def _teardown(ctx: CheckContext) -> None:
    if ctx.group:
        with contextlib.suppress(Exception):
            dist.destroy()
        ctx.group = None


def format_table(summary: dict) -> str:
    """The end-of-run table: one row per step with its status, seconds and summary or reason."""
    rows = [f"{'#':>2}  {'step':<26} {'status':<8} {'seconds':>8}  detail"]
    for name, entry in summary["steps"].items():
        seconds = f"{entry['seconds']:.1f}" if entry["seconds"] is not None else "-"
        detail = entry["reason"] or entry["result"].get("summary", "")
        rows.append(f"{entry['index']:>2}  {name:<26} {entry['status']:<8} {seconds:>8}  {detail}")
    counts = summary["counts"]
    rows.append(f"{summary['status']}: {counts['passed']} passed, {counts['failed']} failed, "
                f"{counts['skipped']} skipped in {summary['elapsed_s']:.0f} s; {summary['out']}/summary.json")
    return "\n".join(rows)


def _write_summary(ctx: CheckContext, summary: dict) -> None:
    with atomic_write(ctx.out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


def _say(line: str) -> None:
    print(f"[gpu_check] {line}", flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars, paths, dtypes and devices turned into JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return str(value)


class _Tee:
    """A text stream that writes to the console stream and the log file."""

    def __init__(self, stream: TextIO, log_file: TextIO):
        self.stream, self.log_file = stream, log_file

    def write(self, text: str) -> int:
        self.log_file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log_file.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def _tee(log_file: TextIO) -> Iterator[None]:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, log_file), _Tee(sys.stderr, log_file)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


_STEP_FUNCTIONS: dict[str, Callable[[CheckContext], dict]] = {
    "versions": step_versions,
    "collectives": step_collectives,
    "ddp": step_ddp,
    "precisions": step_precisions,
    "no_host_sync": step_no_host_sync,
    "fp16_nan_batch": step_fp16_nan_batch,
    "partial_fc_gpu_equals_cpu": step_partial_fc,
    "train_resume": step_train_resume,
    "quickstart_tiny": step_quickstart,
    "step_throughput": step_throughput,
    "extraction": step_extraction,
    "two_ranks_share_gpu": step_two_ranks,
    "gpu_tests": step_gpu_tests,
}
assert tuple(_STEP_FUNCTIONS) == STEP_NAMES
