"""Face-recognition training sets stored as RecordIO: insightface layout and plain im2rec.

insightface layout (MS1M, Glint360K, WebFace recs): record 0 is a header, flag 2, label
``[a, b]``; keys ``1 .. a-1`` are images whose label is the class id (a scalar, or an array
whose first value is the class); keys ``a .. b-1`` are identity records, one per class in
order, each with label ``[start, end)``: the keys of that class's images.
Files from im2rec have no header: every key is an image.

``num_classes`` / ``num_images`` are derived from the data; a ``property`` file
(``num_classes,112,112``) beside the rec is cross-checked, never trusted alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facecompat.data.recordio import (
    Record,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack,
    read_record_at,
    unpack,
)


class NotAFaceSetError(RecordIOError):
    """A valid RecordIO file whose labels are not class ids (not a face training set)."""


def resolve_rec(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """Accept a ``.rec`` file or a folder holding ``train.rec``; returns (rec, idx or None)."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.rec"
    if path.suffix != ".rec" and path.with_suffix(".rec").is_file():
        path = path.with_suffix(".rec")
    if not path.is_file():
        raise RecordIOError(path, "no such RecordIO file (give a .rec or a folder with train.rec)")
    idx = path.with_suffix(".idx")
    return path, (idx if idx.is_file() else None)


def flip_flags(record_ids: np.ndarray | int, seed: int, epoch: int) -> np.ndarray:
    """Deterministic fair coin per (seed, epoch, record id): the same image gets the same flip
    in a given epoch whichever worker, rank or loader reads it (splitmix64 finaliser)."""
    x = np.asarray(record_ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64((seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9) % (1 << 64))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(63)).astype(bool)


# OpenCV >= 4.10 decodes straight to RGB (the same pixels as BGR, channels in our order).
_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", None)


def label_mismatch(path: str | os.PathLike, key: int, offset: int | None, stored: float,
                   expected: int) -> RecordIOError:
    """The error for an image whose stored class disagrees with its identity records."""
    return RecordIOError(path, f"image label {stored:g} disagrees with the identity records "
                         f"(class {int(expected)})", int(key), offset)


def decode_image(payload: bytes, path: str | os.PathLike = "<bytes>", key: int | None = None,
                 rgb: bool = False) -> np.ndarray:
    """Encoded image → HxWx3 uint8, **BGR** as OpenCV decodes it (RGB with ``rgb``)."""
    if rgb and _RGB_FLAG is None:
        return cv2.cvtColor(decode_image(payload, path, key), cv2.COLOR_BGR2RGB)
    img = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), _RGB_FLAG if rgb else cv2.IMREAD_COLOR)
    if img is None:
        raise RecordIOError(path, f"payload of {len(payload)} bytes is not a decodable image", key)
    return img


def to_tensor(bgr: np.ndarray, flip: bool) -> torch.Tensor:
    """BGR uint8 HxWx3 → RGB float32 CHW in [-1, 1], horizontally flipped if asked."""
    if flip:
        bgr = cv2.flip(bgr, 1)
    # blobFromImage does BGR→RGB, (x - 127.5) / 127.5 and HWC→CHW in one pass.
    blob = cv2.dnn.blobFromImage(bgr, scalefactor=1.0 / 127.5, mean=(127.5, 127.5, 127.5), swapRB=True)
    return torch.from_numpy(blob[0])


