"""Training batches from a :class:`~facecompat.data.faces.FaceRecords` view: one contract, two engines.

Every engine yields :class:`Batch` on the target device and follows the same plan:

- **Equal steps.** ``steps_per_epoch = (num_images // world_size) // batch_size`` on every rank;
  the remainder of a shuffled epoch is dropped (insightface's ``drop_last=True``), so no rank
  waits for another at the last step.
- **A fresh global shuffle each epoch.** A permutation of the view drawn from ``(seed, epoch)``
  is cut into ``world_size`` contiguous slices of ``steps * batch_size`` positions; rank ``r``
  reads slice ``r`` in order (:func:`epoch_order`). Within an epoch no image is read twice and
  the union over ranks is the view minus the dropped remainder.
- **Flips** come from :func:`~facecompat.data.faces.flip_flags` of ``(record id, records.seed,
  epoch)``, so every engine, worker and rank flips a given image identically in an epoch.
- **Resuming** mid-epoch: ``set_epoch(epoch, start_step=k)`` skips the first ``k`` batches in
  the sampler, without reading or decoding them.
- **Views** (the contrastive objective, torch engine only): with an ``augment`` config every
  image yields two independently augmented views (:mod:`facecompat.data.augment`), drawn from
  ``(records.seed, epoch, record id, view)``; they replace the flip above.

- **The target device** holds every field of every batch, whatever the engine decodes on: a
  host batch bound for a GPU goes through pinned memory and is copied asynchronously
  (:func:`to_device`), as uint8 where the engine allows, and is normalised there.
- **channels_last** (a loader option, for CUDA training with a channels_last model): the images
  are laid out ``[B, H, W, C]`` in memory from the decoder on, and handed out as the
  ``[B, C, H, W]`` view of that memory, so ``images.contiguous(memory_format=torch.channels_last)``
  costs nothing; no engine converts a float batch's layout.

Engines: :class:`TorchLoader` (DataLoader workers, OpenCV decode) and
:class:`facecompat.data.dali.DaliLoader` (DALI decode, GPU "mixed" or CPU, to any target
device). :func:`build_loader` picks one.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from facecompat import dist
from facecompat.config import AugmentConfig, ConfigError, DataConfig
from facecompat.data.augment import ViewMaker
from facecompat.data.faces import FaceRecords, decode_image, flip_flags, label_mismatch
from facecompat.data.normalize import normalize_array, normalize_images
from facecompat.data.recordio import HEADER, RecordIOError, unpack
from facecompat.data.splits import load_view, make_split


class Batch(NamedTuple):
    """One training batch, every field on the target device.

    Attributes:
        images: float32 ``[V * B, 3, H, W]``, RGB, normalised
            (:func:`~facecompat.data.normalize.normalize_images`), flipped where ``flipped``;
            ``V`` = the loader's ``views`` (1, or 2 with augmentation): rows
            ``[v * B, (v + 1) * B)`` hold view ``v`` of the ``B`` images, in the same order.
            Contiguous, in ``torch.channels_last`` memory format when the loader's
            ``channels_last`` is set.
        labels: int64 ``[B]``: the view's labels (after ``subset(..., relabel=True)``).
        record_ids: int64 ``[B]``: the images' keys in the rec.
        flipped: bool ``[V * B]``: whether each image row was mirrored horizontally.
        inputs: per-sample extras from the loader's ``batch_inputs`` hook (a compatibility
            method's old-feature lookups), or None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    record_ids: torch.Tensor
    flipped: torch.Tensor
    inputs: dict[str, torch.Tensor] | None = None


# (record_ids, flipped, labels) of one batch on the host -> named CPU tensors [B, ...]
BatchInputs = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, torch.Tensor]]


class BatchKey(NamedTuple):
    """What a sampler hands to a worker: the epoch (for flips) and view positions ``[B]``."""

    epoch: int
    positions: np.ndarray


