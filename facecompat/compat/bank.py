"""The old-feature bank: the old model's embedding of every image of the new model's training view.

Backward-compatible training (BCT, L2, MixBCT, LCE, AdvBCT) reads the frozen old model's feature of
each training image. They are extracted once (:func:`build_bank`, split over the ranks, resumable)
into a directory and memory-mapped read-only by every rank and loader worker: one copy per machine
in the page cache, never one per process.

Directory layout::

    features.npy     float16 [N, 2, D]  [:, 0] embedding of the image, [:, 1] of its horizontal flip
                                        (unnormalised, as the backbone outputs them)
    record_ids.npy   int64 [N]          ascending record ids (rows follow them)
    labels.npy       int64 [N]          the DATASET class of each record (view label through label_map)
    progress.npy     uint8 [chunks]     1 = chunk extracted and flushed (while building)
    build.json       what is being built (counts, chunking, model and dataset fingerprints)
    bank.json        written atomically, last: {"format": 1, "complete": true, ...}
    class_*.npy, credible_v2_<ratio>.npy   derived statistics, written atomically on first use

A directory without a complete ``bank.json`` is an unfinished build: it is resumed, never read.

Statistics (float32 maths, computed in chunks of ``chunk_rows`` records):

- fused unit vector of a record: ``u = normalize(normalize(f_img) + normalize(f_flip))``;
- class mean: ``m_c = normalize(mean of u over the class's records)``;
- angle of a record: ``arccos(clip(u . m_c, -1, 1))`` (radians); per class its mean and its max;
- boundary centre and radius (AdvBCT, the reference's ``gen_class_meta``): with ``v =
  normalize(f_img)`` the unit feature of the un-flipped image, ``c_c = mean of v`` (NOT
  renormalised) and ``d = |v - c_c|``; the radius is the largest ``d`` of the class inside the
  Tukey fences ``[q1 - 1.5 IQR, q3 + 1.5 IQR]``, ``q1 = d_(floor(n/4))``, ``q3 = d_(floor(3n/4))``
  (0-based order statistics of the class's sorted distances, as the reference indexes them;
  classes of fewer than 4 records are not fenced: radius = their largest ``d``);
- credible mask (MixBCT, keep ratio ``T`` in (0, 1], the reference's ``denoise_credible.py``):
  ``v`` as above, each feature column divided by its L2 norm over the whole bank (``w = v / |v[:,
  j]|``, sklearn's ``normalize(axis=0)``); in each class the ``k = ceil(T * n_c)`` records with
  the smallest Euclidean distance ``|w - mean_c w|`` are True (ties: lower record id first), the
  others False. ``T * n_c`` is taken exactly, with ``T`` as the decimal it was written as
  (``0.07 * 100`` keeps 7, although it is 7.000000000000001 in float64).

Both reference tools read one view per image (MixBCT's extraction: the training loader's random
flip; AdvBCT's: none); the un-flipped image's feature is that view, deterministically.

``normalize(x) = x / max(|x|, 1e-12)`` (as ``torch.nn.functional.normalize``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from facecompat import dist
from facecompat.data.splits import dataset_fingerprint
from facecompat.errors import UserError
from facecompat.fileio import atomic_write

if TYPE_CHECKING:
    import torch

    from facecompat.data.faces import FaceRecords
    from facecompat.models.spec import ModelSpec

FORMAT = 1
FEATURES, RECORD_IDS, LABELS, PROGRESS = "features.npy", "record_ids.npy", "labels.npy", "progress.npy"
BUILD_META, BANK_META = "build.json", "bank.json"
_STAT_FILES = {"class_ids": ("class_ids.npy", np.int64), "means": ("class_means.npy", np.float32),
               "count": ("class_count.npy", np.int64), "angle_mean": ("class_angle_mean.npy", np.float32),
               "angle_max": ("class_angle_max.npy", np.float32),
               "centres": ("class_boundary_centres.npy", np.float32),
               "radius": ("class_boundary_radius.npy", np.float32)}
_CREDIBLE_RULE = 2  # in the mask's file name: masks of an earlier rule are never reused
_EPS = 1e-12


class BankError(UserError, ValueError):
    """A bank directory that is missing, unfinished, damaged or does not match (one line, names it)."""


class ClassStats(NamedTuple):
    """Per-class statistics of the old features (see the module docstring for definitions).

    Attributes:
        class_ids: int64 ``[C]`` ascending dataset classes present in the bank.
        means: float32 ``[C, D]`` L2-normalised class means of the fused unit vectors.
        count: int64 ``[C]`` records per class.
        angle_mean: float32 ``[C]`` mean angle (radians) of a class's records to its mean.
        angle_max: float32 ``[C]`` largest such angle.
        centres: float32 ``[C, D]`` AdvBCT boundary centres: plain means of the unit image features
            (not renormalised, so inside the unit ball).
        radius: float32 ``[C]`` AdvBCT boundary radius: the largest distance of a unit image feature
            to its centre inside the class's Tukey fences (:func:`fenced_max`).
    """

    class_ids: np.ndarray
    means: np.ndarray
    count: np.ndarray
    angle_mean: np.ndarray
    angle_max: np.ndarray
    centres: np.ndarray
    radius: np.ndarray


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(_EPS))


def fuse(features: np.ndarray) -> np.ndarray:
    """``[n, 2, D]`` (image, flip) features -> float32 ``[n, D]`` fused unit vectors ``u``."""
    f = _normalize(np.asarray(features, dtype=np.float32))
    return _normalize(f[:, 0] + f[:, 1])


def fenced_max(values: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group, the largest of its ``values`` inside the Tukey fences ``[q1 - 1.5 IQR, q3 + 1.5 IQR]``.

    ``q1`` and ``q3`` are the group's sorted values at 0-based positions ``floor(n/4)`` and
    ``floor(3n/4)`` (AdvBCT's ``gen_class_meta`` indexes them so; no numpy percentile method does
    for every ``n``). Groups of fewer than 4 values are not fenced.

    Args:
        values: ``[N]`` finite values; groups: int ``[N]`` group of each, in ``[0, num_groups)``.
    Returns:
        ``values.dtype`` ``[num_groups]``; 0 for an empty group.
    """
    groups = np.asarray(groups, dtype=np.int64)
    order = np.lexsort((values, groups))
    v, g = values[order], groups[order]
    count = np.bincount(groups, minlength=num_groups)
    start = np.r_[0, np.cumsum(count)[:-1]].astype(np.int64)
    has = count > 0
    q1, q3 = np.zeros(num_groups, v.dtype), np.zeros(num_groups, v.dtype)
    q1[has] = v[start[has] + count[has] // 4]
    q3[has] = v[start[has] + (3 * count[has]) // 4]
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    inside = (count[g] < 4) | ((v >= low[g]) & (v <= high[g]))
    out = np.zeros(num_groups, v.dtype)
    if has.any():  # q1 and q3 themselves are always inside: no group keeps nothing
        out[has] = np.maximum.reduceat(np.where(inside, v, -np.inf).astype(v.dtype), start[has])
    return out


def keep_counts(ratio: float, counts: np.ndarray) -> np.ndarray:
    """int64 ``ceil(ratio * n)`` for each ``n`` in ``counts``, with ``ratio`` read as the decimal it
    was written as (``0.9`` is 9/10), so float64 rounding never keeps one more (``0.07 * 100`` is
    7.000000000000001: 7 are kept, not 8)."""
    frac = Fraction(float(ratio)).limit_denominator(1_000_000)
    counts = np.asarray(counts, dtype=np.int64)
    return -(-(counts * frac.numerator) // frac.denominator)


def _segments(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, keys at starts): ``keys[order]`` sorted, split into runs of equal keys."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if keys.size else \
        np.zeros(0, np.int64)
    return order, starts, sorted_keys[starts]


def _load_npy(path: Path, what: str, directory: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise BankError(f"{directory}: {what} missing ({path.name})") from None
    except (OSError, ValueError) as exc:  # truncated or not a .npy
        raise BankError(f"{directory}: {path.name} is damaged ({exc})") from None


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def _write_json(path: Path, obj: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _read_json(path: Path) -> dict | None:
    """The object in ``path``; None when the file is absent or unreadable."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _fingerprint(record_ids: np.ndarray, labels: np.ndarray) -> str:
    # dataset_fingerprint reads only .record_ids and .labels
    return dataset_fingerprint(SimpleNamespace(record_ids=record_ids, labels=labels))  # type: ignore[arg-type]


def _dataset_classes(view: FaceRecords) -> np.ndarray:
    labels = np.asarray(view.labels, dtype=np.int64)
    return labels if view.label_map is None else np.asarray(view.label_map, dtype=np.int64)[labels]


class FeatureBank:
    """A complete bank directory, memory-mapped read-only (see the module docstring).

    Attributes:
        directory: the bank directory.
        record_ids: int64 ``[N]`` ascending (memory-mapped).
        labels: int64 ``[N]`` dataset class of each row (memory-mapped).
        features: float16 ``[N, 2, D]`` read-only memmap; ``[:, 0]`` image, ``[:, 1]`` flip.
        embedding_size: ``D``.
        meta: the contents of ``bank.json``.
        num_extracted: records whose features the :func:`build_bank` call that returned this bank
            extracted (all ranks together); 0 for a bank that was only opened.
    """

    def __init__(self, directory: Path, meta: dict, record_ids: np.ndarray, labels: np.ndarray,
                 features: np.ndarray):
        self.directory, self.meta = directory, meta
        self.record_ids, self.labels, self.features = record_ids, labels, features
        self.embedding_size = int(features.shape[2])
        self.chunk_rows = int(meta.get("chunk_rows") or 8192)
        self.num_extracted = 0
        self._stats: ClassStats | None = None
        self._credible: dict[float, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.record_ids.shape[0])

    def __repr__(self) -> str:
        return f"FeatureBank({str(self.directory)!r}, records={len(self)}, dim={self.embedding_size})"

    # -- opening and writing ---------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike) -> FeatureBank:
        """Memory-map a complete bank.

        Raises:
            BankError: no complete ``bank.json`` (absent, unfinished or another format), a missing or
                damaged array, shapes or dtypes that disagree with each other or with ``bank.json``,
                record ids not strictly ascending.
        """
        directory = Path(directory)
        meta = _read_json(directory / BANK_META)
        if meta is None:
            raise BankError(f"{directory}: no readable {BANK_META} (not a bank, or an unfinished build)")
        if meta.get("format") != FORMAT or meta.get("complete") is not True:
            raise BankError(f"{directory}: {BANK_META} is not a complete format-{FORMAT} bank "
                            f"(format {meta.get('format')!r}, complete {meta.get('complete')!r})")
        ids = _load_npy(directory / RECORD_IDS, "record ids", directory)
        labels = _load_npy(directory / LABELS, "labels", directory)
        feats = _load_npy(directory / FEATURES, "features", directory)
        n, dim = meta.get("num_records"), meta.get("embedding_size")
        expected = [(ids, (n,), np.int64), (labels, (n,), np.int64), (feats, (n, 2, dim), np.float16)]
        for array, shape, dtype in expected:
            if array.shape != shape or array.dtype != dtype:
                raise BankError(f"{directory}: {Path(array.filename).name} holds {array.dtype} "
                                f"{tuple(array.shape)}, {BANK_META} says {np.dtype(dtype)} {shape}")
        for start in range(0, max(n - 1, 0), 1 << 20):  # strictly ascending, checked in slices
            part = np.asarray(ids[start:start + (1 << 20) + 1])
            if (part[1:] <= part[:-1]).any():
                raise BankError(f"{directory}: {RECORD_IDS} is not strictly ascending")
        return cls(directory, meta, ids, labels, feats)

    @classmethod
    def from_arrays(cls, directory: str | os.PathLike, record_ids: np.ndarray, labels: np.ndarray,
                    features: np.ndarray, *, model: dict, dataset: str | None = None,
                    source_rec: str = "", chunk_rows: int = 8192) -> FeatureBank:
        """Write a complete bank from arrays (tests, benchmarks, imports) and open it.

        Rows are sorted by record id. The bank is built in ``<directory>.partial`` and renamed onto
        ``directory``, which must not exist yet or be empty.

        Args:
            record_ids: ``[N]`` distinct record ids.
            labels: ``[N]`` dataset classes.
            features: ``[N, 2, D]`` (image, flip) features, stored as float16.
            model: the model fingerprint to store (``spec.fingerprint()`` plus ``"name"``).
            dataset: dataset fingerprint (default: that of the sorted ids and labels).
        """
        directory = Path(directory)
        ids = np.asarray(record_ids, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        features = np.asarray(features)
        if ids.ndim != 1 or labels.shape != ids.shape or features.ndim != 3 \
                or features.shape[:2] != (ids.size, 2):
            raise BankError(f"{directory}: expected ids [N], labels [N], features [N, 2, D]; got "
                            f"{ids.shape}, {labels.shape}, {features.shape}")
        order = np.argsort(ids, kind="stable")
        ids, labels = ids[order], labels[order]
        if ids.size > 1 and (ids[1:] == ids[:-1]).any():
            raise BankError(f"{directory}: record id {int(ids[1:][ids[1:] == ids[:-1]][0])} appears twice")
        if directory.exists() and any(directory.iterdir()):
            raise BankError(f"{directory}: exists and is not empty")
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        np.save(partial / RECORD_IDS, ids)
        np.save(partial / LABELS, labels)
        out = np.lib.format.open_memmap(partial / FEATURES, mode="w+", dtype=np.float16,
                                        shape=(ids.size, 2, features.shape[2]))
        for start in range(0, ids.size, chunk_rows):  # in slices: features may be a memmap itself
            out[start:start + chunk_rows] = features[order[start:start + chunk_rows]]
        out.flush()
        del out
        meta = _bank_meta(ids.size, features.shape[2], chunk_rows, model,
                          dataset if dataset is not None else _fingerprint(ids, labels), source_rec)
        _write_json(partial / BANK_META, meta)
        if directory.exists():
            directory.rmdir()
        os.replace(partial, directory)
        return cls.open(directory)

    # -- per-sample lookups ----------------------------------------------------------------------
    def rows(self, record_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """int64 row of each record id; BankError naming the first id not in the bank."""
        ids = np.asarray(record_ids, dtype=np.int64)
        n = len(self)
        if n == 0:
            if ids.size:
                raise BankError(f"{self.directory}: record id {int(ids.flat[0])} is not in the bank (empty)")
            return np.zeros(ids.shape, np.int64)
        pos = np.searchsorted(self.record_ids, ids).clip(0, n - 1)
        bad = self.record_ids[pos] != ids
        if bad.any():
            raise BankError(f"{self.directory}: record id {int(ids[bad][0])} is not in the bank "
                            f"({int(bad.sum())} of {ids.size} ids missing)")
        return pos.astype(np.int64, copy=False)

    def lookup(self, record_ids: np.ndarray | Sequence[int],
               flipped: np.ndarray | Sequence[bool]) -> np.ndarray:
        """float32 ``[b, D]`` old features of the images as the batch holds them: the flip's row where
        ``flipped`` is True, the image's otherwise."""
        return self.features_at(self.rows(record_ids), flipped)

    def features_at(self, rows: np.ndarray, flipped: np.ndarray | Sequence[bool]) -> np.ndarray:
        """:meth:`lookup` by bank rows (from :meth:`rows`), for callers that need the rows too."""
        column = np.asarray(flipped, dtype=bool).astype(np.int64)
        if column.shape != rows.shape:
            raise ValueError(f"record_ids {rows.shape} and flipped {column.shape} differ in shape")
        return np.asarray(self.features[rows, column], dtype=np.float32)

    # -- statistics ------------------------------------------------------------------------------
    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 ``[n, 2, D]`` features) of consecutive slices of the bank."""
        for start in range(0, len(self), self.chunk_rows):
            yield start, np.asarray(self.features[start:start + self.chunk_rows], dtype=np.float32)

    def class_stats(self) -> ClassStats:
        """Per-class statistics; computed and written (atomically) on first use, memory-mapped after."""
        if self._stats is None:
            self._stats = self._load_stats()
        if self._stats is None:
            self._stats = self._compute_stats()
            for key, (name, _) in _STAT_FILES.items():
                _save_npy(self.directory / name, getattr(self._stats, key))
            self._stats = self._load_stats() or self._stats
        return self._stats

    def _load_stats(self) -> ClassStats | None:
        """The stored statistics; None when a file is absent (e.g. written before a field existed),
        unreadable or of the wrong dtype or shape: they are then computed again."""
        arrays = {}
        for key, (name, dtype) in _STAT_FILES.items():
            try:
                arrays[key] = np.load(self.directory / name, mmap_mode="r")
            except (OSError, ValueError):
                return None
            if arrays[key].dtype != dtype:
                return None
        c, dim = arrays["class_ids"].shape[0], self.embedding_size
        shapes_ok = all(arrays[k].shape == (c, dim) for k in ("means", "centres")) and all(
            arrays[k].shape == (c,) for k in ("class_ids", "count", "angle_mean", "angle_max", "radius"))
        return ClassStats(**arrays) if shapes_ok else None

    def _class_index(self) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(self.labels)
        class_ids = np.unique(labels)
        return class_ids, np.searchsorted(class_ids, labels)

    def _class_sums(self, inv: np.ndarray, num_classes: int, rows_of: Callable[[np.ndarray], np.ndarray],
                    width: int, dtype: type = np.float32) -> np.ndarray:
        """``[C, width]`` sums over each class of ``rows_of(chunk features)``, one pass over the bank."""
        sums = np.zeros((num_classes, width), dtype)
        for start, f in self._chunks():
            order, starts, keys = _segments(inv[start:start + len(f)])
            if keys.size:
                sums[keys] += np.add.reduceat(rows_of(f)[order], starts, axis=0)
        return sums

    def _compute_stats(self) -> ClassStats:
        class_ids, inv = self._class_index()
        num_classes, n = class_ids.size, len(self)
        count = np.bincount(inv, minlength=num_classes).astype(np.int64)
        dim = self.embedding_size
        sums = self._class_sums(inv, num_classes, lambda f: np.concatenate([fuse(f), _normalize(f[:, 0])], 1),
                                2 * dim)
        means = _normalize(sums[:, :dim])
        centres = (sums[:, dim:] / np.maximum(count, 1)[:, None]).astype(np.float32)
        angles, dists = np.empty(n, np.float32), np.empty(n, np.float32)
        for start, f in self._chunks():
            part = inv[start:start + len(f)]
            cos = np.einsum("nd,nd->n", fuse(f), means[part])
            angles[start:start + len(f)] = np.arccos(np.clip(cos, -1.0, 1.0))
            dists[start:start + len(f)] = np.linalg.norm(_normalize(f[:, 0]) - centres[part], axis=1)
        angle_sum = np.bincount(inv, weights=angles, minlength=num_classes)
        angle_max = np.zeros(num_classes, np.float32)
        np.maximum.at(angle_max, inv, angles)
        angle_mean = (angle_sum / np.maximum(count, 1)).astype(np.float32)
        radius = fenced_max(dists, inv, num_classes)
        return ClassStats(class_ids.astype(np.int64), means, count, angle_mean, angle_max, centres, radius)

    def class_rows(self, classes: np.ndarray | Sequence[int], missing: int | None = None) -> np.ndarray:
        """int64 index into :meth:`class_stats` of each dataset class.

        A class without a record in the bank is a BankError, or, with ``missing`` (e.g. -1), gets
        that value: a view that keeps the dataset's labels can hold class ids without any image
        (gaps in the labels), which are never a label; callers give them placeholder statistics.
        """
        class_ids = self.class_stats().class_ids
        classes = np.asarray(classes, dtype=np.int64)
        pos = np.searchsorted(class_ids, classes).clip(0, max(class_ids.size - 1, 0))
        bad = (class_ids[pos] != classes) if class_ids.size else np.ones(classes.shape, bool)
        if missing is not None:
            return np.where(bad, missing, pos).astype(np.int64, copy=False)
        if bad.any():
            raise BankError(f"{self.directory}: dataset class {int(classes[bad][0])} has no record "
                            "in the bank")
        return pos.astype(np.int64, copy=False)

    def credible(self, keep_ratio: float) -> np.ndarray:
        """bool ``[N]`` MixBCT credible mask for ``keep_ratio`` in (0, 1] (see the module docstring);
        written to ``credible_v2_<ratio>.npy`` on first use and memory-mapped after."""
        ratio = float(keep_ratio)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"credible keep ratio must be in (0, 1], got {keep_ratio}")
        if ratio in self._credible:
            return self._credible[ratio]
        path = self.directory / f"credible_v{_CREDIBLE_RULE}_{ratio!r}.npy"
        try:
            mask = np.load(path, mmap_mode="r")
            if mask.shape != (len(self),) or mask.dtype != bool:
                raise ValueError("shape")
        except (OSError, ValueError):
            _save_npy(path, self._credible_mask(ratio))
            mask = np.load(path, mmap_mode="r")
        self._credible[ratio] = mask
        return mask

    def credible_distances(self) -> np.ndarray:
        """float64 ``[N]`` distance of each record to its class mean in MixBCT's denoising space:
        unit image features with every column divided by its L2 norm over the bank."""
        class_ids, inv = self._class_index()
        square = np.zeros(self.embedding_size, np.float64)
        for _, f in self._chunks():
            square += np.square(_normalize(f[:, 0]), dtype=np.float64).sum(axis=0)
        column = np.sqrt(square)
        column[column == 0] = 1.0  # as sklearn: an all-zero column stays zero

        def scaled(f: np.ndarray) -> np.ndarray:
            return _normalize(f[:, 0]).astype(np.float64) / column

        count = np.bincount(inv, minlength=class_ids.size)
        means = self._class_sums(inv, class_ids.size, scaled, self.embedding_size, np.float64) \
            / np.maximum(count, 1)[:, None]
        dists = np.empty(len(self), np.float64)
        for start, f in self._chunks():
            dists[start:start + len(f)] = np.linalg.norm(scaled(f) - means[inv[start:start + len(f)]], axis=1)
        return dists

    def _credible_mask(self, ratio: float) -> np.ndarray:
        _, inv = self._class_index()
        dists = self.credible_distances()
        # by class, then distance, then row (= record id, rows are sorted by it)
        order = np.lexsort((np.arange(len(self)), dists, inv))
        counts = np.bincount(inv)
        class_start = np.r_[0, np.cumsum(counts)[:-1]]
        rank_in_class = np.arange(len(self)) - class_start[inv[order]]
        mask = np.zeros(len(self), bool)
        mask[order] = rank_in_class < keep_counts(ratio, counts)[inv[order]]
        return mask

    # -- checks ----------------------------------------------------------------------------------
    def check_view(self, view: FaceRecords) -> None:
        """Every record of ``view`` is in the bank with the same dataset class.

        Raises:
            BankError: with the number of missing records / records of another class and the first one.
        """
        ids = np.asarray(view.record_ids, dtype=np.int64)
        classes = _dataset_classes(view)
        n = len(self)
        pos = np.searchsorted(self.record_ids, ids).clip(0, max(n - 1, 0))
        missing = (self.record_ids[pos] != ids) if n else np.ones(ids.shape, bool)
        if missing.any():
            raise BankError(f"{self.directory}: {int(missing.sum())} of {ids.size} records of the training "
                            f"view are not in the bank (first: record id {int(ids[missing][0])}); the bank "
                            f"was built for another dataset ({self.meta.get('source_rec')})")
        stored = np.asarray(self.labels[pos])
        other = stored != classes
        if other.any():
            i = int(np.flatnonzero(other)[0])
            raise BankError(f"{self.directory}: {int(other.sum())} of {ids.size} records of the training "
                            f"view have another class in the bank (first: record id {int(ids[i])}, class "
                            f"{int(classes[i])} in the view, {int(stored[i])} in the bank)")

    def check_model(self, fingerprint: dict) -> None:
        """The bank was extracted by the model ``fingerprint`` describes (each of its keys must equal the
        stored one, e.g. ``spec.fingerprint()``); BankError naming the keys that differ."""
        stored = self.meta.get("model") or {}
        diff = [f"{k}: bank {stored.get(k)!r}, model {v!r}"
                for k, v in fingerprint.items() if stored.get(k) != v]
        if diff:
            raise BankError(f"{self.directory}: the bank holds features of another model ("
                            + "; ".join(diff) + "); remove it or choose another bank directory")


def _bank_meta(num_records: int, embedding_size: int, chunk_rows: int, model: dict, dataset: str,
               source_rec: str) -> dict:
    return {"format": FORMAT, "complete": True, "num_records": int(num_records),
            "embedding_size": int(embedding_size), "chunk_rows": int(chunk_rows), "model": dict(model),
            "dataset": dataset, "source_rec": str(source_rec)}


def default_bank_dir(output_root: str | os.PathLike, spec: ModelSpec, view: FaceRecords) -> Path:
    """``<output_root>/banks/<spec.name>-<12 hex>``: the hex digest of the model fingerprint (weights
    hash, network, dimension) and of the view's dataset fingerprint."""
    key = json.dumps(spec.fingerprint(), sort_keys=True) + dataset_fingerprint(view)
    return Path(output_root) / "banks" / f"{spec.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


# --- building ------------------------------------------------------------------------------------


def _sorted_view(view: FaceRecords) -> FaceRecords:
    """A copy of ``view`` in ascending record-id order, without random flips."""
    import copy

    order = np.argsort(np.asarray(view.record_ids), kind="stable")
    out = copy.copy(view)
    out.record_ids = np.asarray(view.record_ids, dtype=np.int64)[order]
    out.labels = np.asarray(view.labels, dtype=np.int64)[order]
    out.flip = False
    return out


def _prepare(directory: Path, build: dict, record_ids: np.ndarray, classes: np.ndarray) -> None:
    """Rank 0: create the build files, or check that the unfinished build there is this one."""
    stored = _read_json(directory / BUILD_META)
    if stored is not None:
        # source_rec is informative only: the dataset fingerprint says whether the records are the same
        diff = [k for k in build if k != "source_rec" and stored.get(k) != build[k]]
        if diff:
            raise BankError(f"{directory}: holds an unfinished build of another model or dataset (differs in "
                            f"{', '.join(diff)}); remove it or choose another bank directory")
        n, dim, chunks = build["num_records"], build["embedding_size"], _num_chunks(build)
        for name, shape, dtype in ((FEATURES, (n, 2, dim), np.float16), (PROGRESS, (chunks,), np.uint8)):
            array = _load_npy(directory / name, name, directory)
            if array.shape != shape or array.dtype != dtype:
                raise BankError(f"{directory}: unfinished build with a damaged {name} ({array.dtype} "
                                f"{tuple(array.shape)}, expected {np.dtype(dtype)} {shape}); remove it")
        return
    # A new build; build.json goes last, so its presence means every other file is whole.
    directory.mkdir(parents=True, exist_ok=True)
    (directory / BANK_META).unlink(missing_ok=True)
    _save_npy(directory / RECORD_IDS, record_ids)
    _save_npy(directory / LABELS, classes)
    np.lib.format.open_memmap(directory / FEATURES, mode="w+", dtype=np.float16,
                              shape=(build["num_records"], 2, build["embedding_size"])).flush()
    _save_npy(directory / PROGRESS, np.zeros(_num_chunks(build), np.uint8))
    _write_json(directory / BUILD_META, build)


def _num_chunks(build: dict) -> int:
    return -(-build["num_records"] // build["chunk_rows"])


def _identity(batch: Any) -> Any:
    return batch


def _batch_keys(chunks: Iterable[int], num: int, chunk_rows: int, batch_size: int) -> list[tuple[int, Any]]:
    """(chunk, BatchKey) of every batch of ``chunks``, batches never crossing a chunk's end."""
    from facecompat.data.loader import BatchKey

    keys = []
    for c in chunks:
        stop = min(num, (c + 1) * chunk_rows)
        for start in range(c * chunk_rows, stop, batch_size):
            keys.append((c, BatchKey(0, np.arange(start, min(start + batch_size, stop), dtype=np.int64))))
    return keys


def _extract_chunks(model: torch.nn.Module, view: FaceRecords, directory: Path, chunks: list[int],
                    chunk_rows: int, *, batch_size: int, num_workers: int, device: torch.device,
                    autocast_dtype: torch.dtype | None, progress: bool) -> None:
    """Embed the records of ``chunks`` (image and flip) into features.npy; mark each chunk done once
    its rows are flushed.

    A chunk's features collect in one float16 buffer on ``device`` and come back to the host once, after
    its last batch, where they are checked and written: nothing waits for the device between batches.
    """
    import torch
    from tqdm import tqdm

    from facecompat.data.loader import normalize_images

    feats = np.load(directory / FEATURES, mmap_mode="r+")
    done = np.load(directory / PROGRESS, mmap_mode="r+")
    num, dim = feats.shape[0], feats.shape[2]
    keys = _batch_keys(chunks, num, chunk_rows, batch_size)
    loader = _chunk_loader(view, [k for _, k in keys], num_workers, device)
    bar = tqdm(total=2 * sum(len(k.positions) for _, k in keys), unit="img",
               desc=f"features {directory.name}",
               disable=not progress or dist.get_rank() != 0, leave=False)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.float16,
                                                enabled=autocast_dtype is not None):
        buf = torch.empty((min(chunk_rows, num), 2, dim), dtype=torch.float16, device=device)
        for (chunk, key), host in zip(keys, loader):
            x = normalize_images(host.images.to(device, non_blocking=True))
            emb = model(torch.cat([x, x.flip(3)]))
            b = x.shape[0]
            if emb.ndim != 2 or emb.shape[1] != dim:
                raise BankError(f"{directory}: the old model outputs {tuple(emb.shape[1:])}-d embeddings, "
                                f"its spec says {dim}")
            start = chunk * chunk_rows
            rows = slice(int(key.positions[0]) - start, int(key.positions[-1]) + 1 - start)
            buf[rows, 0] = emb[:b]  # float32 (or autocast's dtype) -> float16 on the device
            buf[rows, 1] = emb[b:]
            bar.update(2 * b)
            if rows.stop == min(num, start + chunk_rows) - start:  # the chunk's last batch
                _store_chunk(buf[:rows.stop], feats, done, chunk, start, view.record_ids, directory)
    bar.close()


def _chunk_loader(view: FaceRecords, keys: list[Any], num_workers: int,
                  device: torch.device) -> torch.utils.data.DataLoader:
    """In-order host batches of ``keys``: float32 normalised in the workers for a CPU device (the
    training loader's normalisation), uint8 otherwise (normalised on the device the same way);
    pinned for CUDA so the copies overlap."""
    import cv2
    from torch.utils.data import DataLoader

    from facecompat.data.loader import _BatchReader

    if num_workers:
        cv2.setNumThreads(0)  # parallelism comes from the worker processes (as TorchLoader does)
    return DataLoader(_BatchReader(view, normalize=device.type == "cpu"), batch_sampler=keys,
                      collate_fn=_identity, num_workers=num_workers, pin_memory=device.type == "cuda")


def _store_chunk(chunk_feats: torch.Tensor, feats: np.ndarray, done: np.ndarray, chunk: int, start: int,
                 record_ids: np.ndarray, directory: Path) -> None:
    """Check a chunk's float16 ``[n, 2, D]`` device features, write them at row ``start`` of
    features.npy and mark the chunk done once they are flushed."""
    import torch

    finite = torch.isfinite(chunk_feats).flatten(1).all(dim=1)
    out = chunk_feats.cpu().numpy()  # the one wait for the device per chunk
    finite = finite.cpu().numpy()
    if not finite.all():
        bad = int(record_ids[start + int(np.flatnonzero(~finite)[0])])
        raise BankError(f"{directory}: the old model's feature of record {bad} is not finite in float16")
    feats[start:start + len(out)] = out
    feats.flush()  # rows reach the file before the chunk is marked done
    done[chunk] = 1
    done.flush()


def build_bank(view: FaceRecords, spec: ModelSpec, directory: str | os.PathLike, *, batch_size: int = 256,
               num_workers: int | None = None, device: torch.device | str | None = None,
               autocast_dtype: torch.dtype | None = None, chunk_rows: int = 8192, progress: bool = True,
               max_chunks: int | None = None) -> FeatureBank:
    """Extract the old model's features of every record of ``view`` into ``directory``.

    Every rank calls it (one process: the same). Rank 0 creates the files or checks the unfinished
    build there (same records, dimension, chunking, model); the chunks not yet done are split
    ``todo[rank::world]`` (so a build resumes under another world size), each rank embeds its chunks
    batch by batch (image and flip in one forward) into a device buffer per chunk, reads each chunk
    back once (no host sync per batch) and marks it done once its rows are flushed. Rank 0 then
    writes ``bank.json`` and every rank opens the bank.

    Args:
        view: the training view (any record order; flips are ignored: both sides are stored).
        spec: the old model (loaded with :func:`~facecompat.models.spec.load_model`).
        batch_size: images per forward (x2 with the flips).
        num_workers: DataLoader processes decoding images; ``None``:
            :func:`~facecompat.eval.extract.default_num_workers` (the machine's cores, at most 8 per
            rank); 0 decodes in this process. The features do not depend on it.
        device: where the model runs (default CUDA when available, else CPU).
        autocast_dtype: run under autocast with this dtype (e.g. ``torch.float16`` on CUDA).
        chunk_rows: records per chunk, the unit of resumption.
        progress: a tqdm bar (rank 0).
        max_chunks: stop after this many chunks on this rank (tests: simulates a kill).

    Raises:
        ValueError: ``num_workers`` < 0.
        BankError: an unfinished build of another model/dataset in ``directory``, a model whose output
            dimension is not ``spec.embedding_size``, non-finite features (checked per chunk; names the
            first record), or a build left unfinished (``max_chunks``).
    """
    from facecompat.eval.extract import default_num_workers
    from facecompat.models.spec import load_model

    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 decodes in this process), got {num_workers}")
    workers = default_num_workers() if num_workers is None else num_workers

    directory = Path(directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    sorted_view = _sorted_view(view)
    classes = _dataset_classes(sorted_view)
    num, dim = sorted_view.num_images, int(spec.embedding_size)
    if num == 0:
        raise BankError(f"{directory}: the training view has no records")
    build: dict | None = None
    problem = None
    if rank == 0:
        build = {"format": FORMAT, "num_records": num, "embedding_size": dim, "chunk_rows": int(chunk_rows),
                 "model": {**spec.fingerprint(), "name": spec.name},
                 "dataset": _fingerprint(sorted_view.record_ids, classes), "source_rec": str(view.path)}
        try:
            _prepare(directory, build, sorted_view.record_ids, classes)
        except (BankError, OSError) as exc:
            problem = str(exc)
    problem, build = dist.broadcast_object((problem, build))  # type: ignore[misc]
    if problem is not None:
        raise BankError(problem)
    todo = np.flatnonzero(np.load(directory / PROGRESS) == 0).tolist()
    mine = todo[rank::world][:max_chunks]
    error: Exception | None = None
    if mine:
        try:
            device = dist.resolve_device(device)
            model = load_model(spec, device)
            _extract_chunks(model, sorted_view, directory, mine, int(chunk_rows), batch_size=batch_size,
                            num_workers=workers, device=device, autocast_dtype=autocast_dtype,
                            progress=progress)
        except Exception as exc:  # agree on failure: a rank that raised alone would leave the others waiting
            if world == 1:
                raise
            error = exc
    if dist.all_reduce_flag(error is not None):
        raise error if error is not None else BankError(f"{directory}: extraction failed on another rank")
    if rank == 0:
        left = int((np.load(directory / PROGRESS) == 0).sum())
        if left:
            problem = (f"{directory}: unfinished build, {left} of {_num_chunks(build)} chunks left "
                       "(stopped by max_chunks); run again to resume")
        else:
            meta = {k: v for k, v in build.items() if k != "format"}
            _write_json(directory / BANK_META, _bank_meta(**meta))
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise BankError(problem)
    bank = FeatureBank.open(directory)
    bank.num_extracted = int(sum(min(num, (c + 1) * chunk_rows) - c * chunk_rows for c in todo))
    return bank


def ensure_bank(view: FaceRecords, spec: ModelSpec, directory: str | os.PathLike, *,
                credible_ratios: Sequence[float] = (), **build_kw: Any) -> FeatureBank:
    """The bank of ``view`` under ``spec`` in ``directory``: opened when complete, else built or resumed.

    A complete bank must match: :meth:`FeatureBank.check_model` and :meth:`FeatureBank.check_view`
    (a mismatch is a BankError, never a silent rebuild). Then rank 0 computes the class statistics and
    the credible masks of ``credible_ratios`` while the other ranks wait. Every rank returns the bank.

    Args:
        build_kw: passed to :func:`build_bank`.
    """
    directory = Path(directory)
    rank = dist.get_rank()
    complete, problem = False, None
    if rank == 0:
        meta = _read_json(directory / BANK_META)
        complete = meta is not None and meta.get("complete") is True
        if complete:
            try:
                bank = FeatureBank.open(directory)
                bank.check_model(spec.fingerprint())
                bank.check_view(view)
            except BankError as exc:
                problem = str(exc)
    complete, problem = dist.broadcast_object((complete, problem))  # type: ignore[misc]
    if problem is not None:
        raise BankError(problem)
    bank = FeatureBank.open(directory) if complete else build_bank(view, spec, directory, **build_kw)
    if rank == 0:
        try:
            bank.class_stats()
            for ratio in credible_ratios:
                bank.credible(ratio)
        except (BankError, ValueError, OSError) as exc:
            problem = str(exc)
    problem = dist.broadcast_object(problem)
    if problem is not None:
        raise BankError(problem)
    return bank
