"""What a compatibility method adds to the training step: each method against plain ArcFace
(``none``) on the same backbone, head, optimiser and batches, on synthetic tensors (no image I/O).

The old-feature bank is a real one (random float16 features written with
:meth:`FeatureBank.from_arrays`, memory-mapped as in training), so the host-side per-sample
lookups of :meth:`CompatMethod.batch_inputs` are timed with the step, as the trainer's loader
pays them. In the trainer the loader's workers overlap them with the device step, so the figure
here is an upper bound on the method's cost.

Timing is interleaved for a noisy machine: each round runs every method for ``steps`` steps (in
an order rotated per round), and a method's figure is its median over rounds.
"""

from __future__ import annotations

import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facecompat import dist
from facecompat.compat.base import CompatContext, CompatMethod
from facecompat.compat.registry import get_method
from facecompat.config import HeadConfig, OptimConfig
from facecompat.features import FeatureBank
from facecompat.heads import build_head
from facecompat.models import get_model
from facecompat.train.objective import ArcFaceObjective
from facecompat.train.precision import LossScaler, autocast_dtype, resolve_precision
from facecompat.train.step import TrainStep, build_optimizer

# Parameters that differ from a method's defaults: no old run here, so BCT's frozen classifier is
# built from the bank's class means (a zoo old model's case; the same cost as old class centres).
BENCH_PARAMS = {"bct": {"prototype": "class_mean"}}


@dataclass(frozen=True)
class BenchView:
    """The attributes of a training view (``FaceRecords``) the methods read; labels are dataset classes."""

    record_ids: np.ndarray  # int64 [N] ascending
    labels: np.ndarray  # int64 [N]
    num_classes: int
    label_map: np.ndarray | None = None

    @property
    def num_images(self) -> int:
        return int(self.record_ids.size)


def make_bench_bank(directory: Path, *, num_records: int, num_classes: int, embedding_size: int,
                    seed: int = 0) -> tuple[BenchView, FeatureBank]:
    """A view of ``num_records`` records over ``num_classes`` classes (record ``i`` has class
    ``i % num_classes``, so every class has records when ``num_records >= num_classes``) and its bank
    of random float16 ``[N, 2, D]`` features in ``directory`` (which must not exist or be empty)."""
    if num_records < num_classes:
        raise ValueError(f"num_records ({num_records}) must be >= num_classes ({num_classes}): "
                         "every class needs a record in the bank")
    record_ids = np.arange(1, num_records + 1, dtype=np.int64)  # rec ids start at 1 (0 is the header)
    labels = np.arange(num_records, dtype=np.int64) % num_classes
    rng = np.random.default_rng(seed)
    feats = np.empty((num_records, 2, embedding_size), dtype=np.float16)
    for start in range(0, num_records, 1 << 14):  # in slices: no float64 copy of the whole bank
        part = feats[start:start + (1 << 14)]
        part[...] = rng.standard_normal(part.shape, dtype=np.float32)
    bank = FeatureBank.from_arrays(directory, record_ids, labels, feats, model={"name": "bench-random"})
    return BenchView(record_ids, labels, num_classes), bank


@dataclass
class _Setup:
    """One method's step, ready to run."""

    name: str
    step: TrainStep
    method: CompatMethod | None
    round_s: list[float]
    host_s: float = 0.0
    warm: bool = False
    peak: int = 0


