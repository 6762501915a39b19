"""What every step of the GPU check shares: the exceptions, the sizes, the context, and the helpers
(the world-size-1 process group, backend flags, random batches, logged subprocesses, generated data)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from facecompat import dist
from facecompat.data.synthetic.sets import SyntheticSpec, generate_synthetic
from facecompat.errors import UserError

# torchrun / our own world-size-1 group: never handed down to a subprocess
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
             "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


class GpuCheckError(UserError, ValueError):
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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


def _release(ctx: CheckContext) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
