"""Upgrading a stored gallery: model features into a store, FCT's transformation over a store, backfill.

    old = store_model_features("galleries/old", feats, face_rows, old_spec.fingerprint())
    side = store_model_features("galleries/side", side_feats, face_rows, side_spec.fingerprint())
    fct = FCTransform.load("work_dirs/synthetic_fct")
    upgraded = transform_store(fct, old, side, "galleries/fct")      # h(φ_old, ψ) per stored item
    sigma2 = read_uncertainty(upgraded)                              # [N] FastFill σ², NaN: not transformed
    partly = backfill_store(upgraded, ids, new_feats, new_spec.fingerprint(), "galleries/fct+new")

**Versions** (:mod:`facecompat.index.store`): rows stored by :func:`store_model_features` carry the
model's version (``<network>-<sha1[:12]>`` of its fingerprint ``checkpoint_sha1 / network /
embedding_size``). :func:`transform_store` maps the rows of the transformation's *old* model
(the version of ``fct.meta["models"]["old"]``) and writes them under the transform version
(``from`` old, ``side`` side-information, ``to`` new: their space is the new model's); rows already
in the new model's space (a partially backfilled store) are copied with their own version; rows
of any other version are an :class:`~facecompat.index.store.IncompatibleError` naming the version
found and the one expected: a transformation is only defined on the space it was trained from.

**Side-information** is matched by item id, in any order; every item to transform must be in the
side store (extra side items are ignored, so a side store of the whole face list serves a
gallery-only store), and every side row must be the side model's version.

**Uncertainty**: when h predicts FastFill's σ², the output store holds ``uncertainty.npy``
(float32 [N], row-aligned with ``features.npy``; copied rows keep the value of the input store's
own ``uncertainty.npy``, else NaN) and ``store.json``'s meta names it (``meta["uncertainty"]``).
:class:`FeatureStore` ignores files it does not know and its rewrites keep rows in place, so the
file stays aligned; :func:`backfill_store`
sets the backfilled rows to NaN (they no longer carry an error estimate) and copies the file to a
new directory. Read it with :func:`read_uncertainty`.

**Atomic output**: :func:`transform_store` builds the store in a hidden temporary directory beside
``out`` and renames it into place at the end; a failure removes it, so ``out`` is either absent
(or the store that was there before) or complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from facecompat.fileio import atomic_write
from facecompat.index.store import (
    CHUNK_ROWS,
    STORE_JSON,
    FeatureStore,
    IncompatibleError,
    StoreError,
    model_version,
    transform_version,
    version_space,
)

if TYPE_CHECKING:
    from facecompat.compat.fct import FCTransform

UNCERTAINTY = "uncertainty.npy"
_SCRATCH = ".transformed.npy"
FINGERPRINT_KEYS = ("checkpoint_sha1", "network", "embedding_size")


# ------------------------------------------------------------------------------------------ stores
def store_model_features(path: str | os.PathLike, features: np.ndarray, ids: np.ndarray,
                         fingerprint: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
                         overwrite: bool = False, chunk_rows: int = CHUNK_ROWS) -> FeatureStore:
    """A store at ``path`` whose rows all carry the version of the model with ``fingerprint``.

    Args:
        features: [N, D] floating features of that model (an array or a memmap).
        ids: [N] unique integer item ids (face rows, template ids, ...).
        fingerprint: ``checkpoint_sha1``, ``network``, ``embedding_size`` (``ModelSpec.fingerprint()``).
        meta: JSON-serialisable notes for ``store.json``.

    Raises:
        StoreError: see :meth:`FeatureStore.create` (shapes, ids, NaN, an existing store).
    """
    version = model_version(fingerprint)
    return FeatureStore.create(path, features, ids, version["id"], [version], meta=meta, overwrite=overwrite,
                               chunk_rows=chunk_rows)


def fct_model_versions(fct: FCTransform) -> dict[str, dict | None]:
    """Model versions of the transformation's ``old``, ``side`` (None without side-information) and
    ``new`` models, from the fingerprints its ``fct.json`` records."""
    models = fct.meta.get("models", {})
    out: dict[str, dict | None] = {}
    for role in ("old", "side", "new"):
        record = models.get(role)
        if record is None:
            if role == "side" and not fct.uses_side:
                out[role] = None
                continue
            raise StoreError(f"{fct.directory / 'fct.json'}: models.{role} is missing")
        missing = [k for k in FINGERPRINT_KEYS if k not in record]
        if missing:
            raise StoreError(f"{fct.directory / 'fct.json'}: models.{role} lacks {', '.join(missing)}")
        out[role] = model_version({k: record[k] for k in FINGERPRINT_KEYS})
    return out


def fct_transform_version(fct: FCTransform) -> dict:
    """The version of rows made by ``fct`` (``fct-<weights sha1[:12]>``, from / side / to model ids)."""
    models = fct_model_versions(fct)
    fingerprint = {"weights_sha1": fct.meta["weights_sha1"], "architecture": fct.meta.get("architecture", {})}
    side = models["side"]
    return transform_version(fingerprint, models["old"]["id"], models["new"]["id"],
                             None if side is None else side["id"])


def read_uncertainty(store: FeatureStore) -> np.ndarray | None:
    """[N] float32 σ² per row that FCT predicted (NaN for rows it did not make), or None when the
    store has none; StoreError when ``store.json`` names a file that is missing or the wrong shape."""
    note = store.meta.get("uncertainty")
    if not note:
        return None
    path = store.path / str(note.get("file", UNCERTAINTY))
    if not path.is_file():
        raise StoreError(f"{path}: missing (named by {store.path / STORE_JSON} meta.uncertainty)")
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: not a readable .npy file ({err})") from None
    if values.dtype != np.float32 or values.shape != (store.num_items,):
        raise StoreError(f"{path}: expected float32 ({store.num_items},), got {values.dtype} {values.shape}")
    return values


# --------------------------------------------------------------------------------------- transform
def _plan_rows(fct: FCTransform, old: FeatureStore, models: dict[str, dict | None]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(rows to transform, rows to copy) of ``old``; IncompatibleError for rows of any other version."""
    from_v, to_id = models["old"], models["new"]["id"]
    counts = old.version_counts()
    transform_idx = []
    for index, version in enumerate(old.versions):
        if version["id"] not in counts:
            continue
        if version["id"] == from_v["id"]:
            stored = version.get("model", {}).get("checkpoint_sha1")
            if stored is not None and stored != from_v["model"]["checkpoint_sha1"]:
                raise IncompatibleError(f"{old.path}: version {version['id']!r} has checkpoint_sha1 "
                                        f"{stored}, {fct.directory} was trained on "
                                        f"{from_v['model']['checkpoint_sha1']}")
            transform_idx.append(index)
        elif version_space(version) != to_id:
            raise IncompatibleError(
                f"{old.path}: {counts[version['id']]} rows of version {version['id']!r} (space "
                f"{version_space(version)!r}); transformation {fct.version} ({fct.directory}) maps version "
                f"{from_v['id']!r} (its old model) into {to_id!r}: expected rows of {from_v['id']!r} "
                f"(or already of space {to_id!r})")
    version_index = np.asarray(old.version_index)
    transform = np.isin(version_index, transform_idx)
    return np.flatnonzero(transform).astype(np.int64), np.flatnonzero(~transform).astype(np.int64)


