"""Training-step throughput on synthetic tensors (no I/O): what the backbone, head and
optimiser cost per step for a given network, batch, sample rate, precision and world size."""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass

import torch

from facecompat import dist
from facecompat.config import HeadConfig, OptimConfig
from facecompat.heads import PartialFC, build_head, head_memory_bytes
from facecompat.models import get_model
from facecompat.train.objective import ArcFaceObjective
from facecompat.train.precision import LossScaler, autocast_dtype, resolve_precision
from facecompat.train.step import TrainStep, build_optimizer


@dataclass(frozen=True)
class StepBenchSpec:
    network: str = "r50"
    embedding_size: int = 512
    batch_size: int = 128  # per rank
    num_classes: int = 93431  # MS1Mv3
    sample_rate: float = 1.0
    precision: str = "auto"
    channels_last: bool = False
    steps: int = 20
    warmup: int = 5


def bench_train_step(spec: StepBenchSpec, device: torch.device | str | None = None) -> dict:
    """Time ``spec.steps`` training steps after ``spec.warmup``; returns samples/s (this rank and
    all ranks), ms per step and peak memory. Collective under torchrun."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = dist.use_device(device)
    precision = resolve_precision(spec.precision, device)
    channels_last = spec.channels_last and device.type == "cuda"
    torch.manual_seed(0)
    backbone = get_model(spec.network, spec.embedding_size).to(device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    # As the trainer builds it: labels checked per step on the CPU only (a host sync on a GPU).
    head = build_head(HeadConfig(sample_rate=spec.sample_rate), num_classes=spec.num_classes,
                      embedding_size=spec.embedding_size, check_labels=device.type == "cpu").to(device)
    model = backbone
    if world > 1:
        model = dist.data_parallel(backbone, device)
    objective = ArcFaceObjective(head)
    optimizer = build_optimizer(backbone, objective, OptimConfig(), device)
    scaler = LossScaler(enabled=precision == "fp16")
    step = TrainStep(model, backbone, objective, optimizer, scaler, amp_dtype=autocast_dtype(precision),
                     channels_last=channels_last, grad_clip=5.0, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    images = torch.randn(spec.batch_size, 3, 112, 112, generator=gen).clamp_(-1, 1).to(device)
    labels = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    for _ in range(spec.warmup):
        step([(images, labels)])
    sync()
    start = time.perf_counter()
    for _ in range(spec.steps):
        losses, _ = step([(images, labels)])
    sync()
    elapsed = time.perf_counter() - start
    per_rank = spec.batch_size * spec.steps / elapsed
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "network": spec.network, "batch_size": spec.batch_size, "world_size": world,
        "num_classes": spec.num_classes, "sample_rate": spec.sample_rate, "precision": precision,
        "channels_last": channels_last, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "steps": spec.steps,
        "ms_per_step": round(1000 * elapsed / spec.steps, 2),
        "samples_per_s": round(per_rank * world, 1), "samples_per_s_per_rank": round(per_rank, 1),
        "peak_memory_gib": round(peak / 2**30, 3), "loss": float(losses[-1]),
    }


def bench_head_memory(num_classes: int, world_size: int = 8, sample_rate: float = 0.1,
                      global_batch: int = 1024, embedding_size: int = 512, steps: int = 2) -> dict:
    """Peak memory of one Partial FC rank against :func:`facecompat.heads.head_memory_bytes`.

    One process holds a rank's exact shapes (``ceil(C / W)`` local classes, the all-gathered global
    batch) on the CPU and trains ``steps`` SGD-with-momentum steps after one warm-up step. The
    measured peak is the process's peak anonymous resident memory (``RssAnon``, sampled every 0.5 ms
    during the steps) minus the anonymous resident memory without the head (after the warm-up, less its
    weights and momentum).

    Returns:
        ``{"num_local", "sample_rate", "global_batch", "embedding_size", "measured_gib",
        "formula_gib"}``.
    """

    if num_classes < 1 or world_size < 1 or global_batch < 1 or embedding_size < 1 or steps < 1:
        raise ValueError("num_classes, world_size, global_batch, embedding_size and steps must be >= 1")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    num_local = -(-num_classes // world_size)
    gen = torch.Generator().manual_seed(0)
    head = PartialFC(embedding_size, num_local, sample_rate=sample_rate)
    optim = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    emb = torch.randn(global_batch, embedding_size, generator=gen)
    labels = torch.randint(0, num_local, (global_batch,), generator=gen)

    def step() -> None:
        head(emb, labels).backward()
        optim.step()
        optim.zero_grad()

    step()  # the momentum buffer and the allocator's pools exist from here on
    # Anonymous memory only, sampled: file-backed pages (the libraries' code) may be dropped and faulted
    # back by the OS while another process needs memory, which moves any total-RSS reading (ru_maxrss
    # included) by hundreds of MB. The steps' large tensors live for milliseconds at the least, and
    # torch releases the GIL while it computes, so a 0.5 ms sampler sees their peak.
    without_head = _rss_kib("RssAnon") * 1024 - 2 * num_local * embedding_size * 4  # less weights, momentum
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib("RssAnon"))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(steps):
            step()
    finally:
        done.set()
        sampler.join()
    formula = head_memory_bytes(num_local * world_size, embedding_size, world_size, sample_rate, global_batch)
    return {"num_local": num_local, "sample_rate": sample_rate, "global_batch": global_batch,
            "embedding_size": embedding_size, "measured_gib": (peak[0] * 1024 - without_head) / 2**30,
            "formula_gib": formula["peak"] / 2**30}


def _rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``RssAnon``, ``RssFile``, ``RssShmem``) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")
