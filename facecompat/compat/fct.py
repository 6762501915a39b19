"""Forward-compatible transformation (FCT, Ramanujan et al. 2022; FastFill, Jaeckle et al. 2023).

When the new model arrives, the stored gallery is upgraded by a small network instead of re-running
the new model on every image: ``h(φ_old(x), ψ(x)) ≈ φ_new(x)``, with ψ the side-information model
trained (self-supervised) together with the old model and stored with the gallery.

    python tools/train_fct.py configs/synthetic_fct.yaml         # or torchrun ... for many ranks
    transform = FCTransform.load("work_dirs/synthetic_fct")
    upgraded, uncertainty = transform.apply(old_feats, side_feats)

**Training data** are cached features of the new model's training set: the old, side-information
and new models' feature banks of that view (:mod:`facecompat.features.bank`: float16 image and flip
per record, extracted once under torchrun and reused; the old one is the bank BCT-style methods
already built). Each record gives three training rows: the image, its flip and the fused feature
``f(img) + f(flip)`` that evaluation stores per face; the same side is taken from all three banks.

**The network** (:class:`Transformation`): inputs L2-normalised and concatenated
``[φ̂_old, ψ̂]`` (``ψ`` omitted in the no-side-info variant), then per hidden width
``Linear → LayerNorm → ReLU``, then ``Linear`` to the new dimension. LayerNorm, not BatchNorm:
its output does not depend on the batch or on the rank, so every rank holds the same model and a
transformation applies the same way to one vector or a million. With ``uncertainty`` a second
linear output gives ``s = log σ²`` per item (FastFill).

**Loss** (per row, ``t`` the L2-normalised new feature, ``p`` the prediction, ``e = ‖p − t‖²``):
``mse = e``; ``cosine = 1 − cos(p, t)`` weighted by ``cosine_weight``; with uncertainty the
Gaussian negative log-likelihood of an isotropic σ² over ``D`` dimensions,
``nll = ½ (e / σ² + D · s)`` with ``e`` detached: the mean is trained by the squared error alone
and σ² learns the expected error of each item (its minimiser is ``σ² = e / D``), which is what
FastFill orders the backfill by. Each term is a mean over the rows of the global batch (every
rank's share averaged).

**Output scale**: h predicts directions (unit targets), but evaluation pools per-face features
*unnormalised* (insightface's protocol: a face's norm weighs it in its template), and a partially
backfilled gallery mixes transformed faces with the new model's own. :meth:`FCTransform.apply`
therefore scales h's output by ``output_norm``, the mean norm of the new model's fused training
features (stored in ``fct.json``), so a transformed face weighs what an average new-model face
weighs instead of 1/20th of it.

**The artefact** is a directory: ``transform.pt`` (the state dict), ``fct.json`` (widths, the
three models' names, paths and weight fingerprints, the training summary and its cost), written
last and atomically, and ``metrics.jsonl``. :meth:`FCTransform.load` refuses a transformation whose
old or side-information model is not the one given (fingerprints differ).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecompat import dist
from facecompat.config import ConfigError, DataConfig, OldModelConfig, _at_least, _check, load_yaml
from facecompat.data.loader import build_dataset
from facecompat.errors import UserError
from facecompat.features import default_bank_dir, ensure_bank
from facecompat.fileio import atomic_write, file_sha1
from facecompat.models.spec import ModelSpec, resolve_model_spec

FORMAT = 1
WEIGHTS, META, METRICS = "transform.pt", "fct.json", "metrics.jsonl"
_ROW_SIDES = 3  # image, flip, fused
_EPS = 1e-12
APPLY_CHUNK_ROWS = 1 << 18  # FCTransform.apply's rows per read-back: 512 MiB of 512-d float32 predictions


class FCTError(UserError, ValueError):
    """A transformation that cannot be trained, loaded or applied as asked (one line)."""


# ------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class TransformConfig:
    """The network h: hidden widths, side-information input, uncertainty output."""

    hidden: tuple[int, ...] = (512, 512)  # widths of the hidden layers ([] : one linear map)
    uncertainty: bool = True  # FastFill: also predict log σ² per item

    def __post_init__(self) -> None:
        _check(all(w > 0 for w in self.hidden), "hidden", f"widths must be > 0, got {list(self.hidden)}")


@dataclass(frozen=True)
class FCTTrainConfig:
    """Optimisation of h: AdamW, linear warm-up then cosine decay to 0, per-rank batch size."""

    epochs: int = 20
    batch_size: int = 512  # rows per rank and step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    cosine_weight: float = 0.0  # weight of 1 - cos(p, t) beside the squared error
    nll_weight: float = 1.0  # weight of the uncertainty's Gaussian NLL (with transform.uncertainty)
    val_ratio: float = 0.05  # records held out to report generalisation (0: none)
    seed: int = 0
    log_every: int = 1  # epochs

    def __post_init__(self) -> None:
        _at_least(self, 0, "epochs", "batch_size", "lr", "log_every", strict=True)
        _at_least(self, 0, "weight_decay", "warmup_epochs", "cosine_weight", "nll_weight")
        _check(0.0 <= self.val_ratio < 0.5, "val_ratio", f"must be in [0, 0.5), got {self.val_ratio}")


@dataclass(frozen=True)
class FCTConfig:
    """``tools/train_fct.py`` config: the three models, the new model's training view, h and its training.

    ``data`` names the NEW model's training set (the view its features are cached on); ``side``
    None trains the no-side-information variant.
    """

    data: DataConfig = field(default_factory=DataConfig)
    old: OldModelConfig = field(default_factory=OldModelConfig)
    side: OldModelConfig | None = None
    new: OldModelConfig = field(default_factory=OldModelConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    train: FCTTrainConfig = field(default_factory=FCTTrainConfig)
    output: str = "work_dirs/fct"  # the transformation's directory
    bank_root: str = "work_dirs"  # feature banks go to <bank_root>/banks/<model>-<hash> (shared with BCT)
    extract_batch_size: int = 256

    def __post_init__(self) -> None:
        _check(bool(self.output), "output", "must not be empty")
        _at_least(self, 0, "extract_batch_size", strict=True)


def load_fct_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> FCTConfig:
    """Read an FCT config (``_base_`` files and ``--set`` items as for training configs)."""
    return load_yaml(FCTConfig, path, overrides)


# ------------------------------------------------------------------------------------------ network

class Transformation(nn.Module):
    """``h([φ̂_old, ψ̂]) -> (prediction [b, D_new], log σ² [b] or None)``; see the module docstring."""

    def __init__(self, old_dim: int, side_dim: int, new_dim: int, hidden: Sequence[int] = (512, 512),
                 uncertainty: bool = True):
        super().__init__()
        self.old_dim, self.side_dim, self.new_dim = int(old_dim), int(side_dim), int(new_dim)
        layers: list[nn.Module] = []
        width = self.old_dim + self.side_dim
        for w in hidden:
            layers += [nn.Linear(width, w), nn.LayerNorm(w), nn.ReLU(inplace=True)]
            width = w
        self.body = nn.Sequential(*layers)
        self.mean = nn.Linear(width, self.new_dim)
        self.log_var = nn.Linear(width, 1) if uncertainty else None

    def forward(self, old: Tensor, side: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = F.normalize(old, dim=1)
        if self.side_dim:
            if side is None:
                raise FCTError(f"this transformation takes {self.side_dim}-d side-information; none given")
            x = torch.cat([x, F.normalize(side, dim=1)], dim=1)
        hidden = self.body(x)
        log_var = None if self.log_var is None else self.log_var(hidden).squeeze(1)
        return self.mean(hidden), log_var


def fct_losses(pred: Tensor, log_var: Tensor | None, target: Tensor, *, cosine_weight: float = 0.0,
               nll_weight: float = 1.0) -> dict[str, Tensor]:
    """Named loss terms (means over the rows); ``target`` is normalised here. See the module docstring."""
    t = F.normalize(target.to(pred.dtype), dim=1)
    err = (pred - t).pow(2).sum(dim=1)
    terms = {"mse": err.mean()}
    if cosine_weight:
        terms["cosine"] = cosine_weight * (1.0 - F.cosine_similarity(pred, t, dim=1)).mean()
    if log_var is not None and nll_weight:
        nll = 0.5 * (err.detach() * torch.exp(-log_var) + pred.shape[1] * log_var)
        terms["nll"] = nll_weight * nll.mean()
    return terms


# ------------------------------------------------------------------------------------- the artefact

def _model_record(name: str, spec: Any, role: str) -> dict:
    return {"role": role, "name": name, "source": spec.source, "network": spec.network,
            "embedding_size": spec.embedding_size, "weights": str(spec.weights), **spec.fingerprint()}


class FCTransform:
    """A trained transformation loaded for use (CPU or a given device)."""

    def __init__(self, module: Transformation, meta: dict, directory: Path):
        self.module, self.meta, self.directory = module.eval(), meta, directory
        self.output_norm = float(meta.get("output_norm", 1.0))

    @property
    def uses_side(self) -> bool:
        return self.module.side_dim > 0

    @property
    def version(self) -> str:
        """Short id of this transformation (``fct-<sha1 of its weights>``)."""
        return f"fct-{self.meta['weights_sha1'][:12]}"

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> FCTransform:
        """Open a transformation directory; FCTError names what is missing or damaged."""

        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.is_file():
            raise FCTError(f"{directory}: no {META} (not a transformation, or training did not finish)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise FCTError(f"{meta_path}: unreadable ({exc})") from None
        if meta.get("format") != FORMAT:
            raise FCTError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT}")
        weights = directory / WEIGHTS
        if not weights.is_file():
            raise FCTError(f"{weights}: missing")
        if file_sha1(weights) != meta.get("weights_sha1"):
            raise FCTError(f"{weights}: does not match {META} (weights_sha1 differs; damaged or replaced)")
        arch = meta["architecture"]
        module = Transformation(arch["old_dim"], arch["side_dim"], arch["new_dim"], arch["hidden"],
                                arch["uncertainty"])
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state, strict=True)
        except (RuntimeError, OSError, ValueError) as exc:
            raise FCTError(f"{weights}: cannot load ({str(exc).splitlines()[0]})") from None
        return cls(module.to(device), meta, directory)

    def check_models(self, old_fingerprint: dict, side_fingerprint: dict | None = None) -> None:
        """FCTError unless the given old (and side-information) models are the ones h was trained on."""
        for role, given in (("old", old_fingerprint), ("side", side_fingerprint)):
            want = self.meta["models"].get(role)
            if want is None or given is None:
                continue
            if given.get("checkpoint_sha1") != want["checkpoint_sha1"]:
                raise FCTError(f"{self.directory}: trained on the {role} model {want['source']} "
                               f"(sha1 {want['checkpoint_sha1'][:12]}); the features given come from "
                               f"another (sha1 {str(given.get('checkpoint_sha1'))[:12]})")

    @torch.no_grad()
    def apply(self, old: np.ndarray, side: np.ndarray | None = None, *, batch_size: int = 65536,
              chunk_rows: int = APPLY_CHUNK_ROWS,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Upgrade features in chunks: float32 ``[N, D_new]`` predictions (h's output times
        ``output_norm``) and ``[N]`` σ² of the unit-scale prediction (or None).

        A chunk's predictions stay on the device until its last batch and come back at once, with
        its inputs' finite checks (made on the device): one wait for the device per chunk.

        Args:
            old: ``[N, D_old]`` old-model features (any norm; fused flips as evaluation stores them).
            side: ``[N, D_side]`` side-information features of the same items (with side-info).
            batch_size: rows per forward.
            chunk_rows: rows per read-back, rounded up to whole batches (bounds device memory: 512 MiB
                of 512-d predictions by default). The results do not depend on it.
            progress: called with the number of rows done after each chunk.
        Raises:
            FCTError: missing or extra side-information, wrong dimensions or row counts, non-finite input
                (names the rows of the first batch holding it).
        """
        m = self.module
        if old.ndim != 2 or old.shape[1] != m.old_dim:
            raise FCTError(f"old features are {tuple(old.shape)}, this transformation takes [N, {m.old_dim}]")
        if self.uses_side:
            if side is None:
                raise FCTError(f"{self.directory}: needs {m.side_dim}-d side-information features; "
                               "none given")
            if side.shape != (old.shape[0], m.side_dim):
                raise FCTError(f"side-information features are {tuple(side.shape)}, expected "
                               f"[{old.shape[0]}, {m.side_dim}] (one per old feature)")
        elif side is not None:
            raise FCTError(f"{self.directory}: trained without side-information; side features were given")
        out = np.empty((old.shape[0], m.new_dim), np.float32)
        var = np.empty(old.shape[0], np.float32) if m.log_var is not None else None
        step = batch_size * max(1, -(-chunk_rows // batch_size))
        for start in range(0, old.shape[0], step):
            stop = min(start + step, old.shape[0])
            self._apply_chunk(old, side, start, stop, batch_size, out, var)
            if progress is not None:
                progress(stop)
        return out, var

    def _apply_chunk(self, old: np.ndarray, side: np.ndarray | None, start: int, stop: int, batch_size: int,
                     out: np.ndarray, var: np.ndarray | None) -> None:
        """Rows ``[start, stop)`` batch by batch into device buffers, then into ``out`` and ``var``."""
        m = self.module
        device = next(m.parameters()).device
        pred_buf = torch.empty((stop - start, m.new_dim), dtype=torch.float32, device=device)
        var_buf = None if var is None else torch.empty(stop - start, dtype=torch.float32, device=device)
        batch_starts = range(start, stop, batch_size)
        finite = torch.empty(len(batch_starts), dtype=torch.bool, device=device)
        for i, b0 in enumerate(batch_starts):
            b1 = min(b0 + batch_size, stop)
            o = _rows_to_device(old[b0:b1], device)
            s = None if side is None else _rows_to_device(side[b0:b1], device)
            ok = torch.isfinite(o).all()
            finite[i] = ok if s is None else ok & torch.isfinite(s).all()  # on the device: no wait
            pred, log_var = m(o, s)
            pred_buf[b0 - start:b1 - start] = pred.float().mul_(self.output_norm)
            if var_buf is not None:
                var_buf[b0 - start:b1 - start] = torch.exp(log_var).float()
        bad = np.flatnonzero(~finite.cpu().numpy())  # the one wait for the device per chunk
        if bad.size:
            b0 = batch_starts[int(bad[0])]
            raise FCTError(f"input features of rows {b0}..{min(b0 + batch_size, stop) - 1} hold NaN or inf")
        out[start:stop] = pred_buf.cpu().numpy()
        if var is not None:
            var[start:stop] = var_buf.cpu().numpy()


def _rows_to_device(rows: np.ndarray, device: torch.device) -> Tensor:
    """A float32 copy of ``rows`` on ``device``; for CUDA through pinned memory, ``non_blocking`` (a copy
    from pageable memory would first wait for the GPU's queued work)."""
    if device.type != "cuda":
        return torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)
    host = torch.empty(rows.shape, dtype=torch.float32, pin_memory=True)
    host.numpy()[...] = rows
    return host.to(device, non_blocking=True)


def save_transformation(directory: Path, module: Transformation, meta: dict) -> Path:
    """Write ``transform.pt`` then ``fct.json`` (with the weights' sha1), each atomically."""

    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS
    with atomic_write(weights, "wb") as f:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, f)
    meta = {"format": FORMAT, **meta, "weights_sha1": file_sha1(weights)}
    with atomic_write(directory / META, "w") as f:
        json.dump(meta, f, indent=1)
    return directory


