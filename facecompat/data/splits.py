"""Protocol splits for backward-compatibility experiments (DESIGN §6; old r18 → new r50).

The old model trains on a split's ``old`` part, the new model on its ``new`` part:

=========  ==========================================  ==========================================
protocol   old part                                    new part
=========  ==========================================  ==========================================
opclass    the first ``ratio`` of the identities       the other identities, relabelled 0..k-1
opdata     ~``ratio`` of each identity's images        the rest of the images, same labels
exclass    as opclass                                  the full set, original labels
exdata     as opdata                                   the full set, original labels
=========  ==========================================  ==========================================

Counts round half up (``floor(ratio * n + 0.5)``). opclass keeps at least one identity on
each side; opdata puts at least one image of every identity in ``old`` and, when the
identity has two or more images, at least one in ``new``. An identity with one image cannot be
split by images: opdata puts that image in BOTH parts, as MixBCT's reference split does (DESIGN
§6), so both models train on every identity and the new view's old-feature bank has a record of
every class the new head can be given as a label. (Left old-only, the new view would keep the
class without an image, and every method reading the bank's class statistics would stop.)
Class ids with no image at all (gaps in the labels) stay gaps: views that keep the dataset's
labels (opdata, and the new part of exclass/exdata) keep them in ``num_classes``; the methods
treat them as never-positive placeholders (see ``docs/ARCHITECTURE.md``, "Protocol edge cases").
Which images of an identity go ``old`` is decided by a splitmix64 hash of
``(seed, record id)``: the choice depends only on the seed and the identity's record ids,
so it is the same on every run, platform and view order.

A split is stored either as record-id lists over the source rec (:func:`write_split_lists`,
read back by :func:`load_view`) or as two new insightface recs with a map back to the
source record ids and classes (:func:`write_split_recs`), which the old-feature bank needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facecompat.data.faces import FaceRecords, FaceRecWriter, label_mismatch
from facecompat.data.recordio import RecordIOError
from facecompat.fileio import atomic_write

PARTS = ("old", "new")
LIST_HEADER = "# facecompat-split "  # first line of a list file, followed by a JSON object
SUMMARY_FILE = "split.json"
_SALT = 0x5EED_5B17_C0DE_F00D  # keeps split hashes independent of faces.flip_flags at the same seed

Halves = tuple[np.ndarray, np.ndarray]  # (old record ids, new record ids)
ProtocolFn = Callable[[np.ndarray, np.ndarray, float, int], Halves]


@dataclass(frozen=True)
class _Protocol:
    fn: ProtocolFn
    old_relabel: bool
    new_relabel: bool


_PROTOCOLS: dict[str, _Protocol] = {}


def register_protocol(name: str, *, old_relabel: bool,
                      new_relabel: bool) -> Callable[[ProtocolFn], ProtocolFn]:
    """Register ``fn(record_ids, labels, ratio, seed) -> (old_ids, new_ids)`` under ``name``;
    the flags say whether each part's view relabels its classes to ``0..k-1``."""
    def wrap(fn: ProtocolFn) -> ProtocolFn:
        if name in _PROTOCOLS:
            raise ValueError(f"split protocol {name!r} registered twice")
        _PROTOCOLS[name] = _Protocol(fn, old_relabel, new_relabel)
        return fn
    return wrap


def list_protocols() -> list[str]:
    """Names accepted by :func:`make_split`."""
    return sorted(_PROTOCOLS)


def _check_part(part: str) -> str:
    if part not in PARTS:
        raise ValueError(f"unknown split part {part!r}; valid: {', '.join(PARTS)}")
    return part


