"""Throughput of the CPU training data path, against an mxnet/insightface-style reference.

Everything is measured in one process with one thread (OpenCV and torch pinned to 1 thread
for the duration), on the same ``n`` randomly chosen images of a rec, best of ``rounds``
interleaved rounds (a busy neighbour on the machine then hits every row alike).

:func:`measure` gives rates in images per second:

- ``images_per_s``: facecompat's CPU path (:class:`~facecompat.data.loader.TorchLoader`,
  in-process): read + decode + flip + normalise to float32 CHW batches.
- ``reference_images_per_s``: what insightface's ``MXFaceDataset`` does per sample with
  mxnet's ``MXIndexedRecordIO``, emulated by :class:`ReferenceDataset` (neither mxnet nor
  torchvision is needed), plus default collation.
- ``decode_only_images_per_s``: ``cv2.imdecode`` alone on in-memory payloads (the ceiling).
- with ``dali``: DALI's CPU decoder (its own thread pool), and mixed GPU decode when a GPU is
  present.

:func:`measure_stages` splits the CPU path into its stages, in µs per image, on the batches
the loader plans (see :data:`STAGES`). :func:`make_bench_rec` writes synthetic 112x112 JPEGs
with the size statistics of MS1M crops.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from facecompat.data.dali import DaliLoader, dali_available
from facecompat.data.faces import FaceRecords, FaceRecWriter, decode_image
from facecompat.data.loader import (
    BatchKey,
    EncodedBatch,
    ShardBatchSampler,
    TorchLoader,
    _BatchReader,
    read_batch,
)
from facecompat.data.normalize import normalize_array

#: The stages of :func:`measure_stages`, each in µs per image:
#: ``read``: :func:`~facecompat.data.loader.read_batch` (``RecordReader.read_raw_many`` + header
#: and label check + flip flags); ``decode``: ``cv2.imdecode`` straight to RGB, alone;
#: ``decode+split``: the decode followed by ``cv2.split`` into a reused uint8 CHW batch;
#: ``flip``: ``cv2.flip`` into a reused buffer, per *flipped* image (0 when none is flipped);
#: ``normalize``: one ``cv2.LUT`` pass over the uint8 batch into a reused float32 batch;
#: ``full``: the loader's ``_BatchReader(normalize=True).__getitems__`` (all of the above).
STAGES = ("read", "decode", "decode+split", "flip", "normalize", "full")


# -- synthetic data -------------------------------------------------------------------------------
def synthetic_face(rng: np.random.Generator) -> np.ndarray:
    """A 112x112 BGR uint8 image with the JPEG statistics of an aligned face crop: smooth shapes
    and sensor-like noise (JPEG quality 90 gives ~5-6 KB)."""
    img = cv2.resize(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8), (112, 112),
                     interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(4, 9))):
        centre, axes = rng.integers(8, 104, 2), rng.integers(3, 22, 2)
        cv2.ellipse(img, (int(centre[0]), int(centre[1])), (int(axes[0]), int(axes[1])),
                    float(rng.uniform(0, 180)), 0, 360, rng.integers(0, 256, 3).tolist(), -1, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    noise = rng.normal(0.0, rng.uniform(7.0, 13.0), img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_bench_rec(out_dir: str | os.PathLike, n: int, seed: int = 0, per_class: int = 20,
                   progress: bool = True) -> Path:
    """Write ``n`` synthetic faces (:func:`synthetic_face`, JPEG quality 90), ``per_class`` per
    identity, as an insightface rec (``train.rec``, ``train.idx``, ``property``) in ``out_dir``.

    Returns:
        the path of ``train.rec``.
    """
    if n < 1 or per_class < 1:
        raise ValueError(f"need n >= 1 images and per_class >= 1, got n={n}, per_class={per_class}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    with FaceRecWriter(out_dir) as writer:
        for i in tqdm(range(n), desc=f"writing {out_dir / 'train.rec'}", unit="img", disable=not progress):
            ok, jpeg = cv2.imencode(".jpg", synthetic_face(rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            writer.add(i // per_class, jpeg.tobytes())
    return out_dir / "train.rec"


# -- the reference: insightface MXFaceDataset over mxnet, emulated -----------------------------
class ReferenceDataset:
    """The per-sample work of insightface's ``MXFaceDataset.__getitem__`` and its transforms.

    mxnet's ``MXIndexedRecordIO.read_idx`` (seek + read header + read record),
    ``recordio.unpack``, ``mx.image.imdecode(...).asnumpy()`` (OpenCV decode + BGR->RGB copy),
    then torchvision's ``ToPILImage, RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5)``,
    emulated with PIL and torch. mxnet's NDArray/engine overhead is left out, so the real
    reference is slower.

    Args:
        rec_path: the ``.rec`` file.
        offsets: byte offset of each record key to be read.
    """

    def __init__(self, rec_path: str | os.PathLike, offsets: dict[int, int]):
        self.file = open(rec_path, "rb")  # noqa: SIM115 - MXRecordIO keeps its handle open too
        self.offsets = offsets
        self.mean = [0.5, 0.5, 0.5]
        self.std = [0.5, 0.5, 0.5]

    def close(self) -> None:
        self.file.close()

    def read_idx(self, key: int) -> bytes:
        """MXIndexedRecordIO.read_idx: seek, read the chunk header, read the record."""
        self.file.seek(self.offsets[key])
        _magic, word = struct.unpack("<II", self.file.read(8))
        length = word & ((1 << 29) - 1)
        buf = self.file.read(length)
        self.file.read(-length % 4)
        return buf

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 ``[3, H, W]`` in [-1, 1], int64 label) of record ``key``."""
        from PIL import Image

        s = self.read_idx(key)
        flag, label, _, _ = struct.unpack("IfQQ", s[:24])  # mx.recordio.unpack
        s = s[24:]
        if flag > 0:
            label = np.frombuffer(s, np.float32, flag)
            s = s[flag * 4:]
        if not isinstance(label, float):
            label = label[0]
        label = torch.tensor(label, dtype=torch.long)
        # mx.image.imdecode(img).asnumpy(): OpenCV decode, to RGB, copied out of the NDArray
        bgr = cv2.imdecode(np.frombuffer(s, dtype=np.uint8), cv2.IMREAD_COLOR)
        sample = np.array(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        pic = Image.fromarray(sample, mode="RGB")  # ToPILImage
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip
            pic = pic.transpose(Image.FLIP_LEFT_RIGHT)
        img = torch.from_numpy(np.array(pic, np.uint8, copy=True))  # ToTensor
        img = img.view(pic.size[1], pic.size[0], 3).permute((2, 0, 1)).contiguous()
        img = img.to(dtype=torch.float32).div(255)
        img = img.clone()  # Normalize (inplace=False)
        mean = torch.as_tensor(self.mean, dtype=img.dtype)
        std = torch.as_tensor(self.std, dtype=img.dtype)
        if (std == 0).any():
            raise ValueError("std evaluated to zero")
        img.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        return img, label


# -- measurements ---------------------------------------------------------------------------------
def measure(rec_dir: str | os.PathLike, n: int, batch_size: int = 128, rounds: int = 3, seed: int = 0,
            dali: bool = False, stages: bool = False) -> dict:
    """Images per second of facecompat's CPU path, the reference and decoding alone.

    Args:
        rec_dir: a folder with ``train.rec``/``train.idx`` (or a ``.rec``).
        n: images to measure on (at most the rec's; rounded down to whole batches).
        batch_size: images per batch.
        rounds: interleaved rounds; the best of each row is reported.
        seed: picks the ``n`` images and the reference's order.
        dali: also measure DALI's CPU decoder (and its mixed GPU decoder when a GPU is present).
        stages: also measure the CPU path stage by stage (:func:`measure_stages`), in the same
            rounds, under ``"stages_us"``.

    Returns:
        ``{"images_per_s", "reference_images_per_s", "decode_only_images_per_s",
        ["dali_cpu_images_per_s", "dali_gpu_images_per_s",] "ratio", "n", "batch_size", "rounds",
        "threads", "mean_jpeg_bytes", "rec", "cpu", "cpu_count", ["dali_threads", "stages_us"]}``.
    """
    with _one_thread():
        records = FaceRecords(rec_dir)
        view, rng = _bench_view(records, n, batch_size, rounds, seed)
        ours = TorchLoader(view, batch_size, rank=0, world_size=1, num_workers=0, device="cpu")
        ref_keys = rng.permutation(view.record_ids)
        payloads = [np.frombuffer(records.reader.read(int(k)).payload, np.uint8) for k in ref_keys]
        ref = ReferenceDataset(records.path, {int(k): records.reader.offset(int(k)) for k in ref_keys})
        methods: dict[str, Callable[[], float]] = {
            "images_per_s": lambda: _rate_loader(ours),
            "reference_images_per_s": lambda: _rate_reference(ref, ref_keys, batch_size),
            "decode_only_images_per_s": lambda: _rate_decode(payloads)}
        if dali:
            methods.update(_dali_methods(view, batch_size))
        stage_bench = _StageBench(view, batch_size) if stages else None
        best = {key: 0.0 for key in methods}
        best_stages = {key: float("inf") for key in STAGES}
        try:
            for r in range(rounds):
                ours.set_epoch(r)
                for key, rate in methods.items():
                    best[key] = max(best[key], rate())
                if stage_bench is not None:
                    best_stages = _lower(best_stages, stage_bench.run(r))
        finally:
            ref.close()
    result = {key: round(value, 1) for key, value in best.items()}
    result["ratio"] = round(best["images_per_s"] / best["reference_images_per_s"], 2)
    result.update(n=view.num_images, batch_size=batch_size, rounds=rounds, threads=1,
                  mean_jpeg_bytes=round(float(np.mean([len(p) for p in payloads])), 1),
                  rec=str(records.path), cpu=_cpu_name(), cpu_count=os.cpu_count())
    if dali:
        result["dali_threads"] = os.cpu_count()
    if stages:
        result["stages_us"] = _to_us(best_stages)
    return result


def measure_stages(rec_dir: str | os.PathLike, n: int, batch_size: int = 128, rounds: int = 3,
                   seed: int = 0) -> dict[str, float]:
    """Per-image cost of each stage of the CPU path (:data:`STAGES`), in µs, best of ``rounds``.

    Measured in one thread on the images :func:`measure` picks for the same ``n`` and ``seed``,
    in the loader's batches (epoch ``r`` in round ``r``), the stages interleaved batch by batch:
    each batch goes through every stage in turn, after one untimed warm-up batch.

    Returns:
        ``{stage: µs per image}`` in the order of :data:`STAGES` (``flip``: per flipped image).
    """
    with _one_thread():
        view, _ = _bench_view(FaceRecords(rec_dir), n, batch_size, rounds, seed)
        bench = _StageBench(view, batch_size)
        best = {key: float("inf") for key in STAGES}
        for r in range(rounds):
            best = _lower(best, bench.run(r))
    return _to_us(best)


class _StageBench:
    """The stage breakdown over the planned batches of a view, in seconds per image.

    Stages are interleaved batch by batch (each batch goes through every stage in turn): a busy
    neighbour on the machine then hits every stage alike, and each stage finds the batch's
    payloads as warm in cache as the loader does right after reading them.
    """

    def __init__(self, view: FaceRecords, batch_size: int):
        self.view = view
        self.sampler = ShardBatchSampler(view.num_images, batch_size, rank=0, world_size=1, seed=view.seed)
        self.full_reader = _BatchReader(view, normalize=True)
        self.decode = _rgb_decoder()
        self.out: np.ndarray | None = None  # uint8 [B, 3, H, W], reused as the loader's pool does
        self.out_float: np.ndarray | None = None
        # Warm-up on one batch: the decoder, and the batch buffers' first-touch page faults
        # (~4,700 for a 19 MB float batch) that the loader's pool pays once, not per round.
        self._batch(next(iter(self.sampler)))

    def run(self, epoch: int) -> dict[str, float]:
        """One round over the batches of ``epoch``: ``{stage: seconds per image}`` (flip: per
        flipped image, 0 when none is)."""
        self.sampler.set_epoch(epoch)
        totals = dict.fromkeys(STAGES, 0.0)
        num_images = num_flipped = 0
        for key in self.sampler:
            times, flipped = self._batch(key)
            for stage, seconds in times.items():
                totals[stage] += seconds
            num_images += len(key.positions)
            num_flipped += flipped
        per_image = {stage: seconds / num_images for stage, seconds in totals.items()}
        per_image["flip"] = totals["flip"] / num_flipped if num_flipped else 0.0
        return per_image

    def _batch(self, key: BatchKey) -> tuple[dict[str, float], int]:
        """Seconds each stage takes on one batch, and how many of its images are flipped."""
        start = time.perf_counter()
        enc = read_batch(self.view, key)
        times = {"read": time.perf_counter() - start}
        start = time.perf_counter()
        for payload in enc.payloads:
            self.decode(payload)
        times["decode"] = time.perf_counter() - start
        times["decode+split"], times["normalize"] = self._decode_split_normalize(enc)
        times["flip"], num_flipped = self._flip(enc)
        start = time.perf_counter()
        self.full_reader.__getitems__(key)  # dropped at once, so the pool reuses its buffers
        times["full"] = time.perf_counter() - start
        return times, num_flipped

    def _decode_split_normalize(self, enc: EncodedBatch) -> tuple[float, float]:
        start = time.perf_counter()
        for j, payload in enumerate(enc.payloads):
            img = self.decode(payload)
            if self.out is None or self.out.shape != (len(enc.payloads), 3, *img.shape[:2]):
                self.out = np.empty((len(enc.payloads), 3, *img.shape[:2]), np.uint8)
                self.out_float = np.empty(self.out.shape, np.float32)
            cv2.split(img, [self.out[j, 0], self.out[j, 1], self.out[j, 2]])
        split_time = time.perf_counter() - start
        start = time.perf_counter()  # right after the batch's split, as in the loader
        normalize_array(self.out, self.out_float)
        return split_time, time.perf_counter() - start

    def _flip(self, enc: EncodedBatch) -> tuple[float, int]:
        # Each flip is timed on its own, right after its decode (as in the loader, the image is
        # then still in cache); the two perf_counter calls add ~0.4 µs on a VM.
        flip_time, num_flipped, mirrored = 0.0, 0, None
        for payload in itertools.compress(enc.payloads, enc.flipped.tolist()):
            img = self.decode(payload)
            if mirrored is None or mirrored.shape != img.shape:
                mirrored = np.empty_like(img)
            start = time.perf_counter()
            cv2.flip(img, 1, dst=mirrored)
            flip_time += time.perf_counter() - start
            num_flipped += 1
        return flip_time, num_flipped


def _rgb_decoder() -> Callable[[bytes], np.ndarray]:
    """The loader's decode: ``faces.decode_image`` to RGB."""
    return lambda p: decode_image(p, rgb=True)


def _bench_view(records: FaceRecords, n: int, batch_size: int, rounds: int,
                seed: int) -> tuple[FaceRecords, np.random.Generator]:
    """The view of the images to measure on (whole batches) and the generator that drew it."""
    if n < 1 or batch_size < 1 or rounds < 1:
        raise ValueError(f"n ({n}), batch_size ({batch_size}) and rounds ({rounds}) must be >= 1")
    num = min(n, records.num_images) // batch_size * batch_size
    if num == 0:
        raise ValueError(f"{records.path}: {min(n, records.num_images)} images to measure on, need at "
                         f"least one batch of {batch_size} (lower the batch size)")
    rng = np.random.default_rng(seed)
    return records.subset(records=rng.choice(records.record_ids, num, replace=False)), rng


def _dali_methods(view: FaceRecords, batch_size: int) -> dict[str, Callable[[], float]]:

    if not dali_available():
        raise ImportError("DALI is not installed (nvidia.dali cannot be imported)")
    threads = os.cpu_count() or 1
    methods = {"dali_cpu_images_per_s": lambda: _rate_loader(DaliLoader(
        view, batch_size, rank=0, world_size=1, device="cpu", num_threads=threads))}
    if torch.cuda.is_available():
        methods["dali_gpu_images_per_s"] = lambda: _rate_gpu(DaliLoader(
            view, batch_size, rank=0, world_size=1, device="cuda", num_threads=threads))
    return methods


def _rate_reference(ref: ReferenceDataset, keys: np.ndarray, batch_size: int) -> float:
    start = time.perf_counter()
    for s in range(0, len(keys) - batch_size + 1, batch_size):
        samples = [ref[int(k)] for k in keys[s:s + batch_size]]
        torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples])  # default_collate
    return (len(keys) // batch_size * batch_size) / (time.perf_counter() - start)


def _rate_loader(loader) -> float:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch.labels)
    return n / (time.perf_counter() - start)


def _rate_gpu(loader) -> float:
    torch.cuda.synchronize()
    rate = _rate_loader(loader)
    torch.cuda.synchronize()
    return rate


def _rate_decode(payloads: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for p in payloads:
        cv2.imdecode(p, cv2.IMREAD_COLOR)
    return len(payloads) / (time.perf_counter() - start)


def _lower(best: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    return {key: min(best[key], new[key]) for key in best}


def _to_us(seconds: dict[str, float]) -> dict[str, float]:
    return {key: round(value * 1e6, 1) for key, value in seconds.items()}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Pin OpenCV and torch to one thread, restoring their settings afterwards."""
    cv_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(cv_threads)
        torch.set_num_threads(torch_threads)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
