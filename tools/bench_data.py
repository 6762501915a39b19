"""Throughput of the CPU training data path, against an mxnet/insightface-style reference.

    python tools/bench_data.py REC_DIR [--n N] [--json] [--make [N] | --make-only] [--dali]

Measured in one process with one thread (OpenCV and torch pinned to 1 thread), on the same
``--n`` images of REC_DIR in random order, best of ``--rounds`` interleaved rounds:

- ``images_per_s``: facecompat's CPU path (TorchLoader, in-process): read + decode + flip +
  normalise to float32 CHW batches.
- ``reference_images_per_s``: what insightface's ``MXFaceDataset`` does per sample with
  mxnet's ``MXIndexedRecordIO``: seek + read header + read record, ``recordio.unpack``,
  ``mx.image.imdecode`` (OpenCV decode + BGR->RGB copy), ``.asnumpy()``, then torchvision's
  ``ToPILImage, RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5)`` (emulated with PIL and
  torch: neither mxnet nor torchvision is needed), and default collation.
- ``decode_only_images_per_s``: ``cv2.imdecode`` alone on in-memory payloads (the ceiling).
- with ``--dali``: DALI's CPU decoder pipeline (its own thread pool), and mixed GPU decode
  when a GPU is present.

``--make [N]`` writes N (default 20,000) synthetic 112x112 JPEGs (quality 90, ~5-6 KB like
MS1M crops) into REC_DIR first when it holds no ``train.rec``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from facecompat.data.faces import FaceRecords, FaceRecWriter
from facecompat.data.loader import TorchLoader
from facecompat.data.recordio import RecordIOError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("rec_dir", type=Path, help="folder with train.rec/train.idx (or to create with --make)")
    p.add_argument("--n", type=int, default=5000, help="images per measurement (default 5000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is reported")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--make", type=int, nargs="?", const=20000, default=None, metavar="N",
                   help="generate N synthetic images into REC_DIR if it has no train.rec (default 20000)")
    p.add_argument("--make-only", action="store_true", help="generate (as --make) and exit")
    p.add_argument("--dali", action="store_true", help="also measure DALI (CPU; GPU when present)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -- synthetic data -------------------------------------------------------------------------------
def synthetic_face(rng: np.random.Generator) -> np.ndarray:
    """A 112x112 BGR image with the JPEG statistics of an aligned face crop: smooth shapes and
    sensor-like noise (quality 90 gives ~5-6 KB)."""
    img = cv2.resize(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8), (112, 112),
                     interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(4, 9))):
        centre, axes = rng.integers(8, 104, 2), rng.integers(3, 22, 2)
        cv2.ellipse(img, (int(centre[0]), int(centre[1])), (int(axes[0]), int(axes[1])),
                    float(rng.uniform(0, 180)), 0, 360, rng.integers(0, 256, 3).tolist(), -1, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    noise = rng.normal(0.0, rng.uniform(7.0, 13.0), img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_rec(out_dir: Path, n: int, seed: int = 0, per_class: int = 20) -> None:
    """Write ``n`` synthetic images, ``per_class`` per identity, in insightface layout."""
    rng = np.random.default_rng(seed)
    with FaceRecWriter(out_dir) as writer:
        for i in tqdm(range(n), desc=f"writing {out_dir / 'train.rec'}", unit="img"):
            ok, jpeg = cv2.imencode(".jpg", synthetic_face(rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            writer.add(i // per_class, jpeg.tobytes())


# -- the reference: insightface MXFaceDataset over mxnet, emulated -----------------------------
class ReferenceDataset:
    """Per-sample work of insightface's ``MXFaceDataset.__getitem__`` + its transforms."""

    def __init__(self, rec_path: Path, offsets: dict[int, int]):
        self.file = open(rec_path, "rb")  # noqa: SIM115 - MXRecordIO keeps its handle open too
        self.offsets = offsets
        self.mean = [0.5, 0.5, 0.5]
        self.std = [0.5, 0.5, 0.5]

    def read_idx(self, key: int) -> bytes:  # MXIndexedRecordIO.read_idx: seek + read
        self.file.seek(self.offsets[key])
        magic, word = struct.unpack("<II", self.file.read(8))
        length = word & ((1 << 29) - 1)
        buf = self.file.read(length)
        self.file.read(-length % 4)
        return buf

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def rate_reference(ref: ReferenceDataset, keys: np.ndarray, batch_size: int) -> float:
    start = time.perf_counter()
    for s in range(0, len(keys) - batch_size + 1, batch_size):
        samples = [ref[int(k)] for k in keys[s:s + batch_size]]
        torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples])  # default_collate
    return (len(keys) // batch_size * batch_size) / (time.perf_counter() - start)


def rate_loader(loader) -> float:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch.labels)
    return n / (time.perf_counter() - start)


