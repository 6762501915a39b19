"""Machinery of ``DaliLoader(reader="mxnet")``: an index per (epoch, rank) that makes
``fn.readers.mxnet`` read exactly the planned batches of an unmodified rec.

What DALI's RecordIO reader does (2.4, ``recordio_loader.h`` / ``indexed_file_loader.h``):

- it concatenates the files of ``path`` into one virtual file, sorts the offsets of its
  index (offsets into that virtual file) and reads them in that order; a sample's size is the
  distance to the next listed offset (the last one runs to the end of the virtual file), and
  the parser keeps only the first record of those bytes;
- ``random_shuffle`` is a buffer of ``initial_fill`` samples, and ``shuffle_after_epoch``
  shuffles the order of the *files*, not of the samples: over one rec it changes nothing (and
  forces ``stick_to_shard``, so a rank would read the same slice of classes every epoch).

So sharding and shuffling stay ours (``num_shards=1``, ``random_shuffle=False``): the index
holds this rank's planned batches only, and lists the rec once per batch, ``path=[rec] *
steps``, with the records of step ``s`` at ``s * file_size + offset``. DALI reads step ``s``
from copy ``s``: its ``B`` records in file order, which ``fn.permute_batch`` puts back in
planned order (indices fed per step by ``fn.external_source``, with the mirror flags). No
file is copied or rewritten; the copies are names in ``path`` (DALI maps the rec once per batch).

The last sample of copy ``s`` would span to the first offset of copy ``s + 1``, across the file
end, and DALI copies such a sample instead of mapping it: about ``2 / B`` of the rec per batch
(~200 MB for a 12 GB rec at ``B = 128``). Two *sentinels* per batch bound that: the view's
records with the smallest and largest offsets outside the batch open and close each copy, so
the crossing holds at most ``2 B`` view records plus what lies beyond the view at both ends of
the file (the header; insightface's identity records, ~4 MB on MS1Mv3, hot in the page cache).
DALI decodes the sentinels (two images per batch, placed last) and Python slices them off.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from facecompat.data.faces import FaceRecords
from facecompat.data.recordio import RecordIOError


class ViewOffsets:
    """Offsets of a view's records in its rec, and their order in the file.

    Attributes:
        offsets: int64 ``[N]``, by view position.
        by_offset: int64 ``[N]``: view positions in ascending offset order.
        rank: int64 ``[N]``: each view position's place in that order.
    """

    def __init__(self, records: FaceRecords):
        reader = records.reader
        self.offsets = np.fromiter((reader.offset(k) for k in records.record_ids.tolist()),
                                   dtype=np.int64, count=records.num_images)
        self.by_offset = np.argsort(self.offsets, kind="stable")
        self.rank = np.empty_like(self.by_offset)
        self.rank[self.by_offset] = np.arange(len(self.by_offset))
        sorted_offsets = self.offsets[self.by_offset]
        same = np.flatnonzero(sorted_offsets[1:] == sorted_offsets[:-1])
        if same.size:
            key = int(records.record_ids[self.by_offset[same[0] + 1]])
            raise RecordIOError(reader.idx_path or reader.path, "two image keys share an offset (DALI "
                                "would read the record once)", key, int(sorted_offsets[same[0]]))


class EpochIndex(NamedTuple):
    """What DALI reads for one epoch of one rank, one copy of the rec per step.

    Attributes:
        record_ids: int64 ``[S, D]``: records of each DALI batch in reading (offset) order,
            ``D = B + sentinels``.
        offsets: int64 ``[S, D]``: their offsets in the rec.
        take: int64 ``[S, D]``: the reading positions of the step's planned records, in
            planned order, then of its sentinels (``fn.permute_batch`` indices).
    """

    record_ids: np.ndarray
    offsets: np.ndarray
    take: np.ndarray

    @property
    def num_copies(self) -> int:
        return self.offsets.shape[0]


def plan_epoch_index(records: FaceRecords, offsets: ViewOffsets, positions: np.ndarray) -> EpochIndex:
    """The DALI batches of ``positions`` (int64 ``[S, B]`` view positions, one row per step),
    each with ``min(2, N - B)`` sentinels."""
    count = min(2, records.num_images - positions.shape[1])
    ranks = offsets.rank[positions]
    ranks = np.concatenate([ranks, _sentinel_ranks(ranks, records.num_images, count)], axis=1)
    order = np.argsort(ranks, axis=1)  # ranks follow offsets: this is DALI's reading order
    take = np.argsort(order, axis=1)
    read = offsets.by_offset[np.take_along_axis(ranks, order, axis=1)]
    return EpochIndex(records.record_ids[read], offsets.offsets[read], take)


def _sentinel_ranks(ranks: np.ndarray, num_images: int, count: int) -> np.ndarray:
    """Per step, ``count`` (0..2) offset ranks outside the batch: the smallest and the largest.

    Among the ``B + 1`` smallest ranks at least one is outside a batch of ``B``; among the
    ``B + 2`` largest at least one is outside the batch and not the first sentinel.
    """
    steps, batch = ranks.shape
    if count == 0:
        return np.empty((steps, 0), dtype=np.int64)
    first = np.argmin(_hits(ranks, batch + 1), axis=1)
    if count == 1:
        return first[:, None]
    taken = np.concatenate([ranks, first[:, None]], axis=1)
    last = num_images - 1 - np.argmin(_hits(num_images - 1 - taken, batch + 2), axis=1)
    return np.stack([first, last], axis=1).astype(np.int64)


def _hits(values: np.ndarray, width: int) -> np.ndarray:
    """bool ``[S, width]``: ``hits[s, v]`` when ``v`` is in row ``s`` of ``values``."""
    hits = np.zeros((values.shape[0], width), dtype=bool)
    r, c = np.nonzero(values < width)
    hits[r, values[r, c]] = True
    return hits


def write_index(path: str | os.PathLike, index: EpochIndex, file_size: int) -> None:
    """``key\\toffset`` lines, offsets into ``[rec] * num_copies`` (copy ``s`` holds step ``s``)."""
    virtual = index.offsets + file_size * np.arange(index.num_copies, dtype=np.int64)[:, None]
    with open(path, "w") as f:  # ~1 s for a rank's share of MS1Mv3 (650k lines) on 8 GPUs
        f.write("".join(f"{k}\t{o}\n" for k, o in zip(index.record_ids.ravel().tolist(),
                                                       virtual.ravel().tolist())))


def parse_offsets(info: np.ndarray, prefix: bytes) -> np.ndarray:
    """Offsets from DALI's ``source_info`` (``b"<rec> at index <offset>"``, uint8 ``[D, L]``
    zero-padded on the right) → int64 ``[D]``; ``prefix`` is ``b"<rec> at index "``."""
    width = len(prefix)
    if info.ndim != 2 or info.shape[1] <= width or bytes(info[0, :width]) != prefix:
        head = bytes(info[0]).rstrip(b"\0") if info.size else b""
        raise RuntimeError(f"DALI source_info {head!r} does not start with {prefix!r}")
    digits = info[:, width:].astype(np.int64)
    present = digits != 0
    place = present.sum(axis=1, keepdims=True) - 1 - np.arange(digits.shape[1])
    return np.where(present, (digits - ord("0")) * 10 ** np.clip(place, 0, None), 0).sum(axis=1)
