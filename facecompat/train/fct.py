"""Training FCT's transformation h on cached features (:mod:`facecompat.compat.fct` holds h, its loss and
the saved artefact).

    python tools/train_fct.py configs/synthetic_fct.yaml         # or torchrun ... for many ranks

**Data** are cached features of the new model's training set: the old, side-information and new
models' feature banks of that view (:mod:`facecompat.features.bank`: float16 image and flip per record,
extracted once under torchrun and reused; the old one is the bank BCT-style methods already built).
Each record gives three training rows (:class:`FeatureTriples`): the image, its flip and the fused
feature ``f(img) + f(flip)`` that evaluation stores per face; the same side is taken from all three banks.

**The loop** is not the backbone trainer's (:class:`facecompat.train.trainer.Trainer` reads images
through a loader into a backbone; here a batch is rows of three memory-mapped banks and the model a
few linear layers), but it shares its parts: the learning rate comes from the trainer's
:class:`~facecompat.train.schedule.WarmupScheduler` (linear warmup, then cosine decay to 0), gradients
are averaged over ranks by :func:`facecompat.dist.average_gradients`, and loss terms are summed on the
device and read back once per epoch. Rows of each epoch are a seeded permutation split
``perm[rank::world]``, equal steps per rank, so every rank holds the same h.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facecompat import dist
from facecompat.compat.fct import (
    METRICS,
    FCTConfig,
    FCTError,
    Transformation,
    fct_losses,
    model_record,
    save_transformation,
)
from facecompat.config import ConfigError, OldModelConfig
from facecompat.data.loader import build_dataset
from facecompat.features import default_bank_dir, ensure_bank
from facecompat.fileio import atomic_write
from facecompat.models.spec import ModelSpec, resolve_model_spec
from facecompat.train.schedule import WarmupScheduler

_ROW_SIDES = 3  # image, flip, fused

class FeatureTriples:
    """Training rows over three banks of one view: row ``3 r + k`` is record ``r``'s image (k = 0),
    flip (1) or fused ``f(img) + f(flip)`` (2) in the old, side and new banks alike."""

    def __init__(self, old: Any, new: Any, side: Any | None = None):
        for name, bank in (("new", new), ("side", side)):
            if bank is not None and (len(bank) != len(old)
                                     or not np.array_equal(bank.record_ids, old.record_ids)):
                raise FCTError(f"{bank.directory}: the {name} bank covers other records than the old bank "
                               f"{old.directory} ({len(bank)} vs {len(old)})")
        self.old, self.new, self.side = old, new, side

    def __len__(self) -> int:
        return _ROW_SIDES * len(self.old)

    @staticmethod
    def _take(bank: Any, rows: np.ndarray) -> np.ndarray:
        record, k = rows // _ROW_SIDES, rows % _ROW_SIDES
        order = np.argsort(record, kind="stable")  # ascending reads from the memmap
        both = np.empty((rows.size, 2, bank.embedding_size), np.float32)
        both[order] = bank.features[record[order]]
        out = both[np.arange(rows.size), np.minimum(k, 1)]
        fused = k == 2
        out[fused] = both[fused, 0] + both[fused, 1]
        return out

    def batch(self, rows: np.ndarray) -> tuple[Tensor, Tensor | None, Tensor]:
        side = None if self.side is None else torch.from_numpy(self._take(self.side, rows))
        old, new = (torch.from_numpy(self._take(bank, rows)) for bank in (self.old, self.new))
        return old, side, new


def split_rows(num_records: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): whole records are held out (all three of their rows)."""
    rng = np.random.default_rng([seed, 0xFC7])
    held = np.zeros(num_records, bool)
    held[rng.permutation(num_records)[:int(round(val_ratio * num_records))]] = True
    rows = np.arange(_ROW_SIDES * num_records)
    record_held = held[rows // _ROW_SIDES]
    return rows[~record_held], rows[record_held]


def mean_fused_norm(bank: Any, chunk_rows: int = 65536) -> float:
    """Mean of ``‖f(img) + f(flip)‖`` over a bank's records (the scale of evaluation's face features)."""
    total = 0.0
    for start in range(0, len(bank), chunk_rows):
        both = np.asarray(bank.features[start:start + chunk_rows], dtype=np.float32)
        total += float(np.linalg.norm(both[:, 0] + both[:, 1], axis=1).sum())
    return total / max(len(bank), 1)


@torch.no_grad()
def evaluate_fit(module: Transformation, data: FeatureTriples, rows: np.ndarray, device: torch.device,
                 batch_size: int = 4096) -> dict[str, float]:
    """Mean squared error, mean cosine to the new features, and (old, new) mean cosine as the
    untransformed baseline, over ``rows`` (this rank computes them all)."""
    sums = {"mse": 0.0, "cos": 0.0, "cos_old": 0.0}
    module.eval()
    for start in range(0, rows.size, batch_size):
        old, side, new = data.batch(rows[start:start + batch_size])
        old, new = old.to(device), new.to(device)
        pred, _ = module(old, None if side is None else side.to(device))
        t = F.normalize(new, dim=1)
        sums["mse"] += float((pred - t).pow(2).sum(dim=1).sum())
        sums["cos"] += float(F.cosine_similarity(pred, t, dim=1).sum())
        if old.shape[1] == new.shape[1]:
            sums["cos_old"] += float(F.cosine_similarity(old, new, dim=1).sum())
    module.train()
    n = max(rows.size, 1)
    return {k: v / n for k, v in sums.items()}


def _model_spec(role: str, ref: OldModelConfig) -> ModelSpec:
    """The model a config section names; ConfigError naming ``<role>.checkpoint`` when it does not resolve."""
    if not ref.checkpoint:
        raise ConfigError(f"{role}.checkpoint: not set (the {role} model's run directory or model.pt)")
    path = Path(ref.checkpoint)
    try:
        network, dim, weights = resolve_model_spec(path, ref.network, ref.embedding_size)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{role}.checkpoint: {exc}") from None
    name = path.name if path.is_dir() else f"{path.parent.name}-{path.stem}"
    return ModelSpec(name, network, dim, weights, str(path))


def _train_epochs(cfg: FCTConfig, module: Transformation, data: FeatureTriples, train_rows: np.ndarray,
                  device: torch.device, log: logging.Logger, progress: bool) -> list[dict]:
    """AdamW over ``train_rows`` for ``cfg.train.epochs``; one history row per epoch."""
    from tqdm import tqdm

    tc = cfg.train
    rank, world = dist.get_rank(), dist.get_world_size()
    steps_per_epoch = len(train_rows) // (world * tc.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size: {tc.batch_size} rows per rank x {world} ranks is more than the "
                          f"{len(train_rows)} training rows")
    total = steps_per_epoch * tc.epochs
    optimizer = torch.optim.AdamW(module.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = WarmupScheduler(optimizer, total_steps=total, decay="cosine",
                                warmup_steps=int(round(tc.warmup_epochs * steps_per_epoch)))
    params = list(module.parameters())
    history: list[dict] = []
    bar = tqdm(total=total, desc="fct", unit="step", disable=not progress or rank != 0, leave=False)
    module.train()
    for epoch in range(tc.epochs):
        perm = train_rows[np.random.default_rng([tc.seed, epoch]).permutation(train_rows.size)]
        mine = perm[rank::world][:steps_per_epoch * tc.batch_size]
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for i in range(steps_per_epoch):
            old, side, new = data.batch(mine[i * tc.batch_size:(i + 1) * tc.batch_size])
            pred, log_var = module(old.to(device), None if side is None else side.to(device))
            terms = fct_losses(pred, log_var, new.to(device), cosine_weight=tc.cosine_weight,
                               nll_weight=tc.nll_weight)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                dist.average_gradients(params)
            optimizer.step()
            zero = loss.new_zeros(())
            sums += torch.stack([loss, terms["mse"], terms.get("cosine", zero),  # on the device: no sync
                                 terms.get("nll", zero)]).detach().double()
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            bar.update(1)
        if world > 1:
            dist.all_reduce_(sums, "sum").div_(world)
        mean = (sums / steps_per_epoch).cpu().tolist()
        if not all(math.isfinite(v) for v in mean):
            raise FCTError(f"epoch {epoch}: loss is NaN/inf (lower train.lr)")
        history.append({"epoch": epoch + 1, "step": scheduler.last_step, "loss": mean[0], "mse": mean[1],
                        "cosine": mean[2], "nll": mean[3], "lr": lr})
        if rank == 0 and ((epoch + 1) % tc.log_every == 0 or epoch + 1 == tc.epochs):
            log.info("epoch %d/%d loss %.4f (mse %.4f%s) lr %.2e", epoch + 1, tc.epochs, mean[0], mean[1],
                     f" nll {mean[3]:.3f}" if cfg.transform.uncertainty else "", lr)
    bar.close()
    return history


def train_transformation(cfg: FCTConfig, *, device: torch.device | str | None = None,
                         log: logging.Logger | None = None, progress: bool = True) -> dict:
    """Cache the three models' features of ``cfg.data`` (collective, resumable) and train h on them.

    Every rank calls it (one process: the same); rank 0 writes the transformation to ``cfg.output``.
    Rows of each epoch are a seeded permutation split ``perm[rank::world]``, equal steps per rank;
    gradients are averaged over ranks, so every rank holds the same h.

    Returns:
        The summary stored in ``fct.json`` (``fit``, ``cost``, ...); empty on ranks other than 0.
    Raises:
        ConfigError: a model reference that does not resolve, dimensions that do not fit.
        BankError / FCTError: a feature bank that does not match, non-finite losses.
    """
    log = log or logging.getLogger("facecompat.fct")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = dist.resolve_device(device)
    view = build_dataset(cfg.data)
    specs = {"old": _model_spec("old", cfg.old), "new": _model_spec("new", cfg.new)}
    if cfg.side is not None:
        specs["side"] = _model_spec("side", cfg.side)
    start = time.perf_counter()
    banks = {}
    for role, spec in specs.items():
        directory = default_bank_dir(cfg.bank_root, spec, view)
        log.info("%s features (%s): %s", role, spec.source, directory)
        banks[role] = ensure_bank(view, spec, directory, batch_size=cfg.extract_batch_size,
                                  num_workers=cfg.data.num_workers, device=device,
                                  autocast_dtype=torch.float16 if device.type == "cuda" else None,
                                  progress=progress and rank == 0)
    extracted = {role: b.num_extracted for role, b in banks.items()}
    output_norm = mean_fused_norm(banks["new"])
    extract_s = time.perf_counter() - start
    data = FeatureTriples(banks["old"], banks["new"], banks.get("side"))

    tc = cfg.train
    torch.manual_seed(tc.seed)  # the same initial h on every rank
    side_dim = specs["side"].embedding_size if "side" in specs else 0
    module = Transformation(specs["old"].embedding_size, side_dim, specs["new"].embedding_size,
                            cfg.transform.hidden, cfg.transform.uncertainty).to(device)
    train_rows, val_rows = split_rows(len(data.old), tc.val_ratio, tc.seed)
    start = time.perf_counter()
    history = _train_epochs(cfg, module, data, train_rows, device, log, progress)
    train_s = time.perf_counter() - start
    if rank != 0:
        return {}
    fit = {"train": evaluate_fit(module, data, train_rows[::max(1, train_rows.size // 20000)], device)}
    if val_rows.size:
        fit["held_out"] = evaluate_fit(module, data, val_rows, device)
    summary = {
        "output_norm": output_norm,
        "architecture": {"old_dim": module.old_dim, "side_dim": module.side_dim, "new_dim": module.new_dim,
                         "hidden": list(cfg.transform.hidden), "uncertainty": cfg.transform.uncertainty},
        "models": {role: model_record(spec.name, spec, role) for role, spec in specs.items()},
        "data": {"rec": str(view.path), "records": len(data.old), "rows": len(data),
                 "protocol": cfg.data.protocol, "part": cfg.data.part},
        "training": {"epochs": tc.epochs, "steps": history[-1]["step"] if history else 0,
                     "batch_size": tc.batch_size, "world_size": world, "lr": tc.lr,
                     "cosine_weight": tc.cosine_weight, "nll_weight": tc.nll_weight},
        "fit": fit,
        "cost": {"extract_s": round(extract_s, 3), "records_extracted": extracted,
                 "train_s": round(train_s, 3), "device": str(device), "world_size": world},
    }
    out = Path(cfg.output)
    save_transformation(out, module, summary)
    with atomic_write(out / METRICS, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)
    shown = fit.get("held_out", fit["train"])
    log.info("held-out fit: cos(h, new) %.4f (old vs new %.4f), mse %.4f; wrote %s",
             shown["cos"], shown["cos_old"], shown["mse"], out)
    return summary


__all__ = ["FeatureTriples", "evaluate_fit", "mean_fused_norm", "split_rows", "train_transformation"]