def _side_rows(fct: FCTransform, old: FeatureStore, side: FeatureStore | None, rows: np.ndarray,
               models: dict[str, dict | None]) -> np.ndarray | None:
    """Row of ``side`` holding each item of ``old``'s ``rows`` (None without side-information)."""
    if not fct.uses_side:
        if side is not None:
            raise StoreError(f"{fct.directory}: trained without side-information; a side store was given "
                             f"({side.path})")
        return None
    if side is None:
        raise StoreError(f"{fct.directory}: needs {fct.module.side_dim}-d side-information: give the side "
                         f"store of {old.path}'s items (model {models['side']['id']})")
    if side.dim != fct.module.side_dim:
        raise StoreError(f"{side.path}: {side.dim}-d features, {fct.directory} takes {fct.module.side_dim}-d "
                         "side-information")
    want = models["side"]["id"]
    other = {vid: n for vid, n in side.version_counts().items() if vid != want}
    if other:
        vid, count = next(iter(other.items()))
        raise IncompatibleError(f"{side.path}: {count} rows of version {vid!r}; side-information of "
                                f"{fct.directory} must be version {want!r} (its side model)")
    try:
        return side.rows_of(np.asarray(old.ids)[rows])
    except StoreError as err:
        raise StoreError(f"side-information does not cover the items of {old.path}: {err}") from None


