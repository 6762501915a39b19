"""A versioned gallery feature store: every stored vector carries the model or transformation that made it.

Directory layout::

    features.npy   float32 [N, D]       one vector per gallery item (as produced: not normalised)
    ids.npy        int64 [N]            item ids (face rows, template ids, ...), unique
    versions.npy   uint8 | int16 [N]    index of each row's version in store.json's "versions"
    store.json     written LAST: {"format": "facecompat-feature-store", "format_version": 1,
                   "num_items": N, "dim": D, "versions": [version, ...], "counts": {version id: rows},
                   "meta": {...caller's notes...}}

Every file is written to a temporary name and renamed into place (``os.replace``); ``store.json`` is
written after the arrays, and rewriting a store removes it first, so a directory without it is an
unfinished write and :meth:`FeatureStore.open` refuses it.

A version is one of::

    {"id": "r50-0123456789ab", "kind": "model",
     "model": {"checkpoint_sha1": ..., "network": "r50", "embedding_size": 512, ...}}
    {"id": "fct-89abcdef0123", "kind": "transform", "from": <old model version id>,
     "side": <side-information model version id or None>, "to": <target model version id>,
     "transform": {"sha1": ..., ...}}

The embedding *space* of a row is its version id for a model row and the transformation's ``"to"``
for a transformed row. A query embedded by model Q may be compared with gallery rows of space Q, or
of a space S for which ``(Q, S)`` was declared compatible (e.g. a BCT-trained new model and the old
model's space); anything else is an :class:`IncompatibleError` (:func:`check_comparable`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facecompat.errors import UserError
from facecompat.fileio import atomic_path, atomic_write

FORMAT = "facecompat-feature-store"
FORMAT_VERSION = 1
FEATURES, IDS, VERSIONS, STORE_JSON = "features.npy", "ids.npy", "versions.npy", "store.json"
MAX_VERSIONS = int(np.iinfo(np.int16).max)
CHUNK_ROWS = 65_536  # rows per copy/check step: ~128 MB of 512-d float32

VersionLike = str | Mapping[str, Any]


class StoreError(UserError, ValueError):
    """A feature store that is missing, unfinished, damaged or misused (one line naming file and problem)."""


class IncompatibleError(UserError, ValueError):
    """A query compared with gallery rows of another embedding space that was not declared compatible."""


# ------------------------------------------------------------------------------------------ versions
def model_version_id(fingerprint: Mapping[str, Any]) -> str:
    """``"<network>-<first 12 hex of checkpoint_sha1>"`` of a model fingerprint."""
    try:
        network, sha1 = str(fingerprint["network"]), str(fingerprint["checkpoint_sha1"])
    except KeyError as err:
        raise StoreError(f"model fingerprint has no {err.args[0]!r} key (keys: {sorted(fingerprint)})") \
            from None
    return f"{network}-{sha1[:12]}"


def transform_version_id(transform: Mapping[str, Any]) -> str:
    """``"fct-<first 12 hex of sha1>"`` of a transformation fingerprint: its ``sha1``, or the
    ``weights_sha1`` that ``compat/fct/transform.py`` keeps in a transformation's meta (the same id
    it prints)."""
    sha1 = transform.get("sha1", transform.get("weights_sha1"))
    if sha1 is None:
        raise StoreError(f"transform fingerprint has no 'sha1' or 'weights_sha1' key "
                         f"(keys: {sorted(transform)})")
    return f"fct-{str(sha1)[:12]}"


def model_version(fingerprint: Mapping[str, Any]) -> dict:
    """The version of rows embedded by a model (fingerprint: ``checkpoint_sha1``, ``network``,
    ``embedding_size``, ... as ``ModelSpec.fingerprint()`` gives it)."""
    return {"id": model_version_id(fingerprint), "kind": "model", "model": dict(fingerprint)}


def transform_version(transform: Mapping[str, Any], from_id: str, to_id: str,
                      side_id: str | None = None) -> dict:
    """The version of rows made by a transformation (FCT) of ``from_id`` features (and side-information
    ``side_id``) into the space of ``to_id``."""
    return {"id": transform_version_id(transform), "kind": "transform", "from": from_id, "side": side_id,
            "to": to_id, "transform": dict(transform)}


def version_space(version: VersionLike) -> str:
    """The embedding space of a version: its id for a model, ``"to"`` for a transform; a str is an id."""
    if isinstance(version, str):
        return version
    return str(version["to"]) if version.get("kind") == "transform" else str(version["id"])


def _check_version(version: Any, where: str) -> dict:
    """``version`` as a plain dict, or StoreError naming ``where`` and the problem."""
    if not isinstance(version, Mapping):
        raise StoreError(f"{where}: a version must be a dict, got {type(version).__name__}")
    vid = version.get("id")
    if not isinstance(vid, str) or not vid:
        raise StoreError(f"{where}: version 'id' must be a non-empty string, got {vid!r}")
    kind = version.get("kind")
    if kind == "model":
        if not isinstance(version.get("model"), Mapping):
            raise StoreError(f"{where}: model version {vid!r} needs a 'model' fingerprint dict")
    elif kind == "transform":
        for key in ("from", "to"):
            if not isinstance(version.get(key), str) or not version[key]:
                raise StoreError(f"{where}: transform version {vid!r} needs {key!r} (a version id), "
                                 f"got {version.get(key)!r}")
        if "side" not in version or not (version["side"] is None or isinstance(version["side"], str)):
            raise StoreError(f"{where}: transform version {vid!r} needs 'side' (a version id or null)")
        if not isinstance(version.get("transform"), Mapping):
            raise StoreError(f"{where}: transform version {vid!r} needs a 'transform' fingerprint dict")
    else:
        raise StoreError(f"{where}: version {vid!r} has kind {kind!r}, expected 'model' or 'transform'")
    try:  # what is stored must survive the JSON round trip unchanged
        return json.loads(json.dumps(dict(version)))
    except (TypeError, ValueError) as err:
        raise StoreError(f"{where}: version {vid!r} is not JSON-serialisable ({err})") from None


def _check_table(table: Sequence[Any], dim: int, where: str) -> list[dict]:
    if isinstance(table, (str, Mapping)) or not isinstance(table, Sequence):
        raise StoreError(f"{where}: the version table must be a list of versions")
    if len(table) > MAX_VERSIONS:
        raise StoreError(f"{where}: {len(table)} versions, at most {MAX_VERSIONS}")
    out = [_check_version(v, f"{where} versions[{i}]") for i, v in enumerate(table)]
    seen: set[str] = set()
    for v in out:
        if v["id"] in seen:
            raise StoreError(f"{where}: version id {v['id']!r} appears twice in the version table")
        seen.add(v["id"])
        size = v["model"].get("embedding_size") if v["kind"] == "model" else None
        if size is not None and size != dim:
            raise StoreError(f"{where}: model version {v['id']!r} has embedding_size {size}, "
                             f"the features are {dim}-d")
    return out


def _version_dtype(num_versions: int) -> type:
    return np.uint8 if num_versions <= 256 else np.int16


# --------------------------------------------------------------------------------------------- writes
def _write_features(path: Path, source: np.ndarray, chunk_rows: int,
                    patch: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """``source`` [N, D] as float32 ``path`` (temp file + rename), copied and checked ``chunk_rows`` at a
    time; ``patch`` = (sorted rows, their new features) replaces those rows on the way."""
    num, dim = source.shape
    if num == 0:
        with atomic_write(path, "wb") as f:
            np.save(f, np.zeros((0, dim), np.float32))
        return
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num, dim))
        for s in range(0, num, chunk_rows):
            e = min(s + chunk_rows, num)
            block = np.asarray(source[s:e], np.float32)
            if patch is not None:
                lo, hi = np.searchsorted(patch[0], [s, e])
                if hi > lo:
                    block = block.copy()
                    block[patch[0][lo:hi] - s] = patch[1][lo:hi]
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                raise StoreError(f"{path}: row {s + int(np.flatnonzero(bad)[0])} has a NaN or infinite value")
            out[s:e] = block
        out.flush()
        del out


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def _as_rows(rows: Any, num: int, where: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise StoreError(f"{where}: rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= num):
        raise StoreError(f"{where}: row {int(rows[(rows < 0) | (rows >= num)][0])} is outside [0, {num})")
    if np.unique(rows).size != rows.size:
        raise StoreError(f"{where}: rows repeat")
    return rows


def _check_version_index(index: np.ndarray, num_versions: int, where: str) -> None:
    bad = (index < 0) | (index >= num_versions)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise StoreError(f"{where}: row {row} has version index {int(index[row])}, outside the table of "
                         f"{num_versions} versions")


def _check_meta(meta: Mapping[str, Any] | None, path: Path) -> dict:
    try:
        return json.loads(json.dumps(dict(meta or {})))
    except (TypeError, ValueError) as err:
        raise StoreError(f"{path}: meta is not JSON-serialisable ({err})") from None


def _check_ids(ids: np.ndarray, num: int, where: str) -> np.ndarray:
    if ids.ndim != 1 or ids.size != num or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise StoreError(f"{where}: ids must be {num} integers, got {ids.dtype} {ids.shape}")
    ordered = np.sort(ids)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise StoreError(f"{where}: item id {int(repeated[0])} appears more than once")
    return ids


# ---------------------------------------------------------------------------------------------- store
class FeatureStore:
    """An opened feature store (see the module docstring for the format).

    Attributes:
        path: the store directory.
        features: [N, D] float32, memory-mapped read-only.
        ids: [N] int64 item ids. version_index: [N] uint8 or int16 rows of ``versions``.
        versions: the version table (list of dicts). meta: the caller's notes from ``store.json``.
    """

    def __init__(self, path: Path, features: np.ndarray, ids: np.ndarray, version_index: np.ndarray,
                 versions: list[dict], meta: dict):
        self.path, self.features, self.ids = path, features, ids
        self.version_index, self.versions, self.meta = version_index, versions, meta
        self._spaces = [version_space(v) for v in versions]
        self._counts = np.bincount(version_index, minlength=len(versions)) if len(versions) \
            else np.zeros(0, np.int64)

    # ------------------------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path: str | os.PathLike, features: np.ndarray, ids: np.ndarray,
               versions: np.ndarray | str, version_table: Sequence[Mapping[str, Any]], *,
               meta: Mapping[str, Any] | None = None, overwrite: bool = False,
               chunk_rows: int = CHUNK_ROWS) -> FeatureStore:
        """Write a store and open it.

        Args:
            path: the directory (created). An existing complete store there needs ``overwrite``.
            features: [N, D] floating (an array or a memmap; copied ``chunk_rows`` at a time).
            ids: [N] unique integer item ids.
            versions: [N] integer rows of ``version_table``, or one version id for every row.
            version_table: the versions (see the module docstring).
            meta: JSON-serialisable notes kept in ``store.json`` (e.g. the face list it indexes).

        A NaN or infinite value found while copying raises StoreError and leaves the directory
        incomplete (without ``store.json``), as does any other failure after the write began.
        """
        path = Path(path)
        shape = np.shape(features)
        if len(shape) != 2 or shape[1] < 1:
            raise StoreError(f"{path}: features must be [N, D] with D >= 1, got shape {shape}")
        dtype = np.asarray(features[:0]).dtype
        if not np.issubdtype(dtype, np.floating):
            raise StoreError(f"{path}: features must be floating point, got {dtype}")
        num, dim = shape
        table = _check_table(version_table, dim, str(path))
        ids = _check_ids(np.asarray(ids), num, f"{path} ids")
        if isinstance(versions, str):
            index = {v["id"]: i for i, v in enumerate(table)}
            if versions not in index:
                raise StoreError(f"{path}: version {versions!r} is not in the version table {list(index)}")
            version_index = np.full(num, index[versions], _version_dtype(len(table)))
        else:
            version_index = np.asarray(versions)
            if version_index.shape != (num,) or (num and not np.issubdtype(version_index.dtype, np.integer)):
                raise StoreError(f"{path}: versions must be {num} integers, got "
                                 f"{version_index.dtype} {version_index.shape}")
            _check_version_index(version_index, len(table), str(path))
            version_index = version_index.astype(_version_dtype(len(table)))
        meta = _check_meta(meta, path)
        _begin_write(path, overwrite)
        _write_features(path / FEATURES, features, chunk_rows)
        _save_array(path / IDS, ids.astype(np.int64))
        _save_array(path / VERSIONS, version_index)
        _write_json(path, num, dim, table, version_index, meta)
        return cls.open(path, check_finite=False)

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_finite: bool = True,
             chunk_rows: int = CHUNK_ROWS) -> FeatureStore:
        """Open a store memory-mapped; validates it (shapes, dtypes, ids unique, version indexes and
        counts; with ``check_finite`` every value, ``chunk_rows`` rows at a time). StoreError otherwise."""
        path = Path(path)
        doc = _read_json(path)
        num, dim = doc["num_items"], doc["dim"]
        table = _check_table(doc["versions"], dim, str(path / STORE_JSON))
        features = _load(path / FEATURES)
        if features.dtype != np.float32 or features.shape != (num, dim):
            raise StoreError(f"{path / FEATURES}: expected float32 {(num, dim)}, got {features.dtype} "
                             f"{features.shape}")
        ids = _load(path / IDS)
        if ids.dtype != np.int64:
            raise StoreError(f"{path / IDS}: expected int64, got {ids.dtype}")
        _check_ids(ids, num, str(path / IDS))
        version_index = _load(path / VERSIONS)
        if version_index.dtype not in (np.uint8, np.int16) or version_index.shape != (num,):
            raise StoreError(f"{path / VERSIONS}: expected uint8 or int16 ({num},), got "
                             f"{version_index.dtype} {version_index.shape}")
        _check_version_index(version_index, len(table), str(path / VERSIONS))
        counts = np.bincount(version_index, minlength=len(table)) if table else np.zeros(0, np.int64)
        stored = {v["id"]: int(c) for v, c in zip(table, counts) if c}
        if stored != doc["counts"]:
            raise StoreError(f"{path / VERSIONS}: rows per version {stored} differ from {STORE_JSON}'s "
                             f"counts {doc['counts']}")
        if check_finite:
            for s in range(0, num, chunk_rows):
                bad = ~np.isfinite(features[s:s + chunk_rows]).all(axis=1)
                if bad.any():
                    raise StoreError(f"{path / FEATURES}: row {s + int(np.flatnonzero(bad)[0])} has a NaN "
                                     "or infinite value")
        return cls(path, features, ids, version_index, table, doc["meta"])

    # ------------------------------------------------------------------------------------ queries
    @property
    def num_items(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, {self.num_items} x {self.dim}, {self.version_counts()})"

    def version(self, version_id: str) -> dict:
        """The version dict with id ``version_id``; StoreError if the table lacks it."""
        for v in self.versions:
            if v["id"] == version_id:
                return v
        known = [v["id"] for v in self.versions]
        raise StoreError(f"{self.path}: no version {version_id!r} (versions: {known})")

    def version_of(self, row: int) -> dict:
        """The version of row ``row``."""
        return self.versions[int(self.version_index[row])]

    def space_of(self, row: int) -> str:
        """The embedding space row ``row`` lives in (model: its version id; transform: its "to")."""
        return self._spaces[int(self.version_index[row])]

    def row_spaces(self) -> np.ndarray:
        """[N] str: the embedding space of every row."""
        return np.asarray(self._spaces, dtype=object)[self.version_index].astype(str) if self.num_items \
            else np.zeros(0, str)

    def spaces(self) -> dict[str, int]:
        """Embedding space -> number of rows in it (spaces without rows left out)."""
        out: dict[str, int] = {}
        for space, count in zip(self._spaces, self._counts):
            if count:
                out[space] = out.get(space, 0) + int(count)
        return out

    def version_counts(self) -> dict[str, int]:
        """Version id -> number of rows (versions without rows left out)."""
        return {v["id"]: int(c) for v, c in zip(self.versions, self._counts) if c}

    def rows_of(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """int64 row of every item id in ``ids``; StoreError naming the first id the store lacks."""
        ids = np.asarray(ids, np.int64).ravel()
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = np.asarray(self.ids)[order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), max(self.num_items - 1, 0))
        bad = (sorted_ids[pos] != ids) if self.num_items else np.ones(ids.size, bool)
        if bad.any():
            raise StoreError(f"{self.path}: no item id {int(ids[bad][0])} ({int(bad.sum())} ids missing)")
        return order[pos].astype(np.int64)

    # ------------------------------------------------------------------------------------- update
    def replace(self, rows: np.ndarray, features: np.ndarray, version: VersionLike,
                path: str | os.PathLike | None = None, *, chunk_rows: int = CHUNK_ROWS) -> FeatureStore:
        """A store equal to this one except that ``rows`` hold ``features`` made by ``version``
        (partial backfill).

        Args:
            rows: [R] distinct row positions. features: [R, D] finite floating.
            version: a version id of the table, or a version dict (appended when new; a different
                definition under an existing id is an error).
            path: where to write it; None = this directory, rewritten in place.

        Returns:
            the new store, opened. The rewrite is crash-safe: ``store.json`` is removed first and
            written last, each array is renamed into place, so a crash leaves either this store or
            a directory that refuses to open. This object keeps reading the old arrays (its memory
            maps hold the replaced files); readers should not open the directory mid-rewrite.
        """
        rows = _as_rows(rows, self.num_items, f"{self.path} replace")
        features = np.asarray(features)
        if features.shape != (rows.size, self.dim) or not np.issubdtype(features.dtype, np.floating):
            raise StoreError(f"{self.path} replace: features must be floating [{rows.size}, {self.dim}], got "
                             f"{features.dtype} {features.shape}")
        table = [dict(v) for v in self.versions]
        if isinstance(version, str):
            index = next((i for i, v in enumerate(table) if v["id"] == version), None)
            if index is None:
                raise StoreError(f"{self.path} replace: version {version!r} is not in the table "
                                 f"{[v['id'] for v in table]}; pass the version dict")
        else:
            new = _check_version(version, f"{self.path} replace")
            index = next((i for i, v in enumerate(table) if v["id"] == new["id"]), None)
            if index is None:
                table.append(new)
                index = len(table) - 1
            elif table[index] != new:
                raise StoreError(f"{self.path} replace: version id {new['id']!r} is already in the table "
                                 "with a different definition")
        table = _check_table(table, self.dim, f"{self.path} replace")
        order = np.argsort(rows)
        patch = (rows[order], np.asarray(features, np.float32)[order])
        bad = ~np.isfinite(patch[1]).all(axis=1)
        if bad.any():
            raise StoreError(f"{self.path} replace: new features of row {int(patch[0][bad][0])} have a NaN "
                             "or infinite value")
        version_index = np.asarray(self.version_index).astype(_version_dtype(len(table)))
        version_index[rows] = index
        target = self.path if path is None else Path(path)
        in_place = target.resolve() == self.path.resolve() if target.exists() else False
        _begin_write(target, overwrite=in_place or path is None)
        _write_features(target / FEATURES, self.features, chunk_rows, patch)
        _save_array(target / IDS, np.asarray(self.ids, np.int64))
        _save_array(target / VERSIONS, version_index)
        _write_json(target, self.num_items, self.dim, table, version_index, self.meta)
        return FeatureStore.open(target, check_finite=False)


# ------------------------------------------------------------------------------------------ machinery
def _begin_write(path: Path, overwrite: bool) -> None:
    """Make ``path`` ready for a write: an existing store loses its ``store.json`` first (incomplete)."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: exists and is not a directory")
    marker = path / STORE_JSON
    if marker.exists():
        if not overwrite:
            raise StoreError(f"{path}: a feature store exists there (pass overwrite=True to replace it)")
        marker.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, num: int, dim: int, table: list[dict], version_index: np.ndarray,
                meta: dict) -> None:
    counts = np.bincount(version_index, minlength=len(table)) if table else np.zeros(0, np.int64)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "num_items": int(num), "dim": int(dim),
           "versions": table, "counts": {v["id"]: int(c) for v, c in zip(table, counts) if c}, "meta": meta}
    try:
        text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
    except (TypeError, ValueError) as err:
        raise StoreError(f"{path / STORE_JSON}: meta is not JSON-serialisable ({err})") from None
    with atomic_write(path / STORE_JSON, "w") as f:
        f.write(text)


