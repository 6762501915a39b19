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

import contextlib
import copy
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facecompat import dist
from facecompat.compat.base import CompatContext, get_method
from facecompat.compat.bench import make_bench_bank
from facecompat.config import HeadConfig, OptimConfig
from facecompat.data.recordio import atomic_write
from facecompat.data.synthetic_sets import SyntheticSpec, generate_synthetic
from facecompat.eval.extract import embed_batches
from facecompat.heads import PartialFC, build_head
from facecompat.models import get_model
from facecompat.train import checkpoint as ckpt
from facecompat.train.bench import StepBenchSpec, bench_train_step
from facecompat.train.precision import LossScaler, autocast_dtype
from facecompat.train.step import TrainStep, build_optimizer

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
    "extraction": "r50 bf16 extraction with flip fusion (eval.extract.embed_batches): faces/s",
    "two_ranks_share_gpu": "torchrun --nproc_per_node=2 training with both ranks on one GPU "
                           "(FACECOMPAT_DIST_BACKEND=gloo)",
    "gpu_tests": "the gpu-marked tests: FACECOMPAT_TEST_GPU=1 pytest -m gpu (CUDA only)",
}
STEP_NAMES = tuple(STEPS)
PRECISION_TOLERANCE = 0.02  # first-step loss of bf16/fp16 against fp32, relative
THROUGHPUT_TARGET = 1.3  # our bf16 samples/s over insightface's fp16, at rho 1.0
# torchrun / our own world-size-1 group: never handed down to a subprocess
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
             "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


class GpuCheckError(ValueError):
    """A bad request (flag value, missing CUDA); one line naming the flag."""


class StepSkipped(Exception):
    """Raised by a step that does not apply here; the message is the reason."""

    def __init__(self, reason: str, result: dict | None = None):
        super().__init__(reason)
        self.result = result or {}


class CheckFailed(Exception):
    """A step ran but what it checks does not hold; ``result`` keeps the measurements."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result or {}


@dataclass(frozen=True)
class Sizes:
    """How big every step is: :data:`FULL` on the GPU, :data:`TINY` for ``--dry-run``."""

    network: str  # precisions, no_host_sync, step_throughput, extraction
    embedding_size: int
    num_classes: int
    batch_size: int
    small_network: str  # ddp, fp16_nan_batch
    small_classes: int  # fp16_nan_batch, the MixBCT bank of no_host_sync
    small_batch: int
    layouts: tuple[bool, ...]  # channels_last settings timed in step_throughput
    bench_steps: int
    bench_warmup: int
    reference_network: str  # insightface's backbone, same embedding size and batch
    extract_batch: int
    extract_batches: int
    data: dict  # SyntheticSpec fields of the generated training data
    old_network: str  # train_resume's old model (configs/ms1mv3_r18_old.yaml)
    new_network: str  # train_resume's MixBCT model (configs/ms1mv3_mixbct.yaml)
    two_rank_network: str
    two_rank_batch: int  # per rank
    train_embedding: int
    train_batch: int
    train_workers: int
    train_precision: str


FULL = Sizes(network="r50", embedding_size=512, num_classes=93431, batch_size=128, small_network="r18",
             small_classes=2000, small_batch=64, layouts=(False, True), bench_steps=20, bench_warmup=5,
             reference_network="iresnet50", extract_batch=256, extract_batches=16,
             data={"num_ids": 40, "imgs_per_id": (10, 10), "ijbc_subjects": 3, "lfw_pairs": 2,
                   "impostors_per_genuine": 1, "seed": 7, "nuisance": 0.4},
             old_network="r18", new_network="r50", two_rank_network="r18-w0.125", two_rank_batch=16,
             train_embedding=512,
             train_batch=32, train_workers=2, train_precision="bf16")
TINY = Sizes(network="r18-w0.0625", embedding_size=32, num_classes=300, batch_size=8,
             small_network="r18-w0.0625", small_classes=50, small_batch=8, layouts=(False,), bench_steps=2,
             bench_warmup=1, reference_network="iresnet18", extract_batch=8, extract_batches=2,
             data={"num_ids": 24, "imgs_per_id": (8, 8), "ijbc_subjects": 3, "lfw_pairs": 2,
                   "impostors_per_genuine": 1, "seed": 7, "nuisance": 0.4},
             old_network="r18-w0.0625", new_network="r18-w0.0625", two_rank_network="r18-w0.0625",
             two_rank_batch=8, train_embedding=32, train_batch=16, train_workers=0, train_precision="fp32")


@dataclass
class CheckContext:
    """What every step gets: where to write, the device, the sizes, the clock and the shared state."""

    repo: Path
    out: Path
    device: torch.device
    dry_run: bool
    sizes: Sizes
    reference: Path
    budget_s: float
    log_file: TextIO
    start: float = field(default_factory=time.perf_counter)
    group: bool | None = None  # the world-size-1 process group: None not tried, False failed
    data_root: Path | None = None  # the generated data set, once made
    data_counts: dict | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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


# ======================================================================================= shared parts


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_group(ctx: CheckContext) -> bool:
    """The world-size-1 process group of the in-process steps, joined once through
    :func:`facecompat.dist.init_distributed` (the torchrun variables are set only for the call).
    Raises what the init raised the first time; False afterwards when it failed."""
    if ctx.group is not None:
        return ctx.group
    ctx.group = False
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        dist.init_distributed(backend="nccl" if ctx.cuda else "gloo", timeout_s=120.0)
        ctx.group = dist.is_initialized()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return ctx.group


def _require_group(ctx: CheckContext) -> None:
    if not _ensure_group(ctx):
        raise StepSkipped("no process group (the collectives step could not start one)")


def _sync(ctx: CheckContext) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


@contextlib.contextmanager
def _backend_flags(*, benchmark: bool, tf32: bool) -> Iterator[None]:
    """cuDNN autotuning and TF32 (matmul and cuDNN) set for a block, restored after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32
    cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = benchmark, tf32, tf32
    try:
        yield
    finally:
        cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = saved