def steps_per_epoch(num_images: int, world_size: int, batch_size: int) -> int:
    """Batches every rank reads per epoch: ``(num_images // world_size) // batch_size``."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be >= 1")
    return (num_images // world_size) // batch_size


def epoch_order(num_images: int, *, batch_size: int, rank: int, world_size: int, seed: int,
                epoch: int) -> np.ndarray:
    """View positions rank ``rank`` reads in ``epoch``, in reading order.

    Returns:
        int64 ``[steps_per_epoch * batch_size]``: slice ``rank`` of the ``(seed, epoch)``
        permutation of ``range(num_images)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    per_rank = steps_per_epoch(num_images, world_size, batch_size) * batch_size
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(num_images)
    return perm[rank * per_rank:(rank + 1) * per_rank].astype(np.int64)


class ShardBatchSampler(Sampler[BatchKey]):
    """Batch sampler of :func:`epoch_order`: yields one :class:`BatchKey` per step.

    ``len()`` is the number of batches the next iteration yields (``steps - start_step``).
    """

    def __init__(self, num_images: int, batch_size: int, *, rank: int, world_size: int, seed: int = 0):
        self.num_images, self.batch_size = int(num_images), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.steps = steps_per_epoch(self.num_images, self.world_size, self.batch_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps}]")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[BatchKey]:
        order = epoch_order(self.num_images, batch_size=self.batch_size, rank=self.rank,
                            world_size=self.world_size, seed=self.seed, epoch=self.epoch)
        for step in range(self.start_step, self.steps):
            yield BatchKey(self.epoch, order[step * self.batch_size:(step + 1) * self.batch_size])


class EncodedBatch(NamedTuple):
    """A batch before decoding: encoded images and what is known of them (numpy, host)."""

    payloads: list[bytes]
    record_ids: np.ndarray  # int64 [B]
    labels: np.ndarray  # int64 [B], the view's
    flipped: np.ndarray  # bool [B]


def read_batch(records: FaceRecords, key: BatchKey) -> EncodedBatch:
    """Read the encoded images of ``key.positions``, check each stored label against the view,
    and draw their flips for ``key.epoch`` (none when ``records.flip`` is off)."""
    record_ids = records.record_ids[key.positions]
    labels = records.labels[key.positions]
    expected = labels if records.label_map is None else records.label_map[labels]
    reader = records.reader
    payloads = []
    for rid, want, raw in zip(record_ids.tolist(), expected.tolist(), reader.read_raw_many(record_ids)):
        flag, label = _FLAG_LABEL.unpack_from(raw) if len(raw) >= HEADER.size else (-1, 0.0)
        if flag == 0 and label == want:  # the common case: scalar class label, image follows
            payloads.append(raw[HEADER.size:])
            continue
        rec = unpack(raw, records.path, rid, reader.offset(rid))  # raises on a malformed record
        stored = int(rec.label) if rec.flag == 0 else int(rec.label[0])
        if stored != want:
            raise label_mismatch(records.path, rid, reader.offset(rid), stored, want)
        payloads.append(rec.payload)
    flipped = (flip_flags(record_ids, records.seed, key.epoch) if records.flip
               else np.zeros(len(record_ids), dtype=bool))
    return EncodedBatch(payloads, record_ids, labels, flipped)


_FLAG_LABEL = struct.Struct("<If")  # the first two fields of the <IfQQ header


class _HostBatch(NamedTuple):
    images: torch.Tensor  # uint8 [B, 3, H, W] RGB, or float32 normalised; already flipped
    labels: torch.Tensor
    record_ids: torch.Tensor
    flipped: torch.Tensor