def _build_setup(name: str, view: BenchView, bank: FeatureBank, *, network: str, embedding_size: int,
                 sample_rate: float, precision: str, device: torch.device) -> _Setup:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same backbone for every method
    backbone = get_model(network, embedding_size).to(device)
    head = build_head(HeadConfig(sample_rate=sample_rate), num_classes=view.num_classes,
                      embedding_size=embedding_size, seed=0).to(device)
    method = None
    if name != "none":
        ctx = CompatContext(params=BENCH_PARAMS.get(name, {}), weight=1.0, view=view, head=head,
                            embedding_size=embedding_size, rank=rank, world_size=world, device=device,
                            seed=0, bank=bank)
        method = get_method(name)(ctx).to(device)
    model = backbone
    if world > 1:
        model = dist.data_parallel(backbone, device)
    objective = ArcFaceObjective(head, method)
    optimizer = build_optimizer(backbone, objective, OptimConfig(), device)
    step = TrainStep(model, backbone, objective, optimizer, LossScaler(enabled=precision == "fp16"),
                     amp_dtype=autocast_dtype(precision), channels_last=False, grad_clip=5.0,
                     world_size=world)
    return _Setup(name, step, method, [])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _run(setup: _Setup, images: torch.Tensor, batches: Sequence[tuple],
         device: torch.device) -> tuple[float, float]:
    """(wall seconds, host seconds in ``batch_inputs`` and its copy) of one step per batch."""
    _sync(device)
    host = 0.0
    start = time.perf_counter()
    for record_ids, flipped, labels_np, labels in batches:
        if setup.method is None:
            setup.step([(images, labels)])
            continue
        t0 = time.perf_counter()
        inputs = {k: v.to(device, non_blocking=True)
                  for k, v in setup.method.batch_inputs(record_ids, flipped, labels_np).items()}
        host += time.perf_counter() - t0
        setup.step([(images, labels, inputs)])
    _sync(device)
    return time.perf_counter() - start, host