def rate_decode(payloads: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for p in payloads:
        cv2.imdecode(p, cv2.IMREAD_COLOR)
    return len(payloads) / (time.perf_counter() - start)


# -- main -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    records = FaceRecords(args.rec_dir)
    n = min(args.n, records.num_images) // args.batch_size * args.batch_size
    if n == 0:
        raise ValueError(f"{args.rec_dir}: {records.num_images} images, need at least one batch "
                         f"of {args.batch_size} (lower --batch-size)")
    rng = np.random.default_rng(args.seed)
    view = records.subset(records=rng.choice(records.record_ids, n, replace=False))
    ours = TorchLoader(view, args.batch_size, rank=0, world_size=1, num_workers=0, device="cpu")
    ref = ReferenceDataset(records.path, {int(k): records.reader.offset(int(k)) for k in view.record_ids})
    ref_keys = rng.permutation(view.record_ids)
    payloads = [np.frombuffer(records.reader.read(int(k)).payload, np.uint8) for k in ref_keys]
    methods = {"images_per_s": lambda: rate_loader(ours),
               "reference_images_per_s": lambda: rate_reference(ref, ref_keys, args.batch_size),
               "decode_only_images_per_s": lambda: rate_decode(payloads)}
    if args.dali:
        from facecompat.data.dali import DaliLoader

        threads = os.cpu_count() or 1
        methods["dali_cpu_images_per_s"] = lambda: rate_loader(DaliLoader(
            view, args.batch_size, rank=0, world_size=1, device="cpu", num_threads=threads))
        if torch.cuda.is_available():
            methods["dali_gpu_images_per_s"] = lambda: _rate_gpu(DaliLoader(
                view, args.batch_size, rank=0, world_size=1, device="cuda", num_threads=threads))
    best = {key: 0.0 for key in methods}
    for r in range(args.rounds):
        ours.set_epoch(r)
        for key, measure in methods.items():
            best[key] = max(best[key], measure())
    result = {key: round(value, 1) for key, value in best.items()}
    result["ratio"] = round(best["images_per_s"] / best["reference_images_per_s"], 2)
    result.update(n=n, batch_size=args.batch_size, rounds=args.rounds, threads=1,
                  mean_jpeg_bytes=round(float(np.mean([len(p) for p in payloads])), 1),
                  rec=str(records.path), cpu=_cpu_name(), cpu_count=os.cpu_count())
    if args.dali:
        result["dali_threads"] = os.cpu_count()
    return result


def _rate_gpu(loader) -> float:
    torch.cuda.synchronize()
    rate = rate_loader(loader)
    torch.cuda.synchronize()
    return rate


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(result: dict) -> None:
    rows = [("facecompat CPU path (TorchLoader, 1 thread)", "images_per_s"),
            ("reference (mxnet-style read + insightface transforms)", "reference_images_per_s"),
            ("cv2.imdecode alone (ceiling)", "decode_only_images_per_s"),
            (f"DALI CPU decode ({result.get('dali_threads')} threads)", "dali_cpu_images_per_s"),
            ("DALI mixed (GPU) decode", "dali_gpu_images_per_s")]
    print(f"{result['n']} images of {result['rec']} (mean JPEG {result['mean_jpeg_bytes']:.0f} B), "
          f"batch {result['batch_size']}, best of {result['rounds']} rounds, {result['cpu']} "
          f"x{result['cpu_count']}")
    for name, key in rows:
        if key in result:
            print(f"  {name:<56} {result[key]:>10,.0f} img/s")
    print(f"  {'ratio facecompat / reference':<56} {result['ratio']:>10.2f} x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        if args.make is not None or args.make_only:
            if not (args.rec_dir / "train.rec").is_file():
                make_rec(args.rec_dir, args.make or 20000, args.seed)
            if args.make_only:
                return 0
        if not (args.rec_dir / "train.rec").is_file():
            raise ValueError(f"{args.rec_dir}: no train.rec (create one with --make N)")
        if args.n < 1 or args.batch_size < 1 or args.rounds < 1:
            raise ValueError("--n, --batch-size and --rounds must be >= 1")
        result = run(args)
    except (ValueError, RecordIOError, OSError) as e:
        print(f"bench_data: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
