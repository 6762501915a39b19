"""DALI decoding of training batches: GPU ("mixed") decode, or DALI's CPU decoder for tests.

The plan is :mod:`facecompat.data.loader`'s (equal steps, global shuffle per epoch, flips from
``flip_flags``, resumable at any step); this module only changes who decodes. The encoded
images are read by :class:`~facecompat.data.recordio.RecordReader` in the order of
:func:`~facecompat.data.loader.epoch_order` and fed through ``fn.external_source`` together
with their flip flags; DALI decodes, mirrors and normalises. Record ids, labels and flips of
a batch are therefore known by construction, not recovered from DALI.

Why not ``fn.readers.mxnet`` over an image-only index (the first and last points are checked
in ``tests/test_dali.py``, the second is in DALI's ``mmaped_file.cc``):

- it sorts the offsets of its index and takes each record's size from the next offset
  (DALI's ``recordio_loader.h``), so the order of the index file is ignored: it always reads
  in file order, i.e. class by class in an insightface rec;
- its only shuffle is a buffer of ``initial_fill`` samples. Past ``vm.max_map_count / 2``
  buffered samples (32,765 by default) DALI stops sharing the memory map and copies every
  sample, so shuffling a rank's share of MS1Mv3 (650k images on 8 GPUs) would not fit and a
  smaller buffer leaves every batch drawn from a few thousand neighbouring identities;
- it does report ``source_info`` (``"<rec> at index <offset>"``), which would give the record
  ids back, but neither the order, nor our flips, nor a cheap mid-epoch resume.

Reading in Python costs ~20 us per image (two ``pread`` calls and a label check), far below
what one GPU consumes.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import numpy as np
import torch

from facecompat.data.faces import FaceRecords
from facecompat.data.loader import Batch, BatchKey, EncodedBatch, ShardedLoader, read_batch


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliLoader(ShardedLoader):
    """Batches decoded by DALI; same plan and contract as :class:`~facecompat.data.loader.TorchLoader`.

    Args: as :class:`~facecompat.data.loader.ShardedLoader` (``device`` ``cuda[:i]`` decodes on
    that GPU with the "mixed" decoder, ``cpu`` runs DALI's CPU decoder with ``device_id=None``),
    plus
        num_threads: DALI CPU threads.
        prefetch_queue_depth: batches DALI prepares ahead.
    """

    def __init__(self, records: FaceRecords, batch_size: int, *, rank: int | None = None,
                 world_size: int | None = None, seed: int | None = None,
                 device: torch.device | str | None = None, num_threads: int = 4,
                 prefetch_queue_depth: int = 2):
        if not dali_available():
            raise ImportError("DALI is not installed: pip install nvidia-dali-cuda120 "
                              "(or use the torch loader)")
        super().__init__(records, batch_size, rank=rank, world_size=world_size, seed=seed, device=device)
        self.num_threads = int(num_threads)
        self.prefetch_queue_depth = int(prefetch_queue_depth)

    def __iter__(self) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        keys = list(self.sampler)
        if not keys:
            return
        # The source runs ahead of the consumer by DALI's prefetch depth; batches come out in
        # the order they went in, so a FIFO pairs each decoded batch with its metadata.
        pending: collections.deque[EncodedBatch] = collections.deque()
        pipe = self._build_pipeline(self._feed(keys, pending))
        batches = DALIGenericIterator([pipe], ["images"], auto_reset=False)
        try:
            for out in batches:
                enc = pending.popleft()
                images = out[0]["images"]
                if images.device != self.device:
                    images = images.to(self.device, non_blocking=True)
                yield Batch(images, self._put(enc.labels), self._put(enc.record_ids), self._put(enc.flipped))
        finally:
            del batches, pipe

    def _put(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def _feed(self, keys: list[BatchKey], pending: collections.deque
              ) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        """Per step: encoded images ``B x [n_bytes] uint8`` and mirror flags ``[B] int32``."""
        for key in keys:
            enc = read_batch(self.records, key)
            pending.append(enc)
            yield [np.frombuffer(p, dtype=np.uint8) for p in enc.payloads], enc.flipped.astype(np.int32)

    def _build_pipeline(self, source: Iterator):
        """external_source (bytes, mirror flags) → decode (mixed or cpu) → mirror + normalise, CHW."""
        from nvidia.dali import Pipeline, fn, types

        gpu = self.device.type == "cuda"
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=self.device.index if gpu else None,
                        prefetch_queue_depth=self.prefetch_queue_depth, seed=self.seed)
        with pipe:
            jpegs, mirror = fn.external_source(source=source, num_outputs=2, batch=True,
                                               dtype=[types.UINT8, types.INT32])
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
            pipe.set_outputs(images)
        pipe.build()
        return pipe