class _BufferPool:
    """Batch arrays handed out again once nothing references them any more.

    A fresh 19 MB float batch costs ~4,700 page faults to touch (~12% of the CPU path's time);
    an array is reused only when the pool holds the last reference to it, i.e. when every
    tensor made from it (``torch.from_numpy`` keeps the array alive) has been dropped.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._arrays: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        for i in range(len(self._arrays)):
            # two references: the list's and getrefcount's own argument
            if sys.getrefcount(self._arrays[i]) == 2 and self._arrays[i].shape == shape \
                    and self._arrays[i].dtype == dtype:
                return self._arrays[i]
        array = np.empty(shape, dtype=dtype)
        if len(self._arrays) < self.capacity:
            self._arrays.append(array)
        return array

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity, "_arrays": []}  # workers start with their own pool


class _BatchReader(Dataset):
    """Reads and decodes whole batches (``__getitems__``) in a DataLoader worker or in-process.

    With ``normalize`` (batches bound for the CPU) the batch is normalised to float32 here (in
    the worker); otherwise images stay uint8 until they reach the target device: a quarter of
    the bytes to pass between processes and to copy to a GPU. With ``views`` every image
    becomes that many augmented views (rows ``[v * B, (v + 1) * B)`` hold view ``v``). With
    ``channels_last`` the batch array is ``[B, H, W, 3]`` (each decoded HWC image copied whole)
    and the tensor handed out is its ``[B, 3, H, W]`` view.
    """

    def __init__(self, records: FaceRecords, normalize: bool = False, views: ViewMaker | None = None,
                 channels_last: bool = False):
        self.records = records
        self.normalize = normalize
        self.views = views
        self.channels_last = channels_last
        self.pool = _BufferPool()

    def __len__(self) -> int:
        return self.records.num_images

    def __getitems__(self, key: BatchKey) -> _HostBatch:
        if self.views is not None:
            return self._read_views(key)
        path = self.records.path
        enc = read_batch(self.records, key)
        out: np.ndarray | None = None
        for j, (payload, rid, flip) in enumerate(zip(enc.payloads, enc.record_ids.tolist(),
                                                     enc.flipped.tolist())):
            img = decode_image(payload, path, rid, rgb=True)
            if out is None:
                out = self._take(len(enc.payloads), img.shape)
                mirrored = np.empty_like(img)
            if img.shape != mirrored.shape:
                raise RecordIOError(path, f"image of shape {img.shape} in a batch of "
                                    f"{mirrored.shape} images (all images must share one size)", rid)
            if self.channels_last:
                if flip:
                    cv2.flip(img, 1, dst=out[j])
                else:
                    out[j] = img
                continue
            if flip:
                img = cv2.flip(img, 1, dst=mirrored)
            cv2.split(img, [out[j, 0], out[j, 1], out[j, 2]])  # HWC -> CHW, in place
        assert out is not None, "empty batch"
        return self._host_batch(out, enc, enc.flipped)

    def _take(self, rows: int, image_shape: tuple[int, ...]) -> np.ndarray:
        """A pooled uint8 batch array for ``rows`` images of ``image_shape`` (H, W, 3): NHWC
        with ``channels_last``, else NCHW."""
        height, width = image_shape[:2]
        shape = (rows, height, width, 3) if self.channels_last else (rows, 3, height, width)
        return self.pool.take(shape, np.dtype(np.uint8))

    def _image_size(self, out: np.ndarray) -> tuple[int, int]:
        """(H, W) of the images of a batch array from :meth:`_take`."""
        return tuple(out.shape[1:3]) if self.channels_last else tuple(out.shape[2:])

    def _read_views(self, key: BatchKey) -> _HostBatch:
        """As ``__getitems__``, each image augmented into ``views.num_views`` views."""
        assert self.views is not None
        path, enc = self.records.path, read_batch(self.records, key)
        batch = len(enc.payloads)
        flipped = np.zeros(self.views.num_views * batch, dtype=bool)
        out: np.ndarray | None = None
        for j, (payload, rid) in enumerate(zip(enc.payloads, enc.record_ids.tolist())):
            img = decode_image(payload, path, rid, rgb=True)
            if out is None:
                out = self._take(len(flipped), img.shape)
            if img.shape[:2] != self._image_size(out):
                raise RecordIOError(path, f"image of shape {img.shape} in a batch of "
                                    f"{self._image_size(out)} images (all images must share one size)", rid)
            for v, (view, flip) in enumerate(self.views(img, rid, key.epoch)):
                row = v * batch + j
                if self.channels_last:
                    out[row] = view
                else:
                    cv2.split(view, [out[row, 0], out[row, 1], out[row, 2]])
                flipped[row] = flip
        assert out is not None, "empty batch"
        return self._host_batch(out, enc, flipped)

    def _host_batch(self, out: np.ndarray, enc: EncodedBatch, flipped: np.ndarray) -> _HostBatch:
        images = out
        if self.normalize:
            # After the decode loop, not per image: interleaving 150 KB float writes with
            # decoding evicts the decoder's working set (measured ~15% slower).
            images = self.pool.take(out.shape, np.dtype(np.float32))
            normalize_array(out, images)
        tensor = torch.from_numpy(images)
        if self.channels_last:
            tensor = tensor.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last strides
        return _HostBatch(tensor, torch.from_numpy(enc.labels),
                          torch.from_numpy(enc.record_ids), torch.from_numpy(flipped))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (itself when already there). A host tensor bound for a GPU is
    pinned (a no-op for the DataLoader's pinned batches) and copied with ``non_blocking``: from
    pageable memory the copy would make the host wait for the GPU's queued work every batch."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _identity(batch: _HostBatch) -> _HostBatch:
    return batch


def _worker_init(_: int) -> None:
    # OpenCV stays sequential as inherited (TorchLoader sets 0 before forking): calling
    # cv2.setNumThreads here would reconfigure a pool whose threads did not survive the fork.
    torch.set_num_threads(1)


class ShardedLoader:
    """What the engines share and trainers rely on: the plan of one rank (a
    :class:`ShardBatchSampler`), ``len()`` = steps per epoch, ``set_epoch``, and iteration of
    :class:`Batch` on ``device``.

    Args:
        records: the view to read (its ``flip`` and ``seed`` decide the flips).
        batch_size: images per rank per step.
        rank, world_size: this process's shard; default from :mod:`facecompat.dist`.
        seed: shuffle seed (default ``records.seed``). Flips always follow ``records.seed``,
            so that ``records[i]`` after ``records.set_epoch(e)`` is the image a batch holds.
        device: where batches go, every field (default: :func:`facecompat.dist.resolve_device`).
        channels_last: images in ``torch.channels_last`` memory format, laid out so from the
            decoder on (see the module docstring); default False, the plain NCHW layout.
    """

    def __init__(self, records: FaceRecords, batch_size: int, *, rank: int | None = None,
                 world_size: int | None = None, seed: int | None = None,
                 device: torch.device | str | None = None, channels_last: bool = False,
                 batch_inputs: BatchInputs | None = None):
        self.records = records
        self.channels_last = bool(channels_last)
        self.batch_size = int(batch_size)
        self.rank = dist.get_rank() if rank is None else int(rank)
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        self.seed = records.seed if seed is None else int(seed)
        self.device = dist.resolve_device(device)
        self.sampler = ShardBatchSampler(records.num_images, self.batch_size, rank=self.rank,
                                         world_size=self.world_size, seed=self.seed)
        if self.sampler.steps == 0:
            raise ValueError(f"{records.path}: {records.num_images} images cannot fill one batch of "
                             f"{batch_size} on each of {self.world_size} ranks")
        self.views = 1  # image rows per sample in a batch (see Batch.images)
        # Per-sample data a training objective reads with each batch (the old-feature bank): called
        # in this process on the host copies of each batch's ids, so that no device-to-host
        # synchronisation is needed, and the results travel to the device with the batch.
        self.batch_inputs: BatchInputs | None = batch_inputs

    def _inputs(self, record_ids: np.ndarray, flipped: np.ndarray,
                labels: np.ndarray) -> dict[str, torch.Tensor] | None:
        if self.batch_inputs is None:
            return None
        host = self.batch_inputs(np.asarray(record_ids), np.asarray(flipped), np.asarray(labels))
        return {name: to_device(t, self.device) for name, t in host.items()}

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        """Steps per epoch (an iteration after ``set_epoch(e, start_step=k)`` yields ``len - k``)."""
        return self.sampler.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's shuffle and flips; skip its first ``start_step`` batches (until the
        next ``set_epoch``)."""
        self.sampler.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError


