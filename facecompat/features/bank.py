"""The old-feature bank: the old model's embedding of every image of the new model's training view.

Backward-compatible training (BCT, L2, MixBCT, LCE, AdvBCT) reads the frozen old model's feature of
each training image. They are extracted once (:func:`facecompat.features.bank_build.build_bank`,
split over the ranks, resumable) into a directory and memory-mapped read-only by every rank and
loader worker: one copy per machine in the page cache, never one per process. This module holds the
format and :class:`FeatureBank`, the reader; the class statistics are defined in
:mod:`facecompat.features.bank_stats`.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from facecompat.data.faces import FaceRecords
from facecompat.data.splits import dataset_fingerprint
from facecompat.errors import UserError
from facecompat.features.bank_stats import (
    ClassStats,
    compute_class_stats,
    credible_distances,
    credible_mask,
)
from facecompat.fileio import atomic_write
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


class BankError(UserError, ValueError):
    """A bank directory that is missing, unfinished, damaged or does not match (one line, names it)."""


def load_npy(path: Path, what: str, directory: Path) -> np.ndarray:
    """``path`` memory-mapped read-only; BankError naming ``directory`` when it is missing or damaged."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise BankError(f"{directory}: {what} missing ({path.name})") from None
    except (OSError, ValueError) as exc:  # truncated or not a .npy
        raise BankError(f"{directory}: {path.name} is damaged ({exc})") from None


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (a reader sees the old file or the whole new one)."""
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` atomically, keys sorted."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def read_json(path: Path) -> dict | None:
    """The object in ``path``; None when the file is absent or unreadable."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def records_fingerprint(record_ids: np.ndarray, labels: np.ndarray) -> str:
    """The dataset fingerprint (:func:`~facecompat.data.splits.dataset_fingerprint`) of ids and labels."""
    # dataset_fingerprint reads only .record_ids and .labels
    return dataset_fingerprint(SimpleNamespace(record_ids=record_ids, labels=labels))  # type: ignore[arg-type]


def dataset_classes(view: FaceRecords) -> np.ndarray:
    """int64 ``[N]`` dataset class of each record of ``view`` (its labels through its ``label_map``)."""
    labels = np.asarray(view.labels, dtype=np.int64)
    return labels if view.label_map is None else np.asarray(view.label_map, dtype=np.int64)[labels]


class FeatureBank:
    """A complete bank directory, memory-mapped read-only (the layout in the module docstring).

    Attributes:
        directory: the bank directory.
        record_ids: int64 ``[N]`` ascending (memory-mapped).
        labels: int64 ``[N]`` dataset class of each row (memory-mapped).
        features: float16 ``[N, 2, D]`` read-only memmap; ``[:, 0]`` image, ``[:, 1]`` flip.
        embedding_size: ``D``.
        meta: the contents of ``bank.json``.
        num_extracted: records whose features the
            :func:`~facecompat.features.bank_build.build_bank` call that returned this bank extracted
            (all ranks together); 0 for a bank that was only opened.
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
        meta = read_json(directory / BANK_META)
        if meta is None:
            raise BankError(f"{directory}: no readable {BANK_META} (not a bank, or an unfinished build)")
        if meta.get("format") != FORMAT or meta.get("complete") is not True:
            raise BankError(f"{directory}: {BANK_META} is not a complete format-{FORMAT} bank "
                            f"(format {meta.get('format')!r}, complete {meta.get('complete')!r})")
        ids = load_npy(directory / RECORD_IDS, "record ids", directory)
        labels = load_npy(directory / LABELS, "labels", directory)
        feats = load_npy(directory / FEATURES, "features", directory)
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
        meta = bank_meta(ids.size, features.shape[2], chunk_rows, model,
                          dataset if dataset is not None else records_fingerprint(ids, labels), source_rec)
        write_json(partial / BANK_META, meta)
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
    def class_stats(self) -> ClassStats:
        """Per-class statistics; computed and written (atomically) on first use, memory-mapped after."""
        if self._stats is None:
            self._stats = self._load_stats()
        if self._stats is None:
            self._stats = compute_class_stats(self.features, self.labels, self.chunk_rows)
            for key, (name, _) in _STAT_FILES.items():
                save_npy(self.directory / name, getattr(self._stats, key))
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
        """bool ``[N]`` MixBCT credible mask for ``keep_ratio`` in (0, 1]
        (:func:`~facecompat.features.bank_stats.credible_mask`);
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
            save_npy(path, credible_mask(self.features, self.labels, ratio, self.chunk_rows))
            mask = np.load(path, mmap_mode="r")
        self._credible[ratio] = mask
        return mask

    def credible_distances(self) -> np.ndarray:
        """float64 ``[N]`` distance of each record to its class mean in MixBCT's denoising space
        (:func:`~facecompat.features.bank_stats.credible_distances`)."""
        return credible_distances(self.features, self.labels, self.chunk_rows)

    # -- checks ----------------------------------------------------------------------------------
    def check_view(self, view: FaceRecords) -> None:
        """Every record of ``view`` is in the bank with the same dataset class.

        Raises:
            BankError: with the number of missing records / records of another class and the first one.
        """
        ids = np.asarray(view.record_ids, dtype=np.int64)
        classes = dataset_classes(view)
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


def bank_meta(num_records: int, embedding_size: int, chunk_rows: int, model: dict, dataset: str,
              source_rec: str) -> dict:
    """The contents of a complete bank's ``bank.json``."""
    return {"format": FORMAT, "complete": True, "num_records": int(num_records),
            "embedding_size": int(embedding_size), "chunk_rows": int(chunk_rows), "model": dict(model),
            "dataset": dataset, "source_rec": str(source_rec)}


def default_bank_dir(output_root: str | os.PathLike, spec: ModelSpec, view: FaceRecords) -> Path:
    """``<output_root>/banks/<spec.name>-<12 hex>``: the hex digest of the model fingerprint (weights
    hash, network, dimension) and of the view's dataset fingerprint."""
    key = json.dumps(spec.fingerprint(), sort_keys=True) + dataset_fingerprint(view)
    return Path(output_root) / "banks" / f"{spec.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


