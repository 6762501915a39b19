"""A faiss gallery index: cosine (inner product of L2-normalised vectors) k-nearest search over items.

    store = FeatureStore.open("galleries/ijbc-old")
    index = GalleryIndex.from_store(store, query_version="r50-0123456789ab",
                                    declared={("r50-0123456789ab", "r18-89abcdef0123")})  # BCT-compatible
    scores, item_ids = index.search(query_emb, k=10)      # [q, 10] float32 cosine, [q, 10] int64 ids

Kinds: ``"flat"`` is the exact search (``IndexFlatIP`` inside ``IndexIDMap2``, which maps faiss's
positions to item ids); ``"ivf"`` is ``IndexIVFFlat`` with an inner-product coarse quantizer, trained
on the gallery itself (k-means on at most 256 vectors per list, a seeded sample, as faiss samples
itself), searching ``nprobe`` of its ``nlist`` lists. faiss wants at least 39 training vectors per
list; a smaller gallery gets ``nlist = N // 39`` lists (with a warning), and one with fewer than 78
vectors (one list, which is an exhaustive search anyway) the flat index.

The CPU index is the authoritative copy. When faiss sees a GPU (``faiss.get_num_gpus() > 0``) and
``use_gpu`` is not False, searches run on a copy made by ``faiss.index_cpu_to_all_gpus`` (the flat
index's inner ``IndexFlatIP``, whose positions map back to ids through the ID map; the IVF index
whole, ids included), made at the first search after a change. Replacing rows (backfill) is
``remove_ids`` + ``add_with_ids`` on the CPU index (faiss GPU indexes cannot remove) and drops the
GPU copy. Replaced rows of an IVF index go to the lists of the existing quantizer, which is not
retrained: after most of a gallery moved to another model, build a new index.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from facecompat.index.store import (
    FeatureStore,
    IncompatibleError,
    VersionLike,
    check_comparable,
    comparable,
    version_space,
)

MIN_POINTS_PER_LIST = 39  # faiss's k-means warns below this many training vectors per centroid
MAX_POINTS_PER_LIST = 256  # faiss's k-means samples down to this many per centroid
GPU_MAX_K = 2048  # faiss GPU k-selection limit; larger k searches on the CPU
_CHUNK_ROWS = 65_536
KINDS = ("flat", "ivf")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError("GalleryIndex needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def normalize_rows(x: np.ndarray, what: str, dim: int | None = None, first_row: int = 0) -> np.ndarray:
    """[n, D] float32 L2-normalised copy of ``x``; ValueError naming ``what`` for a wrong shape or a row
    with NaN/inf or zero norm (rows numbered from ``first_row``)."""
    x = np.asarray(x)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"[n, {dim}]" if dim is not None else "[n, D]"
        raise ValueError(f"{what}: expected {want} vectors, got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{what}: expected numbers, got {x.dtype}")
    x = np.array(x, np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: row {first_row + int(np.flatnonzero(bad)[0])} has a NaN or infinite value")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise ValueError(f"{what}: row {first_row + int(np.flatnonzero(zero)[0])} is a zero vector "
                         "(no direction)")
    x /= norms
    return x


class GalleryIndex:
    """faiss k-nearest search by cosine over gallery items (see the module docstring).

    Args:
        features: [N, D] gallery vectors (any scale; L2-normalised on add), N >= 1.
        ids: [N] unique int64 item ids (default ``arange(N)``).
        kind: ``"flat"`` (exact) or ``"ivf"``.
        nlist: IVF lists (default ``4 sqrt(N)``, at most ``N // 39``).
        nprobe: IVF lists searched per query (default ``min(16, nlist)``; more than nlist warns).
        use_gpu: None = when faiss sees a GPU; True without one is an error.
        query_space: when set (:meth:`from_store`), replacements must name a version comparable with it.
        declared: (query space, gallery space) pairs declared compatible.
        seed: of the IVF training sample (taken when N > 256 nlist).
    """

    def __init__(self, features: np.ndarray, ids: np.ndarray | None = None, *, kind: str = "flat",
                 nlist: int | None = None, nprobe: int | None = None, use_gpu: bool | None = None,
                 query_space: str | None = None, declared: Iterable[tuple[str, str]] = (),
                 seed: int = 0):
        faiss = _faiss()
        if kind not in KINDS:
            raise ValueError(f"index kind {kind!r} is unknown; valid: {', '.join(KINDS)}")
        shape = np.shape(features)
        if len(shape) != 2 or shape[1] < 1:
            raise ValueError(f"gallery features must be [N, D], got shape {shape}")
        num, self.dim = int(shape[0]), int(shape[1])
        if num == 0:
            raise ValueError("the gallery is empty: nothing to index")
        ids = np.arange(num, dtype=np.int64) if ids is None else np.asarray(ids)
        if ids.shape != (num,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"gallery ids must be {num} integers, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64)
        self._sorted_ids = np.sort(ids)
        if (self._sorted_ids[1:] == self._sorted_ids[:-1]).any():
            dup = self._sorted_ids[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]][0]
            raise ValueError(f"gallery id {int(dup)} appears more than once")
        if use_gpu and faiss_num_gpus() == 0:
            raise ValueError("use_gpu=True but faiss sees no GPU (faiss-cpu, or no device)")
        self.use_gpu = faiss_num_gpus() > 0 if use_gpu is None else bool(use_gpu)
        self.query_space, self.declared = query_space, {tuple(p) for p in declared}
        self.kind, self.nlist = kind, 1
        if kind == "flat" and (nlist is not None or nprobe is not None):
            warnings.warn("nlist and nprobe have no effect on a flat (exact) index", stacklevel=2)
        if kind == "ivf":
            self.nlist = self._choose_nlist(num, nlist)
            if self.nlist < 2:
                warnings.warn(f"an IVF index over {num} vectors would have one list (faiss needs "
                              f"{MIN_POINTS_PER_LIST} per list): using the exact flat index", stacklevel=2)
                self.kind = "flat"
        if self.kind == "flat":
            self._cpu = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
            self._cpu = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            self._quantizer = quantizer  # the IVF index does not own it: keep it alive
            self._train(features, seed)
        self._nprobe = 1
        if nprobe is not None and self.kind == "ivf" and nprobe > self.nlist:
            warnings.warn(f"nprobe {nprobe} > nlist {self.nlist}: searching all {self.nlist} lists",
                          stacklevel=2)
        self.nprobe = min(16 if nprobe is None else nprobe, self.nlist) if self.kind == "ivf" else 1
        self._gpu: Any = None
        self._gpu_id_map: np.ndarray | None = None
        for s in range(0, num, _CHUNK_ROWS):
            block = normalize_rows(features[s:s + _CHUNK_ROWS], "gallery features", self.dim, s)
            self._cpu.add_with_ids(block, np.ascontiguousarray(ids[s:s + _CHUNK_ROWS]))

    @classmethod
    def from_store(cls, store: FeatureStore, query_version: VersionLike,
                   declared: Iterable[tuple[str, str]] = (), **kwargs: Any) -> GalleryIndex:
        """Index every row of ``store`` (ids = the store's item ids) for queries of ``query_version``;
        IncompatibleError (:func:`~facecompat.index.store.check_comparable`) when a row's space is
        neither the query's nor declared compatible with it. kwargs: as the constructor."""
        declared = {tuple(p) for p in declared}
        check_comparable(query_version, store, declared)
        return cls(store.features, np.asarray(store.ids), query_space=version_space(query_version),
                   declared=declared, **kwargs)

    # --------------------------------------------------------------------------------- properties
    @property
    def ntotal(self) -> int:
        """Number of indexed items."""
        return int(self._cpu.ntotal)

    @property
    def ids(self) -> np.ndarray:
        """[N] int64 indexed item ids, ascending."""
        return self._sorted_ids

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        value = int(value)
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        if self.kind == "ivf" and value > self.nlist:
            warnings.warn(f"nprobe {value} > nlist {self.nlist}: searching all {self.nlist} lists",
                          stacklevel=2)
            value = self.nlist
        self._nprobe = value
        if self.kind == "ivf":
            self._cpu.nprobe = value
            self._gpu = None

    # ---------------------------------------------------------------------------------- building
    def _choose_nlist(self, num: int, nlist: int | None) -> int:
        most = num // MIN_POINTS_PER_LIST
        if nlist is None:
            return max(1, min(int(round(4 * math.sqrt(num))), most))
        if nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        if nlist > most:
            warnings.warn(f"nlist {nlist} needs >= {MIN_POINTS_PER_LIST * nlist} training vectors, the "
                          f"gallery has {num}: using nlist {max(most, 1)}", stacklevel=3)
            return max(most, 1)
        return int(nlist)

    def _train(self, features: np.ndarray, seed: int) -> None:
        num = int(np.shape(features)[0])
        budget = MAX_POINTS_PER_LIST * self.nlist
        if num > budget:  # the sample faiss would draw itself, but without reading all N rows into memory
            rows = np.sort(np.random.default_rng(seed).choice(num, budget, replace=False))
            sample = normalize_rows(np.asarray(features[rows]), "gallery features", self.dim)
        else:
            sample = normalize_rows(features, "gallery features", self.dim)
        self._cpu.train(sample)

    # ------------------------------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar items of every query.

        Args:
            queries: [q, D] query vectors (any scale; L2-normalised here).
            k: 1 <= k <= ntotal.

        Returns:
            scores [q, k] float32 cosine similarities, descending; ids [q, k] int64 item ids. An IVF
            search that reaches fewer than k items fills the rest with score -inf and id -1.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be an integer in [1, {self.ntotal}] (the gallery size), got {k!r}")
        q = normalize_rows(queries, "queries", self.dim)
        k = int(k)
        if self.use_gpu and k <= GPU_MAX_K:
            scores, labels = self._gpu_index().search(q, k)
            if self._gpu_id_map is not None:  # the flat copy answers positions
                labels = np.where(labels >= 0, self._gpu_id_map[np.maximum(labels, 0)], -1)
        else:
            scores, labels = self._cpu.search(q, k)
        scores = np.where(labels >= 0, scores, -np.inf).astype(np.float32)
        return scores, labels.astype(np.int64)

    def _gpu_index(self) -> Any:
        if self._gpu is None:
            faiss = _faiss()
            if self.kind == "flat":
                self._gpu = faiss.index_cpu_to_all_gpus(self._cpu.index)
                self._gpu_id_map = faiss.vector_to_array(self._cpu.id_map).astype(np.int64)
            else:
                self._gpu = faiss.index_cpu_to_all_gpus(self._cpu)
                self._gpu_id_map = None
                if hasattr(faiss, "GpuParameterSpace"):
                    faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", self._nprobe)
        return self._gpu

    # ------------------------------------------------------------------------------------ replace
    def replace(self, ids: np.ndarray, features: np.ndarray, version: VersionLike | None = None) -> None:
        """Replace the vectors of existing items ``ids`` [R] by ``features`` [R, D] (backfill).

        ``version`` (id or dict) is the model or transformation that made the new vectors; required
        for an index built :meth:`from_store`, whose query must be able to compare with it.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64)
        if np.unique(ids).size != ids.size:
            raise ValueError("ids to replace repeat")
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), self._sorted_ids.size - 1)
        missing = self._sorted_ids[pos] != ids
        if missing.any():
            raise ValueError(f"item id {int(ids[missing][0])} is not in the index "
                             f"({int(missing.sum())} missing)")
        if self.query_space is not None:
            if version is None:
                raise ValueError("this index was built from a feature store: name the version of the "
                                 "new vectors")
            space = version_space(version)
            if not comparable(self.query_space, space, self.declared):
                raise IncompatibleError(f"query version {self.query_space!r} cannot be compared with the "
                                        f"{ids.size} replacement vectors of space {space!r}")
        vectors = normalize_rows(features, "replacement features", self.dim)
        if vectors.shape[0] != ids.size:
            raise ValueError(f"{ids.size} ids but {vectors.shape[0]} replacement vectors")
        if ids.size == 0:
            return
        faiss = _faiss()
        removed = self._cpu.remove_ids(faiss.IDSelectorBatch(ids))
        assert removed == ids.size, (removed, ids.size)
        self._cpu.add_with_ids(vectors, ids)
        self._gpu, self._gpu_id_map = None, None


def faiss_num_gpus() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