class FaceRecords(Dataset):
    """A face rec as a dataset of ``(image, label, record_id, flipped)``.

    ``image`` is RGB float32 ``[3, H, W]`` in [-1, 1]; with ``flip=True`` it is mirrored
    when :func:`flip_flags` says so for ``(seed, epoch, record_id)`` — call
    :meth:`set_epoch` each epoch. ``record_id`` is the image's key in the rec.

    Args:
        rec: a ``.rec`` or a folder with ``train.rec``/``train.idx``/``property``.
        idx: the index, default beside the rec.
        flip, seed: random horizontal flip and its seed.
    """

    def __init__(self, rec: str | os.PathLike, idx: str | os.PathLike | None = None, *,
                 flip: bool = True, seed: int = 0):
        rec_path, default_idx = resolve_rec(rec)
        self.reader = RecordReader(rec_path, idx if idx is not None else default_idx)
        self.path = rec_path
        self.flip, self.seed, self.epoch = flip, seed, 0
        self.layout, all_ids, all_labels, ranges = _load_layout(self.reader)
        self.class_ranges = ranges  # insightface: [C, 2] key ranges; im2rec: None
        self.dataset_num_classes = int(all_labels.max()) + 1 if all_labels.size else 0
        _check_property(rec_path.parent / "property", self.dataset_num_classes, rec_path)
        self.record_ids = all_ids
        self.labels = all_labels
        self.num_classes = self.dataset_num_classes
        self.label_map: np.ndarray | None = None  # view label -> dataset class (after relabel)

    # -- views ---------------------------------------------------------------------------
    def subset(self, *, classes: Sequence[int] | np.ndarray | None = None,
               records: Sequence[int] | np.ndarray | None = None, relabel: bool = False) -> FaceRecords:
        """A view on some classes (all their images) and/or some record ids of this view.

        With ``relabel`` the kept classes become ``0 .. k-1`` in ascending order of the
        original class id (``label_map[new] = old``); otherwise labels stay as they are and
        ``num_classes`` stays the dataset's.
        """
        keep = np.ones(len(self.record_ids), dtype=bool)
        if classes is not None:
            classes = np.unique(np.asarray(classes, dtype=np.int64))
            bad = classes[(classes < 0) | (classes >= self.num_classes)]
            if bad.size:
                raise ValueError(f"{self.path}: class {int(bad[0])} outside [0, {self.num_classes})")
            keep &= np.isin(self.labels, classes)
        if records is not None:
            records = np.asarray(records, dtype=np.int64)
            known = np.isin(records, self.record_ids)
            if not known.all():
                raise RecordIOError(self.path, "record id is not an image of this dataset/view",
                                    int(records[~known][0]))
            keep &= np.isin(self.record_ids, records)
        view = object.__new__(FaceRecords)
        view.__dict__.update(self.__dict__)
        view.record_ids = self.record_ids[keep]
        view.labels = self.labels[keep]
        if relabel:
            present = np.unique(view.labels)
            view.labels = np.searchsorted(present, view.labels).astype(np.int64)
            base_map = self.label_map if self.label_map is not None else np.arange(self.num_classes)
            view.label_map = base_map[present]
            view.num_classes = int(present.size)
        return view

    @property
    def num_images(self) -> int:
        return len(self.record_ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def flips(self) -> np.ndarray:
        """This epoch's flip flag of every image of the view (in view order)."""
        if not self.flip:
            return np.zeros(len(self.record_ids), dtype=bool)
        return flip_flags(self.record_ids, self.seed, self.epoch)

    # -- reading -------------------------------------------------------------------------
    def read_image(self, record_id: int) -> np.ndarray:
        """Decoded BGR uint8 image of a record id (no flip, no normalisation)."""
        return decode_image(self.reader.read(record_id).payload, self.path, record_id)

    def __len__(self) -> int:
        return len(self.record_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, bool]:
        record_id = int(self.record_ids[i])
        rec = self.reader.read(record_id)
        label = int(self.labels[i])
        stored = int(rec.label) if rec.flag == 0 else int(rec.label[0])
        expected = label if self.label_map is None else int(self.label_map[label])
        if stored != expected:
            raise label_mismatch(self.path, record_id, self.reader.offset(record_id), stored, expected)
        flipped = bool(self.flip and flip_flags(record_id, self.seed, self.epoch))
        img = to_tensor(decode_image(rec.payload, self.path, record_id), flipped)
        return img, label, record_id, flipped


def _load_layout(reader: RecordReader) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None]:
    """(layout, image record ids, labels, class key ranges) of a rec."""
    if not reader.keys:
        raise RecordIOError(reader.path, "empty RecordIO file")
    if 0 in reader:
        head = reader.read_header(0)
        if head.flag == 2 and not reader.read(0).payload:
            return _load_insightface(reader, head)
    ids = np.asarray(reader.keys, dtype=np.int64)
    labels = np.empty(len(ids), dtype=np.int64)
    for i, key in enumerate(reader.keys):  # one small pread per record
        rec = reader.read_header(key)
        value = rec.label if rec.flag == 0 else (rec.label[0] if rec.flag else 0.0)
        if value < 0 or value != int(value):
            raise NotAFaceSetError(reader.path, f"label {value} is not a class id", key, reader.offset(key))
        labels[i] = int(value)
    return "im2rec", ids, labels, None


def _load_insightface(reader: RecordReader, head: Record) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    first_id, end_id = (int(v) for v in head.label)
    if not 1 <= first_id <= end_id:
        raise RecordIOError(reader.path, f"header label [{first_id}, {end_id}] is not an identity range", 0)
    ranges = np.empty((end_id - first_id, 2), dtype=np.int64)
    for c, key in enumerate(range(first_id, end_id)):
        rec = reader.read_header(key)
        if rec.flag != 2:
            raise RecordIOError(reader.path, f"identity record has flag {rec.flag}, expected 2",
                                key, reader.offset(key))
        ranges[c] = rec.label
    starts, ends = ranges[:, 0], ranges[:, 1]
    contiguous = (starts[1:] == ends[:-1]).all() if len(ranges) > 1 else True
    if len(ranges) and (starts[0] != 1 or ends[-1] != first_id or not contiguous or (ends <= starts).any()):
        raise RecordIOError(reader.path, f"identity ranges do not tile images 1..{first_id - 1} "
                            "in order (or a class is empty)", first_id)
    ids = np.arange(1, first_id, dtype=np.int64)
    labels = np.repeat(np.arange(len(ranges), dtype=np.int64), ends - starts)
    missing = [k for k in (1, first_id - 1) if first_id > 1 and k not in reader]
    if missing:
        raise RecordIOError(reader.idx_path or reader.path, "image key named by the header is not "
                            "in the index", missing[0])
    return "insightface", ids, labels, ranges