def _draw_batches(view: BenchView, batch_size: int, num: int, seed: int,
                  device: torch.device) -> list[tuple]:
    """``num`` batches (record ids, flipped, labels, labels on ``device``) drawn without replacement."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        rows = np.sort(rng.choice(view.num_images, size=batch_size, replace=False))
        labels = view.labels[rows]
        out.append((view.record_ids[rows], rng.random(batch_size) < 0.5, labels,
                    torch.from_numpy(labels).to(device)))
    return out


def _method_names(methods: Sequence[str]) -> list[str]:
    names = ["none"]
    for name in methods:
        if name != "none":
            get_method(name)  # ConfigError listing the valid names
            if name not in names:
                names.append(name)
    return names


def _open_bank(workdir: str | Path | None, names: list[str], *, num_records: int, num_classes: int,
               embedding_size: int) -> tuple[BenchView, FeatureBank, Path]:
    """Rank 0 writes the bank and its derived statistics in a fresh directory; every rank opens it."""
    directory = None
    if dist.get_rank() == 0:
        directory = Path(tempfile.mkdtemp(prefix="bench-compat-", dir=workdir))
        try:
            _, bank = make_bench_bank(directory / "bank", num_records=num_records, num_classes=num_classes,
                                      embedding_size=embedding_size)
            bank.class_stats()
            for name in names[1:]:
                cls = get_method(name)
                for ratio in cls.credible_ratios(cls.defaults | BENCH_PARAMS.get(name, {})):
                    bank.credible(ratio)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    directory = Path(dist.broadcast_object(str(directory) if directory else None))
    dist.barrier()
    bank = FeatureBank.open(directory / "bank")
    labels = np.asarray(bank.labels, dtype=np.int64)
    return BenchView(np.asarray(bank.record_ids), labels, num_classes), bank, directory


def bench_compat_step(methods: Sequence[str], *, network: str = "r18", embedding_size: int = 512,
                      batch_size: int = 128, num_classes: int = 20000, num_records: int | None = None,
                      sample_rate: float = 1.0, precision: str = "auto", steps: int = 20, warmup: int = 5,
                      rounds: int = 3, device: torch.device | str | None = None,
                      workdir: str | Path | None = None) -> dict:
    """Time one training step of each compatibility method and of plain ArcFace (``none``, always
    included, the reference). Collective under torchrun (every rank calls it).

    Args:
        methods: registered method names (``none`` may be given; it is measured in any case).
        batch_size: per rank. num_records: bank size (default ``5 * num_classes``).
        steps, warmup, rounds: timed steps per method per round, untimed steps before a method's
            first round, rounds (a method's figure is its median round).
        workdir: where the temporary bank is written (default the system's temp directory; under
            several machines it must be a directory they share). Removed at the end.

    Returns:
        A JSON-ready dict: the settings, ``device_name``, ``threads``, ``peak_memory_gib`` and
        ``methods``: per name ``ms_per_step`` (median round), ``samples_per_s`` (all ranks),
        ``ratio`` (its median over ``none``'s), ``ratio_paired`` (median of the per-round ratios),
        ``round_ms``, ``host_ms_per_step`` (``batch_inputs`` and its copy) and, on CUDA,
        ``peak_memory_gib`` (allocated during its steps, every method's model resident).

    Raises:
        ConfigError: an unknown method name. ValueError: a bad size.
    """
    names = _method_names(methods)
    for key, value, least in (("steps", steps, 1), ("rounds", rounds, 1), ("batch_size", batch_size, 1),
                              ("warmup", warmup, 0)):
        if value < least:
            raise ValueError(f"{key} must be >= {least}, got {value}")
    num_records = 5 * num_classes if num_records is None else num_records
    if num_records < num_classes:
        raise ValueError(f"num_records ({num_records}) must be >= num_classes ({num_classes}): "
                         "every class needs a record in the bank")
    if batch_size > num_records:
        raise ValueError(f"batch_size ({batch_size}) is larger than the bank ({num_records} records)")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = dist.use_device(device)
    precision = resolve_precision(precision, device)
    view, bank, directory = _open_bank(workdir, names, num_records=num_records, num_classes=num_classes,
                                       embedding_size=embedding_size)
    try:
        setups = [_build_setup(name, view, bank, network=network, embedding_size=embedding_size,
                               sample_rate=sample_rate, precision=precision, device=device) for name in names]
        gen = torch.Generator().manual_seed(rank)
        images = torch.randn(batch_size, 3, 112, 112, generator=gen).clamp_(-1, 1).to(device)
        batches = _draw_batches(view, batch_size, warmup + rounds * steps, seed=1000 + rank, device=device)
        _time_rounds(setups, images, batches, steps=steps, warmup=warmup, rounds=rounds, device=device)
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
    return _report(setups, network=network, embedding_size=embedding_size, batch_size=batch_size,
                   world=world, num_classes=num_classes, num_records=num_records, sample_rate=sample_rate,
                   precision=precision, device=device, steps=steps, warmup=warmup, rounds=rounds)


def _time_rounds(setups: list[_Setup], images: torch.Tensor, batches: list[tuple], *, steps: int,
                 warmup: int, rounds: int, device: torch.device) -> None:
    # Every method sees the same batches: the warmup ones, then round r's (fresh bank rows per round).
    for r in range(rounds):
        timed = batches[warmup + r * steps : warmup + (r + 1) * steps]
        # Rotate the order each round so that no method always follows the same one.
        for setup in setups[r % len(setups):] + setups[:r % len(setups)]:
            if not setup.warm:
                if warmup:
                    _run(setup, images, batches[:warmup], device)
                setup.warm = True
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            elapsed, host = _run(setup, images, timed, device)
            setup.round_s.append(elapsed / steps)
            setup.host_s += host / steps
            if device.type == "cuda":
                setup.peak = max(setup.peak, torch.cuda.max_memory_allocated(device))


def _report(setups: list[_Setup], *, network: str, embedding_size: int, batch_size: int, world: int,
            num_classes: int, num_records: int, sample_rate: float, precision: str, device: torch.device,
            steps: int, warmup: int, rounds: int) -> dict:
    cuda = device.type == "cuda"
    reference = statistics.median(setups[0].round_s)
    per_method = {}
    for setup in setups:
        median = statistics.median(setup.round_s)
        entry = {"ms_per_step": round(1000 * median, 2),
                 "samples_per_s": round(batch_size * world / median, 1),
                 "ratio": 1.0 if setup is setups[0] else round(median / reference, 3),
                 # Median of the per-round ratios: each round's pair ran close together, so a
                 # slow drift of the machine's load cancels.
                 "ratio_paired": 1.0 if setup is setups[0] else round(statistics.median(
                     s / ref for s, ref in zip(setup.round_s, setups[0].round_s)), 3),
                 "round_ms": [round(1000 * s, 2) for s in setup.round_s],
                 "host_ms_per_step": round(1000 * setup.host_s / rounds, 3)}
        if cuda:
            entry["peak_memory_gib"] = round(setup.peak / 2**30, 3)
        per_method[setup.name] = entry
    peak = (max(s.peak for s in setups) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "network": network, "embedding_size": embedding_size, "batch_size": batch_size, "world_size": world,
        "num_classes": num_classes, "num_records": num_records, "sample_rate": sample_rate,
        "precision": precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup, "rounds": rounds,
        "peak_memory_gib": round(peak / 2**30, 3), "methods": per_method,
    }