class TorchLoader(ShardedLoader):
    """Batches through a ``torch.utils.data.DataLoader``: workers read and decode whole
    batches (OpenCV), the main process moves them to ``device`` and normalises there.

    Args: as :class:`ShardedLoader`, plus
        num_workers: DataLoader worker processes (0 = read in this process); persistent.
        prefetch_factor: batches each worker keeps ready.
        augment: make two augmented views of every image (``views`` = 2) with these settings,
            drawn from ``records.seed``; flipping only when ``records.flip``.

    With ``channels_last`` the workers write each decoded HWC image whole into an NHWC batch
    (instead of splitting it into planes), and the uint8 batch travels (pinned, to a GPU) and
    is normalised in that layout.
    """

    def __init__(self, records: FaceRecords, batch_size: int, *, rank: int | None = None,
                 world_size: int | None = None, seed: int | None = None,
                 device: torch.device | str | None = None, num_workers: int = 4,
                 prefetch_factor: int = 2, augment: AugmentConfig | None = None,
                 channels_last: bool = False, batch_inputs: BatchInputs | None = None):
        super().__init__(records, batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
                         channels_last=channels_last, batch_inputs=batch_inputs)
        views = None if augment is None else ViewMaker(augment, records.seed, flip=records.flip)
        self.views = 1 if views is None else views.num_views
        workers = int(num_workers)
        if workers:
            # Forked workers inherit OpenCV's thread count but not its pool's threads; with 0
            # (sequential, as detectron2 and mmcv set it) they never touch that pool, and the
            # loader's parallelism is its worker processes, not OpenCV threads inside each.
            cv2.setNumThreads(0)
        self._loader = DataLoader(
            _BatchReader(records, normalize=self.device.type == "cpu", views=views,
                         channels_last=self.channels_last),
            batch_sampler=self.sampler, collate_fn=_identity,
            num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=prefetch_factor if workers else None,
            worker_init_fn=_worker_init if workers else None)

    def __iter__(self) -> Iterator[Batch]:
        for host in self._loader:  # pinned by the DataLoader when bound for a GPU
            yield Batch(normalize_images(to_device(host.images, self.device)),
                        to_device(host.labels, self.device), to_device(host.record_ids, self.device),
                        to_device(host.flipped, self.device),
                        self._inputs(host.record_ids.numpy(), host.flipped.numpy(), host.labels.numpy()))