def _check_property(prop: Path, num_classes: int, rec: Path) -> None:
    if not prop.is_file():
        return
    text = prop.read_text().strip()
    try:
        declared = int(text.split(",")[0])
    except ValueError:
        raise RecordIOError(prop, f"expected 'num_classes,H,W', got {text!r}") from None
    if declared != num_classes:
        raise RecordIOError(prop, f"says {declared} classes but {rec} holds {num_classes}")


class FaceRecWriter:
    """Write a face set in insightface layout: ``train.rec``, ``train.idx``, ``property``.

    Add images class by class (labels non-decreasing, starting at 0, no gaps); on a clean
    exit the identity records and the header are written and the files renamed into place.

        with FaceRecWriter(out_dir) as w:
            w.add(label, jpeg_bytes)
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "train",
                 image_size: tuple[int, int] = (112, 112)):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.image_size = image_size
        self.writer = RecordWriter(self.out_dir / f"{prefix}.rec", self.out_dir / f"{prefix}.idx")
        self.writer.write(0, pack([0.0, 0.0], b""))  # placeholder, same size as the final header
        self.class_starts: list[int] = []
        self.next_key = 1

    def add(self, label: int, image: bytes) -> int:
        """Append one encoded image of class ``label``; returns its record id."""
        label = int(label)
        current = len(self.class_starts) - 1
        if label == current + 1:
            self.class_starts.append(self.next_key)
        elif label != current:
            raise ValueError(f"{self.writer.path}: label {label} after class {current}: add images "
                             "class by class, labels 0, 1, 2, ... without gaps")
        key = self.next_key
        self.writer.write(key, pack(float(label), image, id=key))
        self.next_key += 1
        return key

    def close(self) -> None:
        first_id = self.next_key
        ends = self.class_starts[1:] + [first_id]
        for c, (start, end) in enumerate(zip(self.class_starts, ends)):
            self.writer.write(first_id + c, pack([float(start), float(end)], b""))
        end_id = first_id + len(self.class_starts)
        self.writer.overwrite(0, pack([float(first_id), float(end_id)], b""))
        self.writer.close()
        h, w = self.image_size
        tmp = self.out_dir / ".property.tmp"
        tmp.write_text(f"{len(self.class_starts)},{h},{w}")
        os.replace(tmp, self.out_dir / "property")

    def __enter__(self) -> FaceRecWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.writer.abort()


def summarize_rec(rec: str | os.PathLike, idx: str | os.PathLike | None = None, *, decode: bool = False,
                  progress: bool = False) -> dict:
    """Validate a whole rec and describe it: layout, records, images, classes, images per
    class, split records, file size. Reads every record once (and decodes every image with
    ``decode``); raises RecordIOError at the first problem."""
    from tqdm import tqdm

    rec_path, default_idx = resolve_rec(rec)
    reader = RecordReader(rec_path, idx if idx is not None else default_idx)
    payload_len, split = {}, 0
    fd = reader._handle()
    bar = {"disable": None if progress else True, "leave": False}
    for key in tqdm(reader.keys, desc="validating", unit="rec", **bar):
        offset = reader.offset(key)
        raw, end = read_record_at(fd, offset, reader.path, key, reader._size)
        split += end - offset != 8 + ((len(raw) + 3) & ~3)
        payload_len[key] = len(unpack(raw, reader.path, key, offset).payload)
    summary = {"file": str(rec_path),
               "index": str(reader.idx_path) if reader.idx_path else "(none: sequential scan)",
               "records": len(reader), "split_records": int(split), "file_bytes": rec_path.stat().st_size}
    try:
        dataset = FaceRecords(rec_path, reader.idx_path, flip=False)
    except NotAFaceSetError as e:
        return {**summary, "layout": f"generic (not a face set: {e.reason} at key {e.key})"}
    keys = tqdm(dataset.record_ids.tolist(), desc="checking images", unit="img", **bar)
    for i, key in enumerate(keys):
        rec = dataset.reader.read(key) if decode else dataset.reader.read_header(key)
        stored = rec.label if rec.flag == 0 else rec.label[0]
        if stored != dataset.labels[i]:
            raise label_mismatch(reader.path, key, reader.offset(key), stored, dataset.labels[i])
        if decode:
            decode_image(rec.payload, reader.path, key)
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    image_bytes = sum(payload_len[k] for k in dataset.record_ids.tolist())
    return {
        **summary,
        "layout": dataset.layout,
        "images": dataset.num_images,
        "classes": dataset.num_classes,
        "images_per_class_min": int(counts.min()) if counts.size else 0,
        "images_per_class_mean": round(float(counts.mean()), 2) if counts.size else 0.0,
        "images_per_class_max": int(counts.max()) if counts.size else 0,
        "image_bytes_mean": round(image_bytes / max(dataset.num_images, 1), 1),
        "decoded": decode,
    }