def _random_batch(num: int, num_classes: int, device: torch.device, seed: int = 0,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` images in [-1, 1] (as the loaders normalise them) and labels, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(num, 3, 112, 112, generator=gen).clamp_(-1, 1)
    labels = torch.randint(0, num_classes, (num,), generator=gen)
    return images.to(device), labels.to(device)


@dataclass
class _Built:
    step: TrainStep
    backbone: nn.Module
    head: PartialFC
    scaler: LossScaler
    method: nn.Module | None = None


def _build_train_step(ctx: CheckContext, *, network: str, num_classes: int, precision: str,
                      view: Any = None, bank: Any = None) -> _Built:
    """Backbone, Partial FC head, optimiser and :class:`TrainStep` as the trainer builds them for one
    rank (no DDP at world size 1; the head checks labels per step on the CPU only), with MixBCT between
    backbone and head when ``bank`` is given (``view``: its records, as compat/bench.py builds it)."""
    torch.manual_seed(0)
    size = ctx.sizes.embedding_size
    backbone = get_model(network, size).to(ctx.device)
    head = build_head(HeadConfig(), num_classes=num_classes, embedding_size=size, seed=0,
                      check_labels=ctx.device.type == "cpu").to(ctx.device)
    method = None
    if bank is not None:
        method_ctx = CompatContext(params={}, weight=1.0, view=view, head=head, embedding_size=size,
                                   device=ctx.device, seed=0, bank=bank)
        method = get_method("mixbct")(method_ctx).to(ctx.device)
    optim = OptimConfig()
    optimizer = build_optimizer(backbone, head, optim, ctx.device, compat=method)
    scaler = LossScaler(enabled=precision == "fp16")
    step = TrainStep(backbone, backbone, head, optimizer, scaler, amp_dtype=autocast_dtype(precision),
                     channels_last=False, grad_clip=optim.grad_clip, world_size=dist.get_world_size(),
                     compat=method)
    return _Built(step, backbone, head, scaler, method)


def _subprocess_env(ctx: CheckContext, **extra: str) -> dict[str, str]:
    """This process's environment without torchrun's variables, the repo on PYTHONPATH, unbuffered."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("TORCHELASTIC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ctx.repo), os.environ.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _run_logged(ctx: CheckContext, name: str, args: Sequence[str], *, cap_s: float,
                env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run ``args`` in the repo with its output in ``<out>/logs/<name>.log`` (then appended to the
    main log); a run past ``min(cap_s, the budget left)`` (at least 30 s) is killed with its process
    group and fails the step. Returns (exit status, output, seconds)."""
    path = ctx.out / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    _release(ctx)  # the GPU memory this process caches, for the subprocess
    timeout = max(30.0, min(cap_s, ctx.remaining()))
    start = time.perf_counter()
    with open(path, "w") as f:
        f.write(f"$ {shlex.join(args)}\n")
        f.flush()
        proc = subprocess.Popen(list(args), cwd=ctx.repo, env=env or _subprocess_env(ctx), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    seconds = time.perf_counter() - start
    text = path.read_text(errors="replace")
    ctx.log_file.write(f"----- {name}: exit {status} after {seconds:.1f} s -----\n{text}\n")
    ctx.log_file.flush()
    if status is None:
        raise CheckFailed(f"{name}: no exit after {timeout:.0f} s, killed (output: {path})")
    return status, text, seconds


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this check started for ``proc`` (torchrun and its workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _last_lines(text: str, num: int = 1) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-num:]) if lines else "(no output)"


def _ensure_data(ctx: CheckContext) -> Path:
    """The generated data set of the training steps, made once per run under ``<out>/data``."""
    if ctx.data_root is None:
        root = ctx.out / "data"
        workers = min(8, os.cpu_count() or 1)
        manifest, _ = generate_synthetic(root, SyntheticSpec(**ctx.sizes.data), workers=workers, force=True,
                                         progress=False)
        ctx.data_root = root
        ctx.data_counts = manifest["counts"]["train"]
    return ctx.data_root


# ============================================================================= 1-3: environment, dist


def step_versions(ctx: CheckContext) -> dict:
    """Versions of everything the GPU path uses, the GPU, and which optional modules import."""
    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": _nccl_version(), "nccl_available": torch.distributed.is_nccl_available(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "modules": {name: _module_version(name) for name in
                    ("numpy", "cv2", "yaml", "onnx", "onnxruntime", "nvidia.dali", "faiss")},
    }
    out["dali_imports"] = "version" in out["modules"]["nvidia.dali"]
    out["faiss_imports"] = "version" in out["modules"]["faiss"]
    gpu = "no GPU"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        out["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                      "bf16": torch.cuda.is_bf16_supported()}
        gpu = f"{props.name} {out['gpu']['memory_gib']} GiB sm_{props.major}{props.minor}"
    out["summary"] = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {out['cudnn']}, "
                      f"NCCL {out['nccl']}; {gpu}; DALI {'yes' if out['dali_imports'] else 'no'}, "
                      f"faiss {'yes' if out['faiss_imports'] else 'no'}")
    return out


def _nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # a CPU build has no NCCL
        return None
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def _module_version(name: str) -> dict:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # absent or broken: both are "does not import"
        return {"error": _one_line(exc)}
    return {"version": str(getattr(module, "__version__", "unknown"))}


def step_collectives(ctx: CheckContext) -> dict:
    """Every collective of :mod:`facecompat.dist` on a real world-size-1 group (the group stays up
    for the later in-process steps)."""
    if not _ensure_group(ctx):
        raise CheckFailed("init_distributed returned without a process group")
    device = ctx.device
    local = torch.randn(4, 8, device=device, requires_grad=True)
    gathered = dist._AllGatherWithGrad.apply(local, None)  # all_gather_with_grad skips it at world size 1
    upstream = torch.randn_like(gathered)
    gathered.backward(upstream)
    full = torch.randn(6, 3, device=device)
    obj = {"step": 2, "names": ["a", "b"], "value": 0.5}
    dist.barrier()
    values = torch.arange(5.0, device=device)
    checks = {
        "all_gather_with_grad_forward": torch.equal(gathered.detach(), local.detach()),
        "all_gather_with_grad_backward": torch.equal(local.grad, upstream),
        "reduce_scatter": torch.equal(dist._reduce_scatter_sum(full, None), full),
        "broadcast_object": dist.broadcast_object(obj) == obj,
        "barrier": True,
        "all_reduce_flag": dist.all_reduce_flag(True) is True and dist.all_reduce_flag(False) is False,
        "all_reduce_": all(torch.equal(dist.all_reduce_(values.clone(), op), values)
                           for op in ("sum", "max", "min")),
        "all_reduce_max": dist.all_reduce_max(7) == 7,
    }
    backend = str(torch.distributed.get_backend())
    result = {"backend": backend, "world_size": dist.get_world_size(), "checks": checks,
              "all_gather_op": "all_gather_single" if hasattr(torch.distributed, "all_gather_single")
              else "all_gather_into_tensor",
              "reduce_scatter_fallback": backend in dist._NO_REDUCE_SCATTER,
              "note": "all_reduce_flag and all_reduce_ return early at world size 1; all_reduce_max and the "
                      "gather/scatter/broadcast/barrier calls reach the backend"}
    bad = [name for name, ok in checks.items() if not ok]
    verdict = f"WRONG {', '.join(bad)}" if bad else f"{len(checks)} checks ok"
    result["summary"] = f"{backend}, world size 1: {verdict}"
    if bad:
        raise CheckFailed(f"wrong results: {', '.join(bad)}", result)
    return result


def step_ddp(ctx: CheckContext) -> dict:
    """:func:`facecompat.dist.data_parallel` (the trainer's wrapper): construction warnings about its
    buffer argument, forward/backward, gradients against an unwrapped copy."""
    _require_group(ctx)
    torch.manual_seed(0)
    backbone = get_model(ctx.sizes.small_network, ctx.sizes.embedding_size).to(ctx.device)
    plain = copy.deepcopy(backbone)
    keyword = ("forward_sync_buffers" if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = dist.data_parallel(backbone, ctx.device)
    images, _ = _random_batch(ctx.sizes.small_batch, 1, ctx.device, seed=1)
    for module in (model, plain):
        module(images).square().mean().backward()
    diff, scale = _grad_difference(backbone, plain)
    messages = [str(w.message).splitlines()[0] for w in caught]
    result = {"torch": torch.__version__, "buffer_argument": f"{keyword}=False",
              "device_ids": getattr(model, "device_ids", None),
              "gradient_as_bucket_view": getattr(model, "gradient_as_bucket_view", None),
              "warnings": messages[:5], "grad_max_abs_diff": diff, "grad_max_abs": scale}
    result["summary"] = f"{keyword}=False accepted; grad diff {diff:.2e} of max {scale:.2e}"
    about_args = [m for m in messages if "broadcast_buffers" in m or "forward_sync_buffers" in m]
    if about_args:
        raise CheckFailed(f"DDP warned about its buffer argument: {about_args[0]}", result)
    if not diff <= 1e-3 * scale + 1e-6:
        raise CheckFailed(f"DDP gradients differ from the plain module's by {diff:.3e} (max {scale:.3e})",
                          result)
    return result


def _grad_difference(a: nn.Module, b: nn.Module) -> tuple[float, float]:
    """(max |grad_a - grad_b|, max |grad_b|) over parameters with gradients."""
    diff = scale = 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        if pa.grad is None or pb.grad is None:
            continue
        diff = max(diff, float((pa.grad - pb.grad).abs().max()))
        scale = max(scale, float(pb.grad.abs().max()))
    return diff, scale


# ============================================================================== 4-7: the train step


PRECISIONS = (("fp32", False), ("bf16", False), ("bf16", True), ("fp16", False))


def step_precisions(ctx: CheckContext) -> dict:
    """First-step loss of the same backbone, head and batch in each precision
    (:func:`facecompat.train.bench.bench_train_step` with one step, no warm-up; TF32 off)."""
    s = ctx.sizes
    rows: dict[str, dict] = {}
    with _backend_flags(benchmark=False, tf32=False):
        for precision, channels_last in PRECISIONS:
            spec = StepBenchSpec(network=s.network, embedding_size=s.embedding_size, batch_size=s.batch_size,
                                 num_classes=s.num_classes, precision=precision, channels_last=channels_last,
                                 steps=1, warmup=0)
            r = bench_train_step(spec, ctx.device)
            label = precision + ("+channels_last" if channels_last else "")
            rows[label] = {"loss": r["loss"], "channels_last": r["channels_last"],
                           "peak_memory_gib": r["peak_memory_gib"]}
    reference = rows["fp32"]["loss"]
    for row in rows.values():
        row["rel_diff"] = abs(row["loss"] - reference) / abs(reference)
    bad = [k for k, r in rows.items()
           if not math.isfinite(r["loss"]) or not r["rel_diff"] <= PRECISION_TOLERANCE]
    result = {"network": s.network, "num_classes": s.num_classes, "batch_size": s.batch_size,
              "tolerance": PRECISION_TOLERANCE, "losses": rows}
    result["summary"] = "; ".join(f"{k} {r['loss']:.4f} ({100 * r['rel_diff']:.2f}%)"
                                  for k, r in rows.items())
    if bad:
        raise CheckFailed(f"first-step loss off fp32's by more than {100 * PRECISION_TOLERANCE:g}%: "
                          + ", ".join(f"{k} {rows[k]['loss']:.4f}" for k in bad), result)
    return result


def step_no_host_sync(ctx: CheckContext) -> dict:
    """A warmed-up bf16 step under ``torch.cuda.set_sync_debug_mode("error")``, plain (r50, the full
    head) and with MixBCT over a generated old-feature bank; any synchronising call is a finding."""
    if not ctx.cuda:
        raise StepSkipped("CUDA only")
    s = ctx.sizes
    built = _build_train_step(ctx, network=s.network, num_classes=s.num_classes, precision="bf16")
    images, labels = _random_batch(s.small_batch, s.num_classes, ctx.device)
    found = {"plain": _sync_free(ctx, built.step, [(images, labels)])}
    del built
    with tempfile.TemporaryDirectory(dir=ctx.out, prefix="bank-") as tmp:
        view, bank = make_bench_bank(Path(tmp) / "bank", num_records=2 * s.small_classes,
                                     num_classes=s.small_classes, embedding_size=s.embedding_size)
        bank.class_stats()
        built = _build_train_step(ctx, network=s.network, num_classes=view.num_classes, precision="bf16",
                                  view=view, bank=bank)
        micro = _mixbct_batch(ctx, built, view, s.small_batch, images)
        found["mixbct"] = _sync_free(ctx, built.step, [micro])
        del built, bank
    bad = {k: v for k, v in found.items() if v["host_sync"]}
    result = {"network": s.network, "batch_size": s.small_batch, "warmup_steps": 2, "steps": found,
              "scope": "TrainStep.__call__ (inputs already on the GPU; head built with check_labels=False "
                       "as the trainer does on GPU; rho 1.0)"}
    result["summary"] = "no host sync in plain and MixBCT bf16 steps" if not bad else "; ".join(
        f"{k}: {v['error']} at {v['where']}" for k, v in bad.items())
    if bad:
        raise CheckFailed("host sync in a bf16 step: " + result["summary"], result)
    return result


def _mixbct_batch(ctx: CheckContext, built: _Built, view: Any, num: int, images: torch.Tensor) -> tuple:
    """(images, labels, inputs) of ``num`` bank records, the method's inputs already on the device."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(view.num_images, size=num, replace=False))
    labels = view.labels[rows]
    inputs = built.method.batch_inputs(view.record_ids[rows], rng.random(num) < 0.5, labels)
    return images, torch.from_numpy(labels).to(ctx.device), {k: v.to(ctx.device) for k, v in inputs.items()}


def _sync_free(ctx: CheckContext, step: TrainStep, micro: list, warmup: int = 2) -> dict:
    """Run ``warmup`` steps, then one under sync debug mode "error": whether it synchronised, where."""
    for _ in range(warmup):
        step(micro)
    torch.cuda.synchronize(ctx.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(micro)
    except Exception as exc:  # the synchronising call's error is the finding
        return {"host_sync": True, "error": _one_line(exc), "where": _innermost_project_frame(exc, ctx.repo)}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(ctx.device)
    return {"host_sync": False}


def _innermost_project_frame(exc: BaseException, repo: Path) -> str:
    """``file:line in function`` of the deepest traceback frame inside the repo."""
    where = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        if path.is_relative_to(repo):
            where = f"{path.relative_to(repo)}:{frame.lineno} in {frame.name}"
    return where


def step_fp16_nan_batch(ctx: CheckContext) -> dict:
    """An fp16 step on a batch holding NaN, after clean steps have brought the loss scale down to
    where a clean step passes (it starts at 2^16, above what a fresh model's fp16 gradients hold):
    skipped (found_inf), parameters unchanged, scale halved; the next clean step is reported."""
    s = ctx.sizes
    built = _build_train_step(ctx, network=s.small_network, num_classes=s.small_classes, precision="fp16")
    images, labels = _random_batch(s.small_batch, s.small_classes, ctx.device)
    calibration = _first_clean_step(built, [(images, labels)])
    poisoned = images.clone()
    poisoned[0, :, :8, :8] = float("nan")
    params = [*built.backbone.parameters(), *built.head.parameters()]
    before = [p.detach().clone() for p in params]
    scale_before = float(built.scaler.scale_value)
    _, found_inf = built.step([(poisoned, labels)])
    unchanged = all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    scale_after = float(built.scaler.scale_value)
    buffers_finite = all(bool(torch.isfinite(b).all())
                         for b in built.backbone.buffers() if b.is_floating_point())
    _, clean_inf = built.step([(images, labels)])
    moved = any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    result = {"clean_steps_skipped_before": calibration, "found_inf": bool(found_inf),
              "params_unchanged": unchanged, "scale_before": scale_before, "scale_after": scale_after,
              "bn_buffers_finite_after_nan_batch": buffers_finite,
              "next_clean_step": {"found_inf": bool(clean_inf), "params_moved": moved}}
    problems = _nan_step_problems(result, float(getattr(built.scaler, "backoff_factor", 0.5)))
    result["summary"] = "; ".join(problems) if problems else (
        f"skipped, weights and BN statistics unchanged, scale {scale_before:g} -> {scale_after:g}; "
        f"next clean step {'skipped' if clean_inf else 'taken'}")
    if problems:
        raise CheckFailed("; ".join(problems), result)
    return result


def _first_clean_step(built: _Built, micro: list, limit: int = 24) -> int:
    """Steps on the clean batch until one is taken; returns how many were skipped before it."""
    for skipped in range(limit):
        if not bool(built.step(micro)[1]):
            return skipped
    raise CheckFailed(f"{limit} clean fp16 steps in a row were skipped (loss scale now "
                      f"{float(built.scaler.scale_value):g})")


def _nan_step_problems(result: dict, backoff: float) -> list[str]:
    problems = []
    if not result["found_inf"]:
        problems.append("the NaN batch's step was not skipped (found_inf False)")
    if not result["params_unchanged"]:
        problems.append("parameters changed")
    if not result["bn_buffers_finite_after_nan_batch"]:
        problems.append("BatchNorm running statistics non-finite after the skipped step")
    if not math.isclose(result["scale_after"], result["scale_before"] * backoff):
        problems.append(f"loss scale {result['scale_before']:g} -> {result['scale_after']:g}, "
                        f"expected x{backoff:g}")
    return problems


def step_partial_fc(ctx: CheckContext) -> dict:
    """The same head weights, embeddings and labels on two devices/dtypes: loss, embedding and weight
    gradients. On a GPU: CUDA float32 against CPU float32 (TF32 off). Dry run: CPU float32 against
    CPU float64. At rho < 1 the second side runs rho 1 over exactly the rows the first one sampled
    (its generator state is replayed through ``sample_classes``): the CPU and CUDA generators draw
    different streams, so the same seed cannot give the same sample."""
    s = ctx.sizes
    cpu = torch.device("cpu")
    first, second = ((ctx.device, torch.float32), (cpu, torch.float32)) if ctx.cuda else \
        ((cpu, torch.float32), (cpu, torch.float64))
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(s.batch_size, s.embedding_size, generator=gen)
    labels = torch.randint(0, s.num_classes, (s.batch_size,), generator=gen)
    result: dict[str, Any] = {"compared": f"{first[0].type} {first[1]} vs {second[0].type} {second[1]}",
                              "num_classes": s.num_classes, "batch_size": s.batch_size, "tolerance": 1e-4}
    with _backend_flags(benchmark=False, tf32=False):
        for rate in (1.0, 0.1):
            result[f"rho_{rate}"] = _compare_heads(s, emb, labels, rate, first, second)
    bad = [k for k, r in result.items() if k.startswith("rho_") and not r["ok"]]
    result["summary"] = f"{result['compared']}: " + ", ".join(
        f"{k} loss {r['loss_rel_diff']:.1e}, grads {r['emb_grad_rel_diff']:.1e} / "
        f"{r['weight_grad_rel_diff']:.1e}"
        for k, r in result.items() if k.startswith("rho_"))
    if bad:
        raise CheckFailed(f"loss or gradients differ beyond 1e-4 (relative): {', '.join(bad)}", result)
    return result


def _head_pass(head: PartialFC, emb: torch.Tensor, labels: torch.Tensor, device: torch.device,
               dtype: torch.dtype) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d emb, d loss / d weight) of ``head`` on ``device`` in ``dtype``, as float64 CPU."""
    x = emb.to(device, dtype, copy=True).requires_grad_(True)
    loss = head(x, labels.to(device))
    loss.backward()
    return float(loss.detach()), x.grad.detach().cpu().double(), head.weight.grad.detach().cpu().double()


def _compare_heads(s: Sizes, emb: torch.Tensor, labels: torch.Tensor, rate: float,
                   first: tuple[torch.device, torch.dtype], second: tuple[torch.device, torch.dtype]) -> dict:
    head = PartialFC(s.embedding_size, s.num_classes, sample_rate=rate, seed=0).to(*first)
    state = head.generator.get_state()
    loss_a, emb_grad_a, weight_grad_a = _head_pass(head, emb, labels, *first)
    rows, labels_b = None, labels
    if rate < 1.0:
        head.generator.set_state(state)
        rows = head.sample_classes(labels.to(first[0])).cpu()
        labels_b = torch.searchsorted(rows, labels)  # every label is a positive, so among the rows
    weight = head.weight.detach().cpu() if rows is None else head.weight.detach().cpu()[rows]
    other = PartialFC(s.embedding_size, weight.shape[0], sample_rate=1.0, seed=0).to(*second)
    with torch.no_grad():
        other.weight.copy_(weight.to(*second))
    loss_b, emb_grad_b, weight_grad_b = _head_pass(other, emb, labels_b, *second)
    kept = weight_grad_a if rows is None else weight_grad_a[rows]
    unsampled = 0.0
    if rows is not None:
        mask = torch.ones(weight_grad_a.shape[0], dtype=torch.bool)
        mask[rows] = False
        unsampled = float(weight_grad_a[mask].abs().max()) if bool(mask.any()) else 0.0
    out = {"loss": [loss_a, loss_b], "loss_rel_diff": abs(loss_a - loss_b) / abs(loss_b),
           "emb_grad_max_abs_diff": float((emb_grad_a - emb_grad_b).abs().max()),
           "emb_grad_rel_diff": _rel(emb_grad_a, emb_grad_b),
           "weight_grad_max_abs_diff": float((kept - weight_grad_b).abs().max()),
           "weight_grad_rel_diff": _rel(kept, weight_grad_b),
           "sampled_rows": int(weight.shape[0]), "unsampled_rows_grad_max_abs": unsampled}
    out["ok"] = (out["loss_rel_diff"] <= 1e-4 and out["emb_grad_rel_diff"] <= 1e-4
                 and out["weight_grad_rel_diff"] <= 1e-4 and unsampled == 0.0)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|."""
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


# ======================================================================= 8-9: training, quickstart


def _train_args(ctx: CheckContext, config: str, overrides: Sequence[str], nproc: int | None) -> list[str]:
    """``tools/train.py configs/<config> --set ...``, under torchrun with ``nproc`` processes when given."""
    launch = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    sets = [x for o in overrides for x in ("--set", o)]
    return [*launch, str(ctx.repo / "tools" / "train.py"), str(ctx.repo / "configs" / config), *sets]


def _train_overrides(ctx: CheckContext, *, network: str, exp_name: str, epochs: int) -> list[str]:
    """The recipes pointed at the generated data, small, deterministic, without DALI or verification."""
    s = ctx.sizes
    return [f"data.rec={ctx.data_root / 'train'}", "data.loader=torch", "data.val_targets=[]",
            f"data.num_workers={s.train_workers}", f"data.batch_size={s.train_batch}",
            f"model.network={network}", f"model.embedding_size={s.train_embedding}",
            f"model.precision={s.train_precision}", "head.scale=32.0",  # s = 64 needs many classes
            "train.deterministic=true", f"train.output={ctx.out / 'runs'}", f"train.exp_name={exp_name}",
            f"train.epochs={epochs}", "train.log_every=1"]


def _train(ctx: CheckContext, name: str, config: str, overrides: Sequence[str], nproc: int | None,
           env: dict[str, str] | None = None) -> float:
    """Run one training; a non-zero exit fails the step with its last lines. Returns its seconds."""
    status, text, seconds = _run_logged(ctx, name, _train_args(ctx, config, overrides, nproc), cap_s=300,
                                        env=env or _subprocess_env(ctx, CUBLAS_WORKSPACE_CONFIG=":4096:8"))
    if status != 0:
        raise CheckFailed(f"{name}: exit {status}: {_last_lines(text)}")
    return seconds


def step_train_resume(ctx: CheckContext) -> dict:
    """An old model, then MixBCT (configs/ms1mv3_mixbct.yaml) under torchrun: one epoch (its step
    count S fixes the rest); two epochs uninterrupted with a checkpoint at S + S // 2 (mid-epoch, kept:
    the last two are kept); a fresh run whose run directory holds only a copy of that checkpoint, the
    state a run killed right after writing it leaves, resumed with train.resume=auto. model.pt of the
    resumed and the uninterrupted runs must be equal on the CPU; on a GPU (deterministic mode) their
    max difference must stay under 1% of what the weights moved after the checkpoint."""
    s = ctx.sizes
    _ensure_data(ctx)
    runs = ctx.out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    seconds = {"old": _train(ctx, "train_old", "ms1mv3_r18_old.yaml", _train_overrides(
        ctx, network=s.old_network, exp_name="old", epochs=1), None)}

    def mix(name: str, epochs: int, *extra: str) -> list[str]:
        return [*_train_overrides(ctx, network=s.new_network, exp_name=name, epochs=epochs),
                f"compat.old.checkpoint={runs / 'old'}", *extra]

    seconds["one_epoch"] = _train(ctx, "train_mixbct_one_epoch", "ms1mv3_mixbct.yaml", mix("one_epoch", 1), 1)
    per_epoch = _checkpoint_step(runs / "one_epoch")
    if per_epoch < 2:
        raise CheckFailed(f"one epoch is {per_epoch} step(s): too few for a mid-epoch checkpoint")
    mid = per_epoch + per_epoch // 2
    every = f"train.checkpoint_every={mid}"
    seconds["uninterrupted"] = _train(ctx, "train_mixbct_uninterrupted", "ms1mv3_mixbct.yaml",
                                      mix("uninterrupted", 2, every), 1)
    kept = runs / "uninterrupted" / "checkpoints" / f"step_{mid:08d}"
    if not kept.is_dir():
        raise CheckFailed(f"{kept}: the mid-epoch checkpoint is not there (kept: "
                          f"{[p.name for p in ckpt.list_checkpoints(runs / 'uninterrupted')]})")
    shutil.copytree(kept, runs / "resumed" / "checkpoints" / kept.name)
    seconds["resumed"] = _train(ctx, "train_mixbct_resumed", "ms1mv3_mixbct.yaml",
                                mix("resumed", 2, every, "train.resume=auto"), 1)
    result = {"steps_per_epoch": per_epoch, "resumed_from_step": mid, "total_steps": 2 * per_epoch,
              "seconds": seconds, "data": ctx.data_counts, "networks": [s.old_network, s.new_network],
              "precision": s.train_precision, **_compare_runs(runs / "resumed", runs / "uninterrupted", kept)}
    log = (runs / "resumed" / "train.log").read_text(errors="replace")
    result["resume_logged"] = "resumed from" in log
    return _judge_resume(ctx, result)


def _checkpoint_step(run_dir: Path) -> int:
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise CheckFailed(f"{run_dir}: no checkpoint after training")
    return int(ckpt.read_meta(latest)["step"])


def _compare_runs(resumed: Path, reference: Path, mid: Path) -> dict:
    """Max |difference| of the two runs' model.pt (float tensors; others must be equal), the same for
    the head weights of their last checkpoints, and how far model.pt moved from ``mid``'s backbone."""
    a = torch.load(resumed / "model.pt", map_location="cpu", weights_only=True)
    b = torch.load(reference / "model.pt", map_location="cpu", weights_only=True)
    at_mid = ckpt.load_common(mid)["backbone"]
    if a.keys() != b.keys():
        raise CheckFailed(f"model.pt keys differ: {sorted(set(a) ^ set(b))[:3]}")
    diff = movement = 0.0
    unequal = []
    for key, value in b.items():
        if value.is_floating_point():
            diff = max(diff, float((a[key].double() - value.double()).abs().max()))
            movement = max(movement, float((at_mid[key].double() - value.double()).abs().max()))
        elif not torch.equal(a[key], value):
            unequal.append(key)
    head_diff = float((_final_head(resumed) - _final_head(reference)).abs().max())
    return {"model_max_abs_diff": diff, "model_unequal_integer_tensors": unequal,
            "head_max_abs_diff": head_diff, "movement_after_checkpoint": movement}


def _final_head(run_dir: Path) -> torch.Tensor:
    """The head weights of a one-rank run's last checkpoint, float64."""
    shard = torch.load(ckpt.latest_checkpoint(run_dir) / "rank_000.pt", map_location="cpu", weights_only=True)
    return shard["head_weight"].double()


def _judge_resume(ctx: CheckContext, result: dict) -> dict:
    diff, movement = result["model_max_abs_diff"], result["movement_after_checkpoint"]
    if ctx.cuda:
        tolerance = 0.01 * movement
        result["criterion"] = ("max |resumed - uninterrupted| <= 1% of the max weight change after the "
                               "checkpoint (train.deterministic)")
    else:
        tolerance = 0.0
        result["criterion"] = "bit-identical (CPU, train.deterministic)"
    result["tolerance"] = tolerance
    ok = (diff <= tolerance and not result["model_unequal_integer_tensors"] and result["resume_logged"]
          and (ctx.cuda or result["head_max_abs_diff"] == 0.0))
    result["summary"] = (f"{result['total_steps']} steps, resumed at {result['resumed_from_step']}: "
                         f"model diff {diff:.2e} (moved {movement:.2e}), "
                         f"head diff {result['head_max_abs_diff']:.2e}")
    if not ok:
        why = "the resumed run did not log a resume; " if not result["resume_logged"] else ""
        raise CheckFailed(f"{why}resumed != uninterrupted: {result['summary']}", result)
    return result


def step_quickstart(ctx: CheckContext) -> dict:
    """``tools/quickstart.py --size tiny --force`` into ``<out>/quickstart``: wall time and verdict."""
    work = ctx.out / "quickstart"
    args = [sys.executable, str(ctx.repo / "tools" / "quickstart.py"), "--size", "tiny", "--device",
            ctx.device.type, "--work-dir", str(work), "--force", "--configs", str(ctx.repo / "configs")]
    status, text, seconds = _run_logged(ctx, "quickstart_tiny", args, cap_s=360,
                                        env=_subprocess_env(ctx, TQDM_DISABLE="1"))
    lines = text.splitlines()
    begin = next((i for i, line in enumerate(lines) if line.startswith("quickstart (")), len(lines))
    report = work / "report.json"
    result = {"seconds": round(seconds, 1), "exit": status, "work_dir": str(work),
              "report_json": str(report) if report.is_file() else None,
              "stages": lines[begin] if begin < len(lines) else None,
              "verdict": [line for line in lines[begin + 1:] if line.strip()][:40]}
    if status != 0:
        raise CheckFailed(f"exit {status}: {_last_lines(text)}", result)
    if report.is_file():
        result["ecc"] = json.loads(report.read_text()).get("ecc")
    result["summary"] = f"{seconds:.0f} s; {report}"
    return result


# ===================================================================== 10-13: speed, extraction, ranks


def step_throughput(ctx: CheckContext) -> dict:
    """Our step (:func:`bench_train_step`) in bf16 and fp16 at every rho (and layout), and
    insightface's fp16 step from ``--reference`` in the same process; ratios of samples/s. The
    reference copy is loaded first, so that a broken one fails the step at once."""
    s = ctx.sizes
    ref = load_reference(ctx.reference) if ctx.reference.is_dir() else None
    ours = _time_ours(ctx)
    _release(ctx)
    reference = _reference_throughput(ctx, ref)
    result = {"network": s.network, "batch_size": s.batch_size, "num_classes": s.num_classes,
              "steps": s.bench_steps, "warmup": s.bench_warmup, "ours": ours, "reference": reference,
              "target": THROUGHPUT_TARGET, **_throughput_ratios(ours, reference)}
    result["summary"] = _throughput_line(result)
    return result


def _time_ours(ctx: CheckContext) -> dict[str, dict]:
    """``{"<precision>[+channels_last]@<rho>": samples/s, ms/step, peak memory, loss}``."""
    s = ctx.sizes
    ours: dict[str, dict] = {}
    with _backend_flags(benchmark=True, tf32=True):  # as the trainer sets them (train.deterministic off)
        for rate in (1.0, 0.1):
            for precision in ("bf16", "fp16"):
                for channels_last in s.layouts:
                    spec = StepBenchSpec(network=s.network, embedding_size=s.embedding_size,
                                         batch_size=s.batch_size, num_classes=s.num_classes, sample_rate=rate,
                                         precision=precision, channels_last=channels_last,
                                         steps=s.bench_steps, warmup=s.bench_warmup)
                    r = bench_train_step(spec, ctx.device)
                    ours[f"{precision}{'+channels_last' if channels_last else ''}@{rate}"] = {
                        k: r[k] for k in ("samples_per_s", "ms_per_step", "peak_memory_gib", "loss")}
    return ours


def _throughput_ratios(ours: dict, reference: dict) -> dict:
    """Per rho, each of our variants' samples/s over insightface's; whether the best bf16 meets the
    target at rho 1.0 (None when the reference was not timed)."""
    ratios: dict[str, dict] = {}
    for key, row in ours.items():
        variant, rate = key.split("@")
        ref = reference.get(f"rho_{rate}", {}).get("samples_per_s")
        if ref:
            ratios.setdefault(f"rho_{rate}", {})[variant] = round(row["samples_per_s"] / ref, 3)
    best = max((v for k, v in ratios.get("rho_1.0", {}).items() if k.startswith("bf16")), default=None)
    return {"ratios": ratios, "best_bf16_ratio_rho_1.0": best,
            "target_met": None if best is None else best >= THROUGHPUT_TARGET}


def _throughput_line(result: dict) -> str:
    ours = ", ".join(f"{k} {v['samples_per_s']:.0f}/s" for k, v in result["ours"].items())
    ref = result["reference"]
    if "skipped" in ref:
        return f"{ours}; reference: {ref['skipped']}"
    theirs = ", ".join(f"{k} {v['samples_per_s']:.0f}/s" for k, v in ref.items() if isinstance(v, dict))
    met = result["target_met"]
    verdict = f"best bf16/ref at rho 1.0 {result['best_bf16_ratio_rho_1.0']} " \
              f"(target >= {THROUGHPUT_TARGET}: {'met' if met else 'NOT met'})"
    return f"{ours}; insightface fp16 {theirs}; {verdict}"


def _release(ctx: CheckContext) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


def load_reference(directory: Path) -> SimpleNamespace:
    """insightface's ``backbones/iresnet.py``, ``partial_fc_v2.py`` and ``losses.py`` from ``directory``
    (a copy of recognition/arcface_torch; never part of this project), loaded with ``directory`` on
    sys.path for the time of the import (they import each other as top-level modules)."""
    files = {"iresnet": directory / "backbones" / "iresnet.py",
             "partial_fc_v2": directory / "partial_fc_v2.py", "losses": directory / "losses.py"}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"--reference {directory}: {path.relative_to(directory)} is missing")
    sys.path.insert(0, str(directory))
    try:
        return SimpleNamespace(**{name: _load_module(f"_gpu_check_reference_{name}", path)
                                  for name, path in files.items()})
    finally:
        sys.path.remove(str(directory))


def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_throughput(ctx: CheckContext, ref: SimpleNamespace | None) -> dict:
    """insightface's step per rho (``ref`` from :func:`load_reference`, None when the copy is absent),
    or ``{"skipped": reason}``; a copy that does not build raises (the step fails)."""
    if ref is None:
        return {"skipped": f"reference copy absent (--reference {ctx.reference})"}
    if not _ensure_group(ctx):
        return {"skipped": "no process group (insightface's PartialFC_V2 requires torch.distributed)"}
    if not ctx.cuda:
        _reference_smoke(ctx, ref)
        return {"skipped": "timing needs CUDA (PartialFC_V2.forward calls .cuda()); on the CPU the copy was "
                           f"loaded, {ctx.sizes.reference_network} ran forward and PartialFC_V2 was built"}
    out = {}
    with _backend_flags(benchmark=True, tf32=False):  # train_v2.py: cudnn.benchmark, TF32 at defaults
        for rate in (1.0, 0.1):
            out[f"rho_{rate}"] = _time_reference(ctx, ref, rate)
            _release(ctx)
    return out


def _reference_modules(ctx: CheckContext, ref: SimpleNamespace, rate: float) -> tuple[nn.Module, nn.Module]:
    """insightface's backbone (``fp16=True``, as train_v2.py with cfg.fp16) and PartialFC_V2 (its fp16
    argument False, as train_v2.py passes) with CombinedMarginLoss(64, 1.0, 0.5, 0.0)."""
    s = ctx.sizes
    torch.manual_seed(0)
    backbone = getattr(ref.iresnet, s.reference_network)(False, dropout=0.0, fp16=True,
                                                         num_features=s.embedding_size)
    margin = ref.losses.CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0)
    head = ref.partial_fc_v2.PartialFC_V2(margin, s.embedding_size, s.num_classes, rate, False)
    return backbone.to(ctx.device).train(), head.to(ctx.device).train()


def _reference_smoke(ctx: CheckContext, ref: SimpleNamespace) -> None:
    backbone, _ = _reference_modules(ctx, ref, 1.0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.autocast without CUDA: disabled, says so
        emb = backbone.eval()(torch.zeros(2, 3, 112, 112))
    if tuple(emb.shape) != (2, ctx.sizes.embedding_size):
        raise CheckFailed(f"reference backbone gave {tuple(emb.shape)}, "
                          f"expected (2, {ctx.sizes.embedding_size})")


def _time_reference(ctx: CheckContext, ref: SimpleNamespace, rate: float) -> dict:
    """insightface's train_v2.py step with cfg.fp16: GradScaler(growth_interval=100), scale/backward,
    unscale, clip_grad_norm_(backbone, 5), step, update, zero_grad; SGD lr 0.1, momentum 0.9, wd 5e-4.
    Left out, as in our bench: DDP (world size 1 here; train_v2 wraps even one GPU), the LR scheduler
    and the per-step ``loss.item()`` of its logging: each would only slow the reference."""
    s = ctx.sizes
    backbone, head = _reference_modules(ctx, ref, rate)
    opt = torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params": head.parameters()}],
                          lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", growth_interval=100)
    images, labels = _random_batch(s.batch_size, s.num_classes, ctx.device)

    def step() -> None:
        loss = head(backbone(images), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    torch.cuda.reset_peak_memory_stats(ctx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # their torch.cuda.amp.autocast
        elapsed = _timed(ctx, step, s.bench_warmup, s.bench_steps)
    return {"network": s.reference_network, "sample_rate": rate,
            "ms_per_step": round(1000 * elapsed / s.bench_steps, 2),
            "samples_per_s": round(s.batch_size * s.bench_steps / elapsed, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 3),
            "loss_scale": scaler.get_scale()}


def _timed(ctx: CheckContext, fn: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones, the device synchronised."""
    for _ in range(warmup):
        fn()
    _sync(ctx)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(ctx)
    return time.perf_counter() - start


def step_extraction(ctx: CheckContext) -> dict:
    """:func:`facecompat.eval.extract.embed_batches` (bf16, flip fusion) on uint8 batches already on
    the device: faces/s over the timed batches after two warm-up batches."""
    s = ctx.sizes
    torch.manual_seed(0)
    model = get_model(s.network, s.embedding_size).to(ctx.device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (s.extract_batch, 3, 112, 112), dtype=torch.uint8, generator=gen)
               .to(ctx.device) for _ in range(s.extract_batches)]
    kw = {"device": ctx.device, "flip": True, "autocast_dtype": torch.bfloat16}
    embed_batches(model, batches[:2], **kw)
    num = s.extract_batch * s.extract_batches
    feats: list[torch.Tensor] = []
    elapsed = _timed(ctx, lambda: feats.append(embed_batches(model, batches, num_rows=num, **kw)), 0, 1)
    out = feats[0]
    result = {"network": s.network, "batch": s.extract_batch, "faces": num, "flip": True, "autocast": "bf16",
              "seconds": round(elapsed, 4), "faces_per_s": round(num / elapsed, 1),
              "shape": list(out.shape), "dtype": str(out.dtype), "device": str(out.device)}
    result["summary"] = (f"{result['faces_per_s']:.0f} faces/s ({num} faces, batch {s.extract_batch}, "
                         "flip, bf16)")
    problems = []
    if tuple(out.shape) != (num, s.embedding_size) or out.dtype != torch.float32 or out.device != ctx.device:
        problems.append(f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if not bool(torch.isfinite(out).all()):
        problems.append("non-finite features")
    if problems:
        raise CheckFailed("; ".join(problems), result)
    return result


def step_two_ranks(ctx: CheckContext) -> dict:
    """A small training under torchrun with two ranks and gloo (both ranks on the one GPU)."""
    s = ctx.sizes
    _ensure_data(ctx)
    name = "two_ranks"
    run_dir = ctx.out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*_train_overrides(ctx, network=s.two_rank_network, exp_name=name, epochs=1),
                 f"data.batch_size={s.two_rank_batch}"]
    env = _subprocess_env(ctx, FACECOMPAT_DIST_BACKEND="gloo")
    seconds = _train(ctx, "train_two_ranks", "synthetic_old.yaml", overrides, 2, env=env)
    log = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").is_file() else ""
    result = {"seconds": round(seconds, 1), "backend": "gloo", "network": s.two_rank_network,
              "world_size_2_logged": "world size 2" in log, "steps": _checkpoint_step(run_dir)}
    result["summary"] = f"{result['steps']} step(s) of 2 ranks, gloo, in {seconds:.0f} s"
    if not result["world_size_2_logged"]:
        raise CheckFailed(f"{run_dir / 'train.log'} does not say 'world size 2'", result)
    return result


def step_gpu_tests(ctx: CheckContext) -> dict:
    """``FACECOMPAT_TEST_GPU=1 python -m pytest -q -m gpu -p no:cacheprovider tests`` in the repo."""
    if not ctx.cuda:
        raise StepSkipped("CUDA only (the gpu-marked tests need a GPU)")
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    status, text, seconds = _run_logged(ctx, "gpu_tests", args, cap_s=300,
                                        env=_subprocess_env(ctx, FACECOMPAT_TEST_GPU="1"))
    result = {"exit": status, "seconds": round(seconds, 1), "summary": _last_lines(text)}
    if status == 5:
        raise StepSkipped("no gpu-marked test was collected", result)
    if status != 0:
        raise CheckFailed(f"pytest exit {status}: {_last_lines(text)}", result)
    return result


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