# ----------------------------------------------------------------------------------------- training

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


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


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


def train_transformation(cfg: FCTConfig, *, device: torch.device | str | None = None,
                         log: logging.Logger | None = None, progress: bool = True) -> dict:
    """Cache the three models' features of ``cfg.data`` (collective, resumable) and train h on them.

    Every rank calls it (one process: the same); rank 0 writes the transformation to ``cfg.output``.
    Rows of each epoch are a seeded permutation split ``perm[rank::world]``, equal steps per rank;
    gradients are averaged over ranks, so every rank holds the same h.

    Returns:
        The summary stored in ``fct.json`` (``fit``, ``cost``, ...).
    Raises:
        ConfigError: a model reference that does not resolve, dimensions that do not fit.
        BankError / FCTError: a feature bank that does not match, non-finite losses.
    """
    from tqdm import tqdm

    log = log or logging.getLogger("facecompat.fct")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = dist.resolve_device(device)
    view = build_dataset(cfg.data)

    def spec_of(role: str, ref: OldModelConfig) -> ModelSpec:
        if not ref.checkpoint:
            raise ConfigError(f"{role}.checkpoint: not set (the {role} model's run directory or model.pt)")
        path = Path(ref.checkpoint)
        try:
            network, dim, weights = resolve_model_spec(path, ref.network, ref.embedding_size)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{role}.checkpoint: {exc}") from None
        name = path.name if path.is_dir() else f"{path.parent.name}-{path.stem}"
        return ModelSpec(name, network, dim, weights, str(path))

    specs = {"old": spec_of("old", cfg.old), "new": spec_of("new", cfg.new)}
    if cfg.side is not None:
        specs["side"] = spec_of("side", cfg.side)
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
    optimizer = torch.optim.AdamW(module.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    train_rows, val_rows = split_rows(len(data.old), tc.val_ratio, tc.seed)
    steps_per_epoch = len(train_rows) // (world * tc.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size: {tc.batch_size} rows per rank x {world} ranks is more than the "
                          f"{len(train_rows)} training rows")
    total = steps_per_epoch * tc.epochs
    warmup = int(round(tc.warmup_epochs * steps_per_epoch))
    params = list(module.parameters())
    history: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc="fct", unit="step", disable=not progress or rank != 0, leave=False)
    module.train()
    step = 0
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
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, warmup, tc.lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                dist.average_gradients(params)
            optimizer.step()
            zero = loss.new_zeros(())
            sums += torch.stack([loss, terms["mse"], terms.get("cosine", zero),  # on the device: no sync
                                 terms.get("nll", zero)]).detach().double()
            step += 1
            bar.update(1)
        if world > 1:
            dist.all_reduce_(sums, "sum").div_(world)
        mean = (sums / steps_per_epoch).cpu().tolist()
        if not all(math.isfinite(v) for v in mean):
            raise FCTError(f"epoch {epoch}: loss is NaN/inf (lower train.lr)")
        row = {"epoch": epoch + 1, "step": step, "loss": mean[0], "mse": mean[1], "cosine": mean[2],
               "nll": mean[3], "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        if rank == 0 and ((epoch + 1) % tc.log_every == 0 or epoch + 1 == tc.epochs):
            log.info("epoch %d/%d loss %.4f (mse %.4f%s) lr %.2e", epoch + 1, tc.epochs, mean[0], mean[1],
                     f" nll {mean[3]:.3f}" if cfg.transform.uncertainty else "", row["lr"])
    bar.close()
    train_s = time.perf_counter() - start
    summary: dict = {}
    if rank == 0:
        fit = {"train": evaluate_fit(module, data, train_rows[::max(1, train_rows.size // 20000)], device)}
        if val_rows.size:
            fit["held_out"] = evaluate_fit(module, data, val_rows, device)
        summary = {
            "output_norm": output_norm,
            "architecture": {"old_dim": module.old_dim, "side_dim": module.side_dim,
                             "new_dim": module.new_dim,
                             "hidden": list(cfg.transform.hidden), "uncertainty": cfg.transform.uncertainty},
            "models": {role: _model_record(spec.name, spec, role) for role, spec in specs.items()},
            "data": {"rec": str(view.path), "records": len(data.old), "rows": len(data),
                     "protocol": cfg.data.protocol, "part": cfg.data.part},
            "training": {"epochs": tc.epochs, "steps": total, "batch_size": tc.batch_size,
                         "world_size": world,
                         "lr": tc.lr, "cosine_weight": tc.cosine_weight, "nll_weight": tc.nll_weight},
            "fit": fit,
            "cost": {"extract_s": round(extract_s, 3), "records_extracted": extracted,
                     "train_s": round(train_s, 3), "device": str(device), "world_size": world},
        }
        out = Path(cfg.output)
        save_transformation(out, module, summary)
        with atomic_write(out / METRICS, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
        log.info("held-out fit: cos(h, new) %.4f (old vs new %.4f), mse %.4f; wrote %s",
                 fit.get("held_out", fit["train"])["cos"], fit.get("held_out", fit["train"])["cos_old"],
                 fit.get("held_out", fit["train"])["mse"], out)
    return summary


__all__ = ["FCTConfig", "FCTError", "FCTransform", "FeatureTriples", "Transformation", "fct_losses",
           "load_fct_config", "save_transformation", "split_rows", "train_transformation"]
