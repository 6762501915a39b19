"""The IJB folder rule (:func:`find_target_dir`) and meta loading (:func:`load_ijb_meta`): the meta
files parsed and joined by image name, or read back from their ``.npz`` cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from facecompat.eval.ijb.records import GALLERY_NAMES, IJBMeta, IJBMetaError, Subjects, _preview
from facecompat.eval.ijb.tables import _parse_int_table, _parse_named_table, _parse_subject_csv
from facecompat.fileio import atomic_write

META_CACHE_VERSION = 1


def find_target_dir(root: str | Path, target: str = "IJBC") -> Path:
    """The IJB-C / IJB-B folder (``meta/``, ``loose_crop/``) of ``root``: the one rule every tool uses.

    The folder is known by its content, not its name: ``root`` itself when its ``meta/`` holds
    ``<ijbc|ijbb>_*`` files (insightface's ``IJB_release/IJBC``, or a folder named anything),
    else ``root/<target>`` when that one's ``meta/`` does. Calling it again on its answer gives
    the same folder.

    Raises:
        IJBMetaError: an unknown target, or neither folder holds the target's meta files; the
            message names the meta folder looked at (``root/<target>/meta`` when that folder
            exists, else ``root/meta``).
    """
    if target not in GALLERY_NAMES:
        raise IJBMetaError(f"target {target!r}: expected one of {sorted(GALLERY_NAMES)}")
    root, prefix = Path(root), target.lower()
    for folder in (root, root / target):
        if (folder / "meta").is_dir() and any((folder / "meta").glob(f"{prefix}_*")):
            return folder
    if not root.is_dir():
        raise IJBMetaError(f"{root}: no such folder (the {target} folder, or a folder holding it)")
    # name what was looked at, the folder that exists first; never a doubled <target>/<target>
    looked_at = [root / "meta"] if root.name.upper() == target else [root / target / "meta", root / "meta"]
    looked_at.sort(key=lambda p: not p.parent.is_dir())
    also = f", nor in {looked_at[1]}" if len(looked_at) > 1 else ""
    raise IJBMetaError(f"{looked_at[0]}: no {target} meta files ({prefix}_face_tid_mid.txt etc.){also}; "
                       f"give the {target} folder (holding meta/) or a folder holding {target}/meta/")


def load_ijb_meta(root: str | Path, target: str = "IJBC", allow_missing: bool = False,
                  cache_dir: str | Path | None = None) -> IJBMeta:
    """Read an IJB-C / IJB-B meta folder.

    Args:
        root: the ``<target>`` folder (any name) or a folder holding it; see :func:`find_target_dir`.
        target: "IJBC" or "IJBB".
        allow_missing: skip (and count) faces present in only one face file and pairs naming a
            template without faces, instead of raising.
        cache_dir: keep the parsed meta as ``<cache_dir>/meta/<target>-<key>.npz`` and read it
            from there while every meta file keeps its path, size and modification time (the
            key); parsing IJB-C's 235 MB of text takes seconds, loading the arrays a fraction.

    Returns:
        :class:`IJBMeta`. 1:N fields are filled when all three 1:N CSVs exist; with none, 1:1 only.

    Raises:
        IJBMetaError: no meta folder, a missing 1:1 file, one or two of the three 1:N CSVs missing,
            or a malformed line; naming the file and line or value.
    """
    meta_dir = find_target_dir(root, target) / "meta"
    prefix = target.lower()
    pts_path = meta_dir / f"{prefix}_name_5pts_score.txt"
    tid_path = meta_dir / f"{prefix}_face_tid_mid.txt"
    pair_path = meta_dir / f"{prefix}_template_pair_label.txt"
    for path in (pts_path, tid_path, pair_path):
        if not path.is_file():
            raise IJBMetaError(f"{path}: missing meta file")
    if cache_dir is None:
        return _parse_meta(meta_dir, target, allow_missing)
    cache = _meta_cache_path(Path(cache_dir), meta_dir, target, allow_missing)
    if cache.is_file():
        try:
            return _read_meta_cache(cache, target)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from another version: parse again and rewrite it
    meta = _parse_meta(meta_dir, target, allow_missing)
    _write_meta_cache(cache, meta)
    return meta


def _member(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """``np.isin(values, members)``; a lookup table when the ids are small non-negative integers."""
    if members.size and values.size and members.min() >= 0 and values.min() >= 0 and \
            max(int(values.max()), int(members.max())) < (1 << 26):
        table = np.zeros(max(int(values.max()), int(members.max())) + 1, bool)
        table[members] = True
        return table[values]
    return np.isin(values, members)


def _meta_cache_path(cache_dir: Path, meta_dir: Path, target: str, allow_missing: bool) -> Path:
    """``<cache_dir>/meta/<target>-<key>.npz``; the key covers every meta file's path, size, mtime."""
    digest = hashlib.sha1(f"v{META_CACHE_VERSION} {target} {allow_missing}".encode())
    for path in sorted(meta_dir.glob(f"{target.lower()}_*")):
        st = path.stat()
        digest.update(f"\n{path.resolve()} {st.st_size} {st.st_mtime_ns}".encode())
    return cache_dir / "meta" / f"{target}-{digest.hexdigest()[:20]}.npz"


def _write_meta_cache(path: Path, meta: IJBMeta) -> None:

    arrays = {"image_names": meta.image_names, "landmarks": meta.landmarks, "det_scores": meta.det_scores,
              "template_ids": meta.template_ids, "media_ids": meta.media_ids,
              "pair_t1": _narrow(meta.pair_t1), "pair_t2": _narrow(meta.pair_t2),
              "pair_labels": meta.pair_labels,
              "counts": np.array([meta.num_missing_faces, meta.num_missing_pairs], np.int64)}
    groups = dict(meta.galleries)
    if meta.probes is not None:
        groups["probes"] = meta.probes
    arrays["groups"] = np.array(list(groups))
    for name, group in groups.items():
        arrays[f"group_{name}_templates"] = group.template_ids
        arrays[f"group_{name}_subjects"] = group.subject_ids
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    for old in path.parent.glob(f"{meta.target}-*.npz"):  # earlier versions of these files
        if old != path:
            old.unlink(missing_ok=True)


def _narrow(ids: np.ndarray) -> np.ndarray:
    """int32 when every id fits (halves the 15.6M-pair arrays on disk), else unchanged."""
    if ids.size and ids.min() >= -(1 << 31) and ids.max() < (1 << 31):
        return ids.astype(np.int32)
    return ids


def _read_meta_cache(path: Path, target: str) -> IJBMeta:
    with np.load(path, allow_pickle=False) as z:
        counts = z["counts"]
        meta = IJBMeta(target, z["image_names"], z["landmarks"], z["det_scores"], z["template_ids"],
                       z["media_ids"], z["pair_t1"].astype(np.int64), z["pair_t2"].astype(np.int64),
                       z["pair_labels"],
                       num_missing_faces=int(counts[0]), num_missing_pairs=int(counts[1]))
        for name in z["groups"].tolist():
            group = Subjects(z[f"group_{name}_templates"], z[f"group_{name}_subjects"])
            if name == "probes":
                meta.probes = group
            else:
                meta.galleries[name] = group
    return meta


def _parse_meta(meta_dir: Path, target: str, allow_missing: bool) -> IJBMeta:
    """The meta files of ``meta_dir`` parsed (see :func:`load_ijb_meta`)."""
    prefix = target.lower()
    pts_path = meta_dir / f"{prefix}_name_5pts_score.txt"
    tid_path = meta_dir / f"{prefix}_face_tid_mid.txt"
    pair_path = meta_dir / f"{prefix}_template_pair_label.txt"
    names, pts = _parse_named_table(pts_path, 12, float)
    image_names = np.array(names)
    row_of = {name: i for i, name in enumerate(names)}
    if len(row_of) != len(names):
        raise IJBMetaError(f"{pts_path}: duplicate image names")
    tid_names, tid_mid = _parse_named_table(tid_path, 3, int)
    template_ids = np.full(len(names), -1, np.int64)
    media_ids = np.full(len(names), -1, np.int64)
    rows = np.fromiter((row_of.get(n, -1) for n in tid_names), np.int64, len(tid_names))
    num_missing = 0
    unknown = [tid_names[i] for i in np.flatnonzero(rows < 0)]
    if unknown:
        if not allow_missing:
            raise IJBMetaError(f"{tid_path}: images without a line in {pts_path.name}: {_preview(unknown)}")
        num_missing += len(unknown)
    known = rows >= 0
    if np.bincount(rows[known], minlength=1).max(initial=0) > 1:
        raise IJBMetaError(f"{tid_path}: duplicate image names")
    template_ids[rows[known]] = tid_mid[known, 0]
    media_ids[rows[known]] = tid_mid[known, 1]
    no_template = np.flatnonzero(template_ids < 0)
    if no_template.size:
        if not allow_missing:
            raise IJBMetaError(f"{pts_path}: images without a line in {tid_path.name}: "
                               f"{_preview(image_names[no_template].tolist())}")
        num_missing += no_template.size

    pairs = _parse_int_table(pair_path, 3)
    face_templates = np.unique(template_ids[template_ids >= 0])
    has_faces = _member(pairs[:, 0], face_templates) & _member(pairs[:, 1], face_templates)
    num_missing_pairs = int((~has_faces).sum())
    if num_missing_pairs:
        absent = np.setdiff1d(pairs[~has_faces, :2], face_templates)
        if not allow_missing:
            raise IJBMetaError(f"{pair_path}: templates without faces in {tid_path.name}: "
                               f"{_preview(absent.tolist())}")
        pairs = pairs[has_faces]
    bad_label = ~np.isin(pairs[:, 2], (0, 1))
    if bad_label.any():
        raise IJBMetaError(f"{pair_path}: label {pairs[bad_label, 2][0]} is not 0 or 1")

    meta = IJBMeta(target, image_names, pts[:, :10].reshape(-1, 5, 2).astype(np.float32),
                   pts[:, 10].astype(np.float32), template_ids, media_ids,
                   pairs[:, 0].copy(), pairs[:, 1].copy(), pairs[:, 2].astype(np.int8),
                   num_missing_faces=num_missing, num_missing_pairs=num_missing_pairs)
    csvs = {g: meta_dir / f"{prefix}_1N_gallery_{g}.csv" for g in GALLERY_NAMES[target]}
    probe_csv = meta_dir / f"{prefix}_1N_probe_mixed.csv"
    missing = [p for p in (*csvs.values(), probe_csv) if not p.is_file()]
    if missing and len(missing) < len(csvs) + 1:  # a half-copied 1:N set: not a silent "1:1 only"
        present = sorted({*csvs.values(), probe_csv} - set(missing))
        raise IJBMetaError(f"{meta_dir}: missing 1:N file {' and '.join(p.name for p in missing)} "
                           f"({', '.join(p.name for p in present)} present; 1:N needs all "
                           f"{len(csvs) + 1}, or none for 1:1 only)")
    if not missing:
        meta.galleries = {g: _parse_subject_csv(p) for g, p in csvs.items()}
        meta.probes = _parse_subject_csv(probe_csv)
    return meta