def _read_json(path: Path) -> dict:
    marker = path / STORE_JSON
    if not path.is_dir():
        raise StoreError(f"{path}: no such feature store directory")
    if not marker.is_file():
        raise StoreError(f"{path}: incomplete feature store (no {STORE_JSON}; an unfinished write?)")
    try:
        doc = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{marker}: not readable JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise StoreError(f"{marker}: not a feature store (format {found!r}, expected {FORMAT!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{marker}: format_version {doc.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}")
    for key, kind in (("num_items", int), ("dim", int), ("versions", list), ("counts", dict), ("meta", dict)):
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise StoreError(f"{marker}: {key!r} must be a {kind.__name__}, got {doc.get(key)!r}")
    if doc["num_items"] < 0 or doc["dim"] < 1:
        raise StoreError(f"{marker}: num_items {doc['num_items']} / dim {doc['dim']} out of range")
    return doc


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise StoreError(f"{path}: missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: not a readable .npy file ({err})") from None


# ------------------------------------------------------------------------------------- compatibility
def comparable(query_space: str, gallery_space: str, declared: Iterable[tuple[str, str]] = ()) -> bool:
    """Whether a query of space ``query_space`` may be compared with a gallery row of ``gallery_space``:
    the same space, or ``(query_space, gallery_space)`` among the declared pairs (ordered)."""
    return query_space == gallery_space or (query_space, gallery_space) in set(map(tuple, declared))


def check_comparable(query_version: VersionLike, store: FeatureStore,
                     declared: Iterable[tuple[str, str]] = ()) -> None:
    """Raise IncompatibleError unless every row of ``store`` may be compared with the query.

    Args:
        query_version: the query model's version id (or version dict; a transform's space is its "to").
        store: the gallery.
        declared: ordered (query space, gallery space) pairs declared compatible, e.g.
            ``{(new_id, old_id)}`` for a new model trained backward-compatible (BCT) with the old one.
    """
    query_space = version_space(query_version)
    declared = set(map(tuple, declared))
    counts = store.version_counts()
    offending = [(v["id"], version_space(v), counts[v["id"]]) for v in store.versions
                 if v["id"] in counts and not comparable(query_space, version_space(v), declared)]
    if offending:
        what = ", ".join(f"{count} rows of version {vid!r}" + (f" (space {space!r})" if space != vid else "")
                         for vid, space, count in offending)
        spaces = sorted({space for _, space, _ in offending})
        raise IncompatibleError(f"{store.path}: query version {query_space!r} cannot be compared with "
                                f"{what}; declare {[(query_space, s) for s in spaces]} compatible if the "
                                "query model was trained for it (e.g. BCT), or backfill those rows")