def _new_table(fct_version: dict, old: FeatureStore, copy_rows: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Output version table (the transform first, then the copied rows' versions) and the copied rows'
    indexes into it."""
    table = [fct_version]
    position = {fct_version["id"]: 0}
    old_index = np.asarray(old.version_index)[copy_rows]
    mapping = np.zeros(max(len(old.versions), 1), np.int64)
    for index in np.unique(old_index).tolist():
        version = old.versions[index]
        if version["id"] in position:
            if table[position[version["id"]]] != version:
                raise StoreError(f"{old.path}: version id {version['id']!r} has another definition than the "
                                 "transformation's")
        else:
            position[version["id"]] = len(table)
            table.append(version)
        mapping[index] = position[version["id"]]
    return table, mapping[old_index]


def _prepare_out(out: Path, sources: list[Path], overwrite: bool) -> None:
    resolved = out.resolve()
    for source in sources:
        if source.resolve() == resolved:
            raise StoreError(f"{out}: the output must be another directory than its input store {source}")
    if out.exists():
        if not out.is_dir():
            raise StoreError(f"{out}: exists and is not a directory")
        if (out / STORE_JSON).exists() and not overwrite:
            raise StoreError(f"{out}: a feature store exists there (overwrite=True or --overwrite)")
        if not (out / STORE_JSON).exists() and any(out.iterdir()):
            raise StoreError(f"{out}: a non-empty directory that is not a feature store; choose another "
                             "output")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out``; an old store or empty directory there goes away."""
    if not out.exists():
        os.rename(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, trash / out.name)
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


def transform_store(fct: FCTransform, old: FeatureStore, side: FeatureStore | None, out: str | os.PathLike,
                    *, chunk_rows: int = CHUNK_ROWS, progress: Callable[[int], None] | None = None,
                    overwrite: bool = False) -> FeatureStore:
    """The gallery of ``old`` upgraded by ``fct`` into a new store at ``out`` (see the module docstring).

    Args:
        fct: the loaded transformation (its device does the work).
        old: the stored gallery: rows of ``fct``'s old model, and possibly rows already in its new
            model's space (copied unchanged with their version).
        side: side-information store (items matched by id) when ``fct`` uses it, else None.
        out: the new store's directory; an existing store there needs ``overwrite``.
        chunk_rows: rows read, transformed and written per step (bounds memory).
        progress: called with the number of output rows done (transformed + copied) after each step.

    Returns:
        the new store, opened: same ids in the same order; ``versions[0]`` is the transform version.

    Raises:
        IncompatibleError: rows of another version than the transformation's old (or new) model,
            side rows of another version than its side model.
        StoreError: side items missing (names the first), dimensions, an existing output.
        FCTError: non-finite input features.
    """
    out = Path(out)
    if chunk_rows < 1:
        raise StoreError(f"chunk_rows must be >= 1, got {chunk_rows}")
    models = fct_model_versions(fct)
    module = fct.module
    if old.dim != module.old_dim:
        raise StoreError(f"{old.path}: {old.dim}-d features, {fct.directory} takes {module.old_dim}-d old "
                         "features")
    rows, copy_rows = _plan_rows(fct, old, models)
    if copy_rows.size and old.dim != module.new_dim:
        raise StoreError(f"{old.path}: rows already in the new space are {old.dim}-d, the transformation "
                         f"makes {module.new_dim}-d features")
    side_rows = _side_rows(fct, old, side, rows, models)
    fct_version = fct_transform_version(fct)
    table, copy_index = _new_table(fct_version, old, copy_rows)
    version_index = np.zeros(old.num_items, np.int64)
    version_index[copy_rows] = copy_index
    _prepare_out(out, [old.path] + ([side.path] if side is not None else []), overwrite)

    meta = {k: v for k, v in old.meta.items() if k not in ("uncertainty", "upgrade")}
    meta["upgrade"] = {"transform": fct_version["id"], "transform_dir": str(fct.directory),
                       "old_store": str(old.path), "side_store": None if side is None else str(side.path),
                       "rows_transformed": int(rows.size), "rows_copied": int(copy_rows.size)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        shape = (old.num_items, module.new_dim)
        scratch = np.lib.format.open_memmap(tmp / _SCRATCH, mode="w+", dtype=np.float32, shape=shape) \
            if old.num_items else np.zeros(shape, np.float32)  # numpy cannot map an empty file
        sigma2 = np.full(old.num_items, np.nan, np.float32) if module.log_var is not None else None
        old_sigma2 = read_uncertainty(old)
        if sigma2 is not None and old_sigma2 is not None:  # copied rows keep what an earlier FCT predicted
            sigma2[copy_rows] = old_sigma2[copy_rows]
        done = 0
        for s in range(0, rows.size, chunk_rows):
            chunk = rows[s:s + chunk_rows]
            side_feats = None if side_rows is None else np.asarray(side.features[side_rows[s:s + chunk_rows]])
            pred, var = fct.apply(np.asarray(old.features[chunk]), side_feats, batch_size=chunk_rows)
            scratch[chunk] = pred
            if sigma2 is not None and var is not None:
                sigma2[chunk] = var
            done += chunk.size
            if progress is not None:
                progress(done)
        for s in range(0, copy_rows.size, chunk_rows):
            chunk = copy_rows[s:s + chunk_rows]
            scratch[chunk] = old.features[chunk]
            done += chunk.size
            if progress is not None:
                progress(done)
        if isinstance(scratch, np.memmap):
            scratch.flush()
        if sigma2 is not None:
            meta["uncertainty"] = {
                "file": UNCERTAINTY, "transform": fct_version["id"],
                "what": "FCT's predicted squared error sigma^2 per row (NaN: not transformed)"}
            with atomic_write(tmp / UNCERTAINTY, "wb") as f:
                np.save(f, sigma2)
        FeatureStore.create(tmp, scratch, np.asarray(old.ids), version_index, table, meta=meta,
                            chunk_rows=chunk_rows)
        del scratch
        (tmp / _SCRATCH).unlink(missing_ok=True)
        mask = os.umask(0)  # mkdtemp makes 0700: give the store the usual directory mode
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureStore.open(out, check_finite=False)


# ----------------------------------------------------------------------------------------- backfill
def backfill_store(store: FeatureStore, items: np.ndarray, new_features: np.ndarray,
                   new_fingerprint: Mapping[str, Any], out: str | os.PathLike | None = None, *,
                   by: Literal["id", "row"] = "id", chunk_rows: int = CHUNK_ROWS) -> FeatureStore:
    """``store`` with ``items`` re-embedded by the new model (partial backfill of a stored gallery).

    Args:
        items: [R] item ids (``by="id"``, default) or row positions (``by="row"``) to replace.
        new_features: [R, D] the new model's features of those items, in the order of ``items``.
        new_fingerprint: the new model's ``checkpoint_sha1``, ``network``, ``embedding_size``.
        out: where to write the result; None rewrites ``store`` in place (crash-safe, see
            :meth:`FeatureStore.replace`).

    Returns:
        the new store: the replaced rows carry the new model's version; a store with FCT's
        uncertainty keeps ``uncertainty.npy`` with those rows set to NaN.

    Raises:
        StoreError: an id the store lacks (names it), a bad row, shape or value.
    """
    if by not in ("id", "row"):
        raise StoreError(f"backfill_store: by must be 'id' or 'row', got {by!r}")
    sigma2 = read_uncertainty(store)
    rows = store.rows_of(items) if by == "id" else np.asarray(items)
    new = store.replace(rows, new_features, model_version(new_fingerprint), out, chunk_rows=chunk_rows)
    if sigma2 is not None:
        sigma2 = sigma2.copy()
        sigma2[np.asarray(rows, np.int64)] = np.nan
        with atomic_write(new.path / str(store.meta["uncertainty"].get("file", UNCERTAINTY)), "wb") as f:
            np.save(f, sigma2)
    return new


__all__ = ["UNCERTAINTY", "backfill_store", "fct_model_versions", "fct_transform_version", "read_uncertainty",
           "store_model_features", "transform_store"]
