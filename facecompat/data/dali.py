"""DALI decoding of training batches: GPU ("mixed") decode, or DALI's CPU decoder.

Where DALI decodes (``decode_device``) and where batches go (``device``) are separate: the GPU
decoder runs on the training GPU and hands over normalised batches already there; the CPU
decoder hands over uint8 batches, which go to the target as they are (to a GPU through pinned
memory: a quarter of the bytes of a float batch) and are normalised there, as the torch loader
does. With ``channels_last`` DALI writes HWC images and the batch is their ``[B, C, H, W]``
view (channels_last strides, no copy).

Both ways of feeding DALI follow :mod:`facecompat.data.loader`'s plan (equal steps on every
rank, a fresh global shuffle each epoch from :func:`~facecompat.data.loader.epoch_order`, flips
from ``flip_flags``, resumable at any step) and yield the same batches as the torch loader: the
same record ids, labels and flips in the same order, pixels equal up to decoder rounding.

``reader="external"`` (default): Python reads each planned batch with
:class:`~facecompat.data.recordio.RecordReader` (~15 us per image: one ``pread`` and a
label check) and feeds the bytes and mirror flags through ``fn.external_source``; DALI
decodes, mirrors and normalises. Nothing is written to disk and the code that reads is the
torch loader's. Prefer it unless reading in Python is the bottleneck.

``reader="mxnet"``: DALI's C++ ``fn.readers.mxnet`` does the I/O (``mmap``, no Python per
sample) from the rec as insightface ships it, never rewritten. Before each epoch Python writes
an image-only index of this rank's share (~25 bytes per image, ~1 s for an MS1Mv3 epoch on 8
GPUs, deleted once DALI has read it) that makes DALI read exactly the planned batches, and
feeds per step the order to put them in and their mirror flags (how: ``_dali_mxnet``). Python
then checks the offsets DALI reports in ``source_info`` and the labels stored in the rec.
Costs: two extra decoded images per batch, and on insightface recs a ~4 MB page-cache copy
per batch (MS1Mv3). Prefer it when Python reading cannot keep up (many GPUs sharing few
cores) or to keep DALI's reader.

Resuming mid-epoch is exact and cheap in both: skipped batches are neither read nor decoded
(the mxnet index simply starts at the resumed step).

Why not DALI's own sharding and shuffling (``shard_id``/``num_shards``, ``random_shuffle``,
``shuffle_after_epoch``) with one fixed image-only index: DALI sorts the offsets of its index
and reads a contiguous range per shard, i.e. class by class in an insightface rec;
``random_shuffle`` only mixes a buffer of ``initial_fill`` samples (past ``vm.max_map_count /
2`` = 32,765 buffered samples DALI copies each sample instead of mapping it), and
``shuffle_after_epoch`` (DALI 2.x) shuffles the order of the rec *files*: over one rec the
order never changes, and it pins each rank to the same slice of classes every epoch. The
first and last facts are checked in ``tests/data/test_dali.py``, the buffer limit is in DALI's
``mmaped_file.cc``.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from facecompat.data._dali_mxnet import EpochIndex, ViewOffsets, parse_offsets, plan_epoch_index, write_index
from facecompat.data.faces import FaceRecords, flip_flags, label_mismatch
from facecompat.data.loader import (
    Batch,
    BatchInputs,
    BatchKey,
    EncodedBatch,
    ShardedLoader,
    read_batch,
    to_device,
)
from facecompat.data.normalize import normalize_images

READERS = ("external", "mxnet")
DECODE_DEVICES = ("auto", "gpu", "cpu")


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_decode_device(decode_device: str, device: torch.device) -> str:
    """``"gpu"`` or ``"cpu"``: where DALI decodes batches bound for ``device`` (``"auto"``: the GPU
    when ``device`` is one). Raises ValueError for an unknown value, or ``"gpu"`` for a CPU target."""
    if decode_device not in DECODE_DEVICES:
        raise ValueError(f"decode_device must be one of {DECODE_DEVICES}, got {decode_device!r}")
    if decode_device == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if decode_device == "gpu" and device.type != "cuda":
        raise ValueError(f"decode_device 'gpu' decodes on the target GPU, but the target device is {device}")
    return decode_device


class DaliLoader(ShardedLoader):
    """Batches decoded by DALI; same plan and contract as :class:`~facecompat.data.loader.TorchLoader`.

    Args: as :class:`~facecompat.data.loader.ShardedLoader` (``device``: where every batch
    lands; ``channels_last``: HWC from DALI, handed out as the NCHW view), plus
        decode_device: ``"gpu"`` (the "mixed" nvJPEG decoder on ``device``, a GPU), ``"cpu"``
            (DALI's CPU decoder, ``device_id=None``; batches then copied to ``device``) or
            ``"auto"`` (default: ``"gpu"`` when ``device`` is CUDA, else ``"cpu"``).
        num_threads: DALI CPU threads.
        prefetch_queue_depth: batches DALI prepares ahead.
        reader: ``"external"`` (Python reads, ``fn.external_source``) or ``"mxnet"``
            (``fn.readers.mxnet`` reads); see the module docstring.
        index_dir: where ``"mxnet"`` writes each epoch's index (default: the system temp dir).
    """

    def __init__(self, records: FaceRecords, batch_size: int, *, rank: int | None = None,
                 world_size: int | None = None, seed: int | None = None,
                 device: torch.device | str | None = None, num_threads: int = 4,
                 prefetch_queue_depth: int = 2, reader: Literal["external", "mxnet"] = "external",
                 index_dir: str | os.PathLike | None = None,
                 decode_device: Literal["auto", "gpu", "cpu"] = "auto", channels_last: bool = False,
                 batch_inputs: BatchInputs | None = None):
        if not dali_available():
            raise ImportError("DALI is not installed: pip install nvidia-dali-cuda120 "
                              "(or use the torch loader)")
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
        super().__init__(records, batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
                         channels_last=channels_last, batch_inputs=batch_inputs)
        self.decode_device = resolve_decode_device(decode_device, self.device)
        self.num_threads = int(num_threads)
        self.prefetch_queue_depth = int(prefetch_queue_depth)
        self.reader = reader
        self.index_dir = Path(index_dir) if index_dir is not None else None
        # Offsets of every image of the view, looked up once (a dict look-up per image).
        self._offsets = ViewOffsets(records) if reader == "mxnet" else None

    def __iter__(self) -> Iterator[Batch]:
        keys = list(self.sampler)
        if not keys:
            return
        if self.reader == "mxnet":
            yield from self._iter_mxnet(keys)
        else:
            yield from self._iter_external(keys)

    def _put(self, array: np.ndarray) -> torch.Tensor:
        return to_device(torch.from_numpy(array), self.device)

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """DALI's image batch → :attr:`Batch.images` on the target device: the NCHW view of an
        HWC batch (``channels_last``), normalised there when DALI left uint8."""
        images = to_device(images, self.device)
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)
        return normalize_images(images)

    def _pipeline(self, batch_size: int):
        from nvidia.dali import Pipeline

        gpu = self.decode_device == "gpu"
        return Pipeline(batch_size=batch_size, num_threads=self.num_threads,
                        device_id=self.device.index if gpu else None,
                        prefetch_queue_depth=self.prefetch_queue_depth, seed=self.seed)

    def _decode(self, jpegs, mirror):
        """Encoded images → RGB, mirrored where ``mirror``, CHW (HWC with ``channels_last``):
        float ``(x - 127.5) / 127.5`` from the GPU decoder, uint8 from the CPU one (normalised
        on the target device by :meth:`_images`)."""
        from nvidia.dali import fn, types

        layout = "HWC" if self.channels_last else "CHW"
        device = "mixed" if self.decode_device == "gpu" else "cpu"
        images = fn.decoders.image(jpegs, device=device, output_type=types.RGB)
        if self.decode_device == "cpu":
            return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout=layout, mirror=mirror)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout,
                                        mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)

    # -- reader="external" -------------------------------------------------------------
    def _iter_external(self, keys: list[BatchKey]) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        # The source runs ahead of the consumer by DALI's prefetch depth; batches come out in
        # the order they went in, so a FIFO pairs each decoded batch with its metadata.
        pending: collections.deque[EncodedBatch] = collections.deque()
        pipe = self._build_external_pipeline(self._feed(keys, pending))
        batches = DALIGenericIterator([pipe], ["images"], auto_reset=False)
        try:
            for out in batches:
                enc = pending.popleft()
                yield Batch(self._images(out[0]["images"]), self._put(enc.labels),
                            self._put(enc.record_ids), self._put(enc.flipped),
                            self._inputs(enc.record_ids, enc.flipped, enc.labels))
        finally:
            del batches, pipe

    def _feed(self, keys: list[BatchKey], pending: collections.deque
              ) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        """Per step: encoded images ``B x [n_bytes] uint8`` and mirror flags ``[B] int32``."""
        for key in keys:
            enc = read_batch(self.records, key)
            pending.append(enc)
            yield [np.frombuffer(p, dtype=np.uint8) for p in enc.payloads], enc.flipped.astype(np.int32)

    def _build_external_pipeline(self, source: Iterator):
        """external_source (bytes, mirror flags) → decode (mixed or cpu) → mirror (+ normalise)."""
        from nvidia.dali import fn, types

        pipe = self._pipeline(self.batch_size)
        with pipe:
            jpegs, mirror = fn.external_source(source=source, num_outputs=2, batch=True,
                                               dtype=[types.UINT8, types.INT32])
            pipe.set_outputs(self._decode(jpegs, mirror))
        pipe.build()
        return pipe

    # -- reader="mxnet" ----------------------------------------------------------------
    def _iter_mxnet(self, keys: list[BatchKey]) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        epoch, positions = keys[0].epoch, np.stack([k.positions for k in keys])
        index = plan_epoch_index(self.records, self._offsets, positions)
        record_ids = self.records.record_ids[positions]
        flipped = (flip_flags(record_ids, self.records.seed, epoch) if self.records.flip
                   else np.zeros(record_ids.shape, dtype=bool))
        mirror = np.zeros(index.take.shape, dtype=np.int32)  # sentinels (last) are not mirrored
        mirror[:, :record_ids.shape[1]] = flipped
        feed = ((take, flags) for take, flags in zip(index.take.astype(np.int32), mirror))
        pipe = self._build_mxnet_pipeline(index, epoch, feed)
        batches = DALIGenericIterator([pipe], ["images", "stored", "info"], auto_reset=False)
        prefix = f"{os.fspath(self.records.path)} at index ".encode()
        try:
            for step, out in enumerate(batches):  # the feed ends the epoch
                yield self._mxnet_batch(out[0], index, step, positions[step], flipped[step], prefix)
        finally:
            del batches, pipe

    def _mxnet_batch(self, out: dict, index: EpochIndex, step: int, positions: np.ndarray,
                     flipped: np.ndarray, prefix: bytes) -> Batch:
        """DALI's batch of ``step`` (planned records, then sentinels) → the planned :class:`Batch`,
        after checking the offsets DALI read and the labels stored in the rec."""
        records, batch = self.records, len(positions)
        planned = index.offsets[step][index.take[step]]
        offsets = parse_offsets(out["info"].numpy(), prefix)
        if not np.array_equal(offsets, planned):
            raise RuntimeError(f"{records.path}: DALI read offsets {offsets.tolist()} at step {step}, "
                               f"planned {planned.tolist()}")
        record_ids, labels = records.record_ids[positions], records.labels[positions]
        expected = labels if records.label_map is None else records.label_map[labels]
        stored = out["stored"].numpy().reshape(-1)[:batch].astype(np.float64)
        bad = np.flatnonzero(stored != expected)
        if bad.size:
            j = int(bad[0])
            raise label_mismatch(records.path, int(record_ids[j]), int(offsets[j]), stored[j], expected[j])
        return Batch(self._images(out["images"][:batch]), self._put(labels), self._put(record_ids),
                     self._put(flipped), self._inputs(record_ids, flipped, labels))

    def _build_mxnet_pipeline(self, index: EpochIndex, epoch: int, feed: Iterator):
        """fn.readers.mxnet over ``[rec] * steps`` (copy ``s`` = step ``s``), put in planned order
        by fn.permute_batch → decode → mirror (+ normalise); plus the stored class (first label
        value) and ``source_info`` padded with zeros."""
        from nvidia.dali import fn, types

        rec = os.fspath(self.records.path)
        fd, idx_path = tempfile.mkstemp(prefix=f".{self.records.path.stem}-e{epoch}-r{self.rank}-",
                                        suffix=".idx", dir=self.index_dir)
        os.close(fd)
        try:
            write_index(idx_path, index, os.stat(rec).st_size)
            pipe = self._pipeline(index.take.shape[1])
            with pipe:
                jpegs, stored = fn.readers.mxnet(path=[rec] * index.num_copies, index_path=[idx_path],
                                                 random_shuffle=False, name="reader")
                take, mirror = fn.external_source(source=feed, num_outputs=2, batch=True,
                                                  dtype=[types.INT32, types.INT32])
                info = fn.get_property(jpegs, key="source_info")
                jpegs, stored, info = (fn.permute_batch(x, indices=take) for x in (jpegs, stored[0], info))
                pipe.set_outputs(self._decode(jpegs, mirror), stored, fn.pad(info, fill_value=0))
            pipe.build()  # DALI reads the index here, not later
        finally:
            os.unlink(idx_path)
        return pipe