def build_loader(records: FaceRecords, batch_size: int, *, backend: str = "auto",
                 rank: int | None = None, world_size: int | None = None, seed: int | None = None,
                 device: torch.device | str | None = None, num_workers: int = 4,
                 dali_threads: int = 4, dali_reader: str = "external", dali_device: str = "auto",
                 augment: AugmentConfig | None = None, channels_last: bool = False,
                 batch_inputs: BatchInputs | None = None) -> ShardedLoader:
    """The loader for a training view: DALI when asked, or with ``backend="auto"`` when a GPU
    and DALI are both present; otherwise a torch DataLoader. Both yield :class:`Batch`.

    Args:
        records: the view to train on.
        batch_size: images per rank per step.
        backend: ``"auto"``, ``"dali"`` or ``"torch"``. ``"dali"`` without a GPU runs DALI's
            CPU decoder.
        rank, world_size: default from :mod:`facecompat.dist`.
        seed: shuffle seed (default ``records.seed``).
        device: target device (default CUDA when available, else CPU).
        num_workers: torch DataLoader workers (ignored by DALI).
        dali_threads: DALI CPU threads (ignored by torch).
        dali_reader: ``"external"`` (we read, DALI decodes) or ``"mxnet"`` (DALI's
            ``fn.readers.mxnet`` reads the rec through a per-epoch image-only index).
        dali_device: where DALI decodes: ``"gpu"`` (nvJPEG, on ``device``), ``"cpu"`` or
            ``"auto"`` (the GPU when ``device`` is one). Batches land on ``device`` either way.
        augment: two augmented views per image (the contrastive objective); torch engine only
            (``"auto"`` picks it).
        channels_last: images in ``torch.channels_last`` memory format (see the module docstring).

    Returns:
        a :class:`ShardedLoader` (``TorchLoader`` or ``DaliLoader``).
    """
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'torch', got {backend!r}")
    from facecompat.data import dali as dali_mod  # imports this module; nvidia.dali stays unimported

    device = dist.resolve_device(device)
    if backend == "auto":
        use_dali = augment is None and device.type == "cuda" and dali_mod.dali_available()
        backend = "dali" if use_dali else "torch"
    kw = dict(rank=rank, world_size=world_size, seed=seed, device=device, channels_last=channels_last,
              batch_inputs=batch_inputs)
    if backend == "dali":
        if augment is not None:
            raise ValueError("two-view augmentation runs on the torch loader only (backend torch or auto)")
        return dali_mod.DaliLoader(records, batch_size, num_threads=dali_threads, reader=dali_reader,
                                   decode_device=dali_device, **kw)
    return TorchLoader(records, batch_size, num_workers=num_workers, augment=augment, **kw)