@dataclass(frozen=True, eq=False)
class Split:
    """Record ids of the old and new training sets under one protocol.

    Attributes:
        protocol, ratio, seed: what made the split.
        old_records, new_records: int64 ``[N_old]`` / ``[N_new]`` record ids, ascending.
        old_relabel, new_relabel: whether that part's view maps its classes to ``0..k-1``
            (``FaceRecords.subset(relabel=True)``: its head has ``k`` classes); otherwise
            labels and ``num_classes`` stay the dataset's.
    """

    protocol: str
    ratio: float
    seed: int
    old_records: np.ndarray
    new_records: np.ndarray
    old_relabel: bool
    new_relabel: bool

    def __post_init__(self) -> None:
        for name in ("old_records", "new_records"):
            ids = np.array(getattr(self, name), dtype=np.int64)  # own read-only copy
            ids.setflags(write=False)
            object.__setattr__(self, name, ids)

    def records(self, part: str) -> np.ndarray:
        """Record ids of ``part`` (``"old"`` or ``"new"``)."""
        return self.old_records if _check_part(part) == "old" else self.new_records

    def relabel(self, part: str) -> bool:
        return self.old_relabel if _check_part(part) == "old" else self.new_relabel

    @property
    def num_images(self) -> dict[str, int]:
        return {part: int(self.records(part).size) for part in PARTS}

    def view(self, dataset: FaceRecords, part: str) -> FaceRecords:
        """``part`` of ``dataset`` as a :class:`FaceRecords` view."""
        return dataset.subset(records=self.records(part), relabel=self.relabel(part))

    def summary(self, dataset: FaceRecords) -> dict:
        """JSON-ready counts: per part images, classes and relabel; images and classes shared."""
        classes = {part: np.unique(dataset.labels[_positions(dataset, self.records(part))])
                   for part in PARTS}
        return {
            "protocol": self.protocol, "ratio": self.ratio, "seed": self.seed,
            "source": str(Path(dataset.path).resolve()),
            "source_num_images": int(dataset.num_images),
            "source_num_classes": int(np.unique(dataset.labels).size),
            "fingerprint": dataset_fingerprint(dataset),
            "parts": {part: {"images": int(self.records(part).size), "classes": int(classes[part].size),
                             "relabel": self.relabel(part)} for part in PARTS},
            "shared_images": int(np.intersect1d(self.old_records, self.new_records).size),
            "shared_classes": int(np.intersect1d(classes["old"], classes["new"]).size),
        }


# -- protocols -------------------------------------------------------------------------------