def build_dataset(cfg: DataConfig) -> FaceRecords:
    """The training view a data config names: ``data.rec``, narrowed by a record-id list
    (``data.subset``) and/or one side of a protocol split (``data.protocol`` + ``data.part``)."""
    if cfg.rec is None:
        raise ConfigError("data.rec: not set (a .rec file or a folder holding train.rec)")
    records = FaceRecords(cfg.rec, flip=cfg.flip, seed=cfg.seed)
    if cfg.subset is not None:
        records = load_view(records, cfg.subset)
    if cfg.protocol != "none" and cfg.part != "full":
        records = make_split(records, cfg.protocol, cfg.split_ratio, cfg.seed).view(records, cfg.part)
    return records


def build_train_loader(cfg: DataConfig, *, rank: int | None = None, world_size: int | None = None,
                       device: torch.device | str | None = None, augment: AugmentConfig | None = None,
                       channels_last: bool = False, records: FaceRecords | None = None,
                       batch_inputs: BatchInputs | None = None) -> tuple[FaceRecords, ShardedLoader]:
    """(view, loader) for a data config: :func:`build_dataset` then :func:`build_loader`.

    Args:
        cfg: the data section (``data.dali_device`` says only where DALI decodes).
        rank, world_size: default from :mod:`facecompat.dist`.
        device: the training device; every batch lands there, whatever decodes it.
        augment: two augmented views per image, the contrastive objective's batches.
        channels_last: images in ``torch.channels_last`` memory format (ask for it when the
            model is channels_last on CUDA); default False.
    """
    records = build_dataset(cfg) if records is None else records
    device = dist.resolve_device(device)
    if cfg.loader == "dali" and cfg.dali_device == "gpu" and device.type != "cuda":
        raise ConfigError(f"data.dali_device: 'gpu' decodes on the training GPU, but training runs on "
                          f"{device} (use cpu or auto)")
    loader = build_loader(records, cfg.batch_size, backend=cfg.loader, rank=rank, world_size=world_size,
                          seed=cfg.seed, device=device, num_workers=cfg.num_workers,
                          dali_threads=max(cfg.num_workers, 1), dali_reader=cfg.dali_reader,
                          dali_device=cfg.dali_device, augment=augment, channels_last=channels_last,
                          batch_inputs=batch_inputs)
    return records, loader