def _round_half_up(x: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def _hash_ids(record_ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, record id) as uint64: platform-independent, no global RNG state."""
    x = np.asarray(record_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64((int(seed) * 0x9E3779B97F4A7C15 + _SALT) % (1 << 64))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def first_classes_mask(labels: np.ndarray, ratio: float) -> np.ndarray:
    """Mask of the images whose class is among the first ``round(ratio * C)`` classes present
    (at least 1, at most C - 1)."""
    classes = np.unique(labels)
    if classes.size < 2:
        raise ValueError(f"a class split needs at least 2 identities, the dataset has {classes.size}")
    num_old = int(np.clip(_round_half_up(ratio * classes.size), 1, classes.size - 1))
    return labels <= classes[num_old - 1]


def per_class_mask(record_ids: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Mask of ``round(ratio * n_c)`` images of every class c (at least 1, and at most
    ``n_c - 1`` when ``n_c >= 2``), chosen by the seeded hash of their record ids."""
    num = record_ids.size
    # Primary key class, then hash, then record id (ties): a seeded permutation per class.
    order = np.lexsort((record_ids, _hash_ids(record_ids, seed), labels))
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    num_old = np.clip(_round_half_up(ratio * counts), 1, np.maximum(counts - 1, 1))
    rank = np.arange(num) - np.repeat(starts, counts)
    mask = np.empty(num, dtype=bool)
    mask[order] = rank < np.repeat(num_old, counts)
    return mask


@register_protocol("opclass", old_relabel=True, new_relabel=True)
def _opclass(record_ids: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> Halves:
    old = first_classes_mask(labels, ratio)
    return record_ids[old], record_ids[~old]


def single_image_mask(labels: np.ndarray) -> np.ndarray:
    """Mask of the images whose class has exactly one image."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] == 1


@register_protocol("opdata", old_relabel=False, new_relabel=False)
def _opdata(record_ids: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> Halves:
    old = per_class_mask(record_ids, labels, ratio, seed)
    # A one-image identity cannot be split by images: it goes to both parts (module docstring).
    return record_ids[old], record_ids[~old | single_image_mask(labels)]


@register_protocol("exclass", old_relabel=True, new_relabel=False)
def _exclass(record_ids: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> Halves:
    return record_ids[first_classes_mask(labels, ratio)], record_ids


@register_protocol("exdata", old_relabel=False, new_relabel=False)
def _exdata(record_ids: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> Halves:
    return record_ids[per_class_mask(record_ids, labels, ratio, seed)], record_ids


def split_records(record_ids: np.ndarray, labels: np.ndarray, protocol: str, ratio: float = 0.3,
                  seed: int = 0) -> Split:
    """Split images given by ``record_ids`` (int ``[N]``, unique) and ``labels`` (int ``[N]``)
    under ``protocol`` (see the module docstring); ``ratio`` in (0, 1) is the old share."""
    name = protocol.lower()
    if name not in _PROTOCOLS:
        raise ValueError(f"unknown split protocol {protocol!r}; valid: {', '.join(list_protocols())}")
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"split ratio must lie strictly between 0 and 1, got {ratio}")
    record_ids = np.asarray(record_ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if record_ids.shape != labels.shape or record_ids.ndim != 1:
        raise ValueError(f"record_ids {record_ids.shape} and labels {labels.shape} must be equal 1-D shapes")
    if np.unique(record_ids).size != record_ids.size:
        raise ValueError("record ids are not unique")
    spec = _PROTOCOLS[name]
    old, new = spec.fn(record_ids, labels, float(ratio), int(seed))
    return Split(name, float(ratio), int(seed), np.sort(old), np.sort(new),
                 spec.old_relabel, spec.new_relabel)


def make_split(dataset: FaceRecords, protocol: str, ratio: float = 0.3, seed: int = 0) -> Split:
    """:func:`split_records` over a dataset's (or view's) images."""
    return split_records(dataset.record_ids, dataset.labels, protocol, ratio, seed)


# -- storage: record-id lists ---------------------------------------------------------------

def dataset_fingerprint(dataset: FaceRecords) -> str:
    """Short sha1 of a dataset's record ids and labels: ties a list or a map to its source."""
    digest = hashlib.sha1(np.ascontiguousarray(dataset.record_ids, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(dataset.labels, dtype="<i8").tobytes())
    return digest.hexdigest()[:16]


def _positions(dataset: FaceRecords, record_ids: np.ndarray) -> np.ndarray:
    """Index into ``dataset.record_ids`` of each id; RecordIOError on an id it lacks."""
    record_ids = np.asarray(record_ids, dtype=np.int64)
    if dataset.num_images == 0 or record_ids.size == 0:
        if record_ids.size:
            raise RecordIOError(dataset.path, "record id is not an image of this dataset", int(record_ids[0]))
        return np.empty(0, dtype=np.int64)
    sorter = np.argsort(dataset.record_ids, kind="stable")
    at = np.searchsorted(dataset.record_ids, record_ids, sorter=sorter).clip(0, dataset.num_images - 1)
    pos = sorter[at]
    bad = dataset.record_ids[pos] != record_ids
    if bad.any():
        raise RecordIOError(dataset.path, "record id is not an image of this dataset",
                            int(record_ids[bad][0]))
    return pos


def _write_summary(out_dir: Path, summary: dict) -> None:
    with atomic_write(out_dir / SUMMARY_FILE, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


def write_split_lists(dataset: FaceRecords, split: Split, out_dir: str | os.PathLike) -> dict:
    """Write ``old.lst`` / ``new.lst`` (a JSON header line, then one record id per line,
    ascending) and ``split.json`` into ``out_dir``; returns the summary written.

    The header holds the protocol, the part, its relabel flag, the list length and the
    source rec's path, image count and fingerprint, which :func:`load_view` checks.
    """
    out_dir = Path(out_dir)
    summary = split.summary(dataset)
    summary["format"] = "lists"
    for part in PARTS:
        ids = split.records(part)
        meta = {"protocol": split.protocol, "ratio": split.ratio, "seed": split.seed, "part": part,
                "relabel": split.relabel(part), "num_records": int(ids.size),
                "num_images": summary["source_num_images"], "fingerprint": summary["fingerprint"],
                "source": summary["source"]}
        with atomic_write(out_dir / f"{part}.lst", "w") as f:
            f.write(LIST_HEADER + json.dumps(meta) + "\n")
            f.write("".join(f"{i}\n" for i in ids.tolist()))
        summary["parts"][part]["file"] = f"{part}.lst"
    _write_summary(out_dir, summary)
    return summary


def load_record_list(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a list written by :func:`write_split_lists` (or any file of one integer record id
    per line; ``#`` lines are comments). Returns (int64 ids ``[N]``, header dict or ``{}``)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordIOError(path, f"cannot read record list: {exc}") from None
    meta: dict = {}
    if lines and lines[0].startswith(LIST_HEADER):
        try:
            meta = json.loads(lines[0][len(LIST_HEADER):])
        except json.JSONDecodeError as exc:
            raise RecordIOError(path, f"line 1: malformed header: {exc}") from None
    ids: list[int] = []
    for line_no, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise RecordIOError(path, f"line {line_no}: {text!r} is not a record id") from None
    arr = np.asarray(ids, dtype=np.int64)
    if "num_records" in meta and meta["num_records"] != arr.size:
        raise RecordIOError(path, f"header says {meta['num_records']} records, the file holds {arr.size} "
                            "(truncated?)")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise RecordIOError(path, "record id listed twice", int(uniq[counts > 1][0]))
    return arr, meta


def load_view(rec: str | os.PathLike | FaceRecords, list_path: str | os.PathLike, **kwargs) -> FaceRecords:
    """The part of ``rec`` (a path, or a loaded :class:`FaceRecords`) that ``list_path`` names,
    relabelled as its header says. ``kwargs`` go to :class:`FaceRecords` (``flip``, ``seed``).

    Raises RecordIOError when the list was written for another dataset (image count or
    fingerprint differ) or names a record id that is not an image of ``rec``.
    """
    dataset = rec if isinstance(rec, FaceRecords) else FaceRecords(rec, **kwargs)
    ids, meta = load_record_list(list_path)
    if "num_images" in meta and meta["num_images"] != dataset.num_images:
        raise RecordIOError(list_path, f"written for a dataset of {meta['num_images']} images "
                            f"({meta.get('source')}), but {dataset.path} holds {dataset.num_images}")
    if "fingerprint" in meta and meta["fingerprint"] != dataset_fingerprint(dataset):
        raise RecordIOError(list_path, f"written for another dataset ({meta.get('source')}): "
                            f"fingerprint differs from {dataset.path}'s")
    known = np.isin(ids, dataset.record_ids)
    if not known.all():
        raise RecordIOError(list_path, f"record id is not an image of {dataset.path}", int(ids[~known][0]))
    return dataset.subset(records=ids, relabel=bool(meta.get("relabel", False)))


# -- storage: new rec sets ------------------------------------------------------------------

def write_split_recs(dataset: FaceRecords, split: Split, out_dir: str | os.PathLike,
                     progress: bool = True) -> dict:
    """Write each part as an insightface rec set ``out_dir/<part>/train.{rec,idx}, property``,
    image payloads copied byte for byte, plus per part:

    - ``record_map.npy``: int64 ``[N, 2]`` rows ``(new record id, source record id)``;
    - ``label_map.npy``: int64 ``[k]``, the source rec's class of each new label.

    New labels are the part's classes renumbered ``0..k-1`` in ascending source order (for
    opclass/exclass old and opdata parts this is the identity unless a class id has no image in
    the source, a gap in its labels). Images keep the source's class-then-id
    order. ``split.json`` (summary) is written last. Returns the summary.
    """
    out_dir = Path(out_dir)
    summary = split.summary(dataset)
    summary["format"] = "rec"
    base_map = dataset.label_map  # a relabelled view: map its labels back to the rec's classes
    for part in PARTS:
        ids = split.records(part)
        src_labels = dataset.labels[_positions(dataset, ids)]
        order = np.lexsort((ids, src_labels))
        ids, src_labels = ids[order], src_labels[order]
        classes = np.unique(src_labels)
        new_labels = np.searchsorted(classes, src_labels)
        rec_classes = classes if base_map is None else base_map[classes]
        part_dir = out_dir / part
        new_ids = np.empty(ids.size, dtype=np.int64)
        with FaceRecWriter(part_dir) as writer:
            rows = tqdm(zip(ids.tolist(), new_labels.tolist(), rec_classes[new_labels].tolist()),
                        total=ids.size, desc=f"write {part}", unit="img", disable=None if progress else True)
            for i, (record_id, label, rec_class) in enumerate(rows):
                record = dataset.reader.read(record_id)
                stored = record.label if record.flag == 0 else record.label[0]
                if int(stored) != rec_class:
                    raise label_mismatch(dataset.path, record_id, dataset.reader.offset(record_id), stored,
                                         rec_class)
                new_ids[i] = writer.add(label, record.payload)
        for name, arr in (("record_map.npy", np.stack([new_ids, ids], axis=1)),
                          ("label_map.npy", rec_classes.astype(np.int64))):
            with atomic_write(part_dir / name, "wb") as f:
                np.save(f, arr)
        summary["parts"][part].update(
            dir=part, written_classes_renumbered=bool(not np.array_equal(classes, np.arange(classes.size))))
    _write_summary(out_dir, summary)
    return summary


def load_record_map(part_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(record_map ``[N, 2]``, label_map ``[k]``) of a part written by :func:`write_split_recs`."""
    part_dir = Path(part_dir)
    try:
        return np.load(part_dir / "record_map.npy"), np.load(part_dir / "label_map.npy")
    except (OSError, ValueError) as exc:
        raise RecordIOError(part_dir, f"cannot read split maps: {exc}") from None
