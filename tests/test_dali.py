"""DALI decoding (facecompat/data/dali.py): CPU mode always, mixed GPU decode when a GPU is present."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install nvidia-dali-cuda120)")

from facecompat.data.dali import DaliLoader, dali_available  # noqa: E402
from facecompat.data.faces import FaceRecords, FaceRecWriter, flip_flags  # noqa: E402
from facecompat.data.loader import TorchLoader, build_loader, epoch_order  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "recordio"
# JPEG decoders may round differently (DALI's libjpeg-turbo and OpenCV's agree exactly on
# these files): allow 2 grey levels, in normalised units.
PIXEL_TOL = 2 / 127.5 + 1e-6


def make_rec(out_dir: Path, class_sizes: list[int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with FaceRecWriter(out_dir) as w:
        for label, count in enumerate(class_sizes):
            for _ in range(count):
                img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
                w.add(label, cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out_dir


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    return make_rec(tmp_path_factory.mktemp("rec"), [7, 5, 9, 3, 6, 8])  # 38 images, 6 classes


def dali(view: FaceRecords, batch_size: int, rank: int = 0, world: int = 1, **kw) -> DaliLoader:
    return DaliLoader(view, batch_size, rank=rank, world_size=world, device="cpu", num_threads=2, **kw)


def ids_of(batches) -> np.ndarray:
    return torch.cat([b.record_ids for b in batches]).numpy()


def check_against_dataset(batches, view: FaceRecords, epoch: int) -> None:
    """Each decoded image is OpenCV's decode of the record it claims to be, flipped as claimed."""
    view.set_epoch(epoch)
    position = {int(r): i for i, r in enumerate(view.record_ids)}
    for b in batches:
        if view.flip:
            assert np.array_equal(b.flipped.numpy(), flip_flags(b.record_ids.numpy(), view.seed, epoch))
        for j, rid in enumerate(b.record_ids.tolist()):
            img, label, _, flipped = view[position[rid]]
            assert (label, flipped) == (int(b.labels[j]), bool(b.flipped[j]))
            assert float((b.images[j] - img).abs().max()) <= PIXEL_TOL


def test_dali_cpu_gives_the_torch_loaders_batches(rec_dir):
    view = FaceRecords(rec_dir, seed=2)
    for epoch in (0, 1):
        d, t = dali(view, 4, rank=1, world=2), TorchLoader(view, 4, rank=1, world_size=2, num_workers=0)
        d.set_epoch(epoch)
        t.set_epoch(epoch)
        batches = list(d)
        assert len(batches) == len(d) == len(t) == 4
        for a, b in zip(batches, t, strict=True):
            assert a.images.shape == (4, 3, 112, 112) and a.images.dtype == torch.float32
            assert a.labels.dtype == a.record_ids.dtype == torch.int64 and a.flipped.dtype == torch.bool
            assert torch.equal(a.record_ids, b.record_ids) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.flipped, b.flipped) and a.flipped.any()
            assert float((a.images - b.images).abs().max()) <= PIXEL_TOL
        check_against_dataset(batches, view, epoch)


def test_dali_epochs_partition_the_view(rec_dir):
    view = FaceRecords(rec_dir, seed=4)
    per_epoch = []
    for epoch in (0, 1):
        ids = []
        for rank in range(3):
            loader = dali(view, 3, rank=rank, world=3)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == 4
            ids.append(ids_of(batches))
            order = epoch_order(38, batch_size=3, rank=rank, world_size=3, seed=4, epoch=epoch)
            assert np.array_equal(ids[-1], view.record_ids[order])
        union = np.concatenate(ids)
        assert len(union) == len(np.unique(union)) == 36
        per_epoch.append(ids)
    assert not np.array_equal(per_epoch[0][0], per_epoch[1][0])
    assert np.array_equal(ids_of(list(dali(view, 3, rank=0, world=3))), per_epoch[0][0])


def test_dali_resume_and_early_exit(rec_dir):
    view = FaceRecords(rec_dir)
    loader = dali(view, 5)
    for i, _ in enumerate(loader):  # abandon an epoch half way: the next one starts clean
        if i == 2:
            break
    loader.set_epoch(1)
    full = list(loader)
    loader.set_epoch(1, start_step=5)
    tail = list(loader)
    assert len(full) == 7 and len(tail) == 2
    for a, b in zip(full[5:], tail, strict=True):
        assert torch.equal(a.record_ids, b.record_ids) and torch.equal(a.images, b.images)
    loader.set_epoch(1, start_step=7)
    assert list(loader) == []


@pytest.mark.parametrize("batch_size", [38, 19])  # one or two steps: fewer than DALI's prefetch
def test_dali_epochs_shorter_than_the_prefetch_queue(rec_dir, batch_size):
    loader = dali(FaceRecords(rec_dir), batch_size)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 38 // batch_size
        assert len(np.unique(ids_of(batches))) == 38 // batch_size * batch_size


def test_dali_relabelled_subset(rec_dir):
    full = FaceRecords(rec_dir)
    view = full.subset(classes=[0, 2, 5], relabel=True)  # 7 + 9 + 8 = 24 images
    batches = list(dali(view, 6))
    labels, ids = torch.cat([b.labels for b in batches]).numpy(), ids_of(batches)
    assert len(ids) == 24 and set(labels) == {0, 1, 2}
    stored = np.array([int(full.reader.read(int(r)).label) for r in ids])
    assert np.array_equal(view.label_map[labels], stored)
    check_against_dataset(batches, view, 0)


def test_dali_on_the_mxnet_written_fixture():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())["train"]["records"]
    labels = {r["key"]: int(r["label"]) for r in manifest if r["kind"] == "image"}
    view = FaceRecords(FIXTURES / "train.rec", seed=3)
    batches = list(dali(view, 3))
    assert len(batches) == 3 and sorted(ids_of(batches)) == sorted(labels)
    for b in batches:
        assert [labels[r] for r in b.record_ids.tolist()] == b.labels.tolist()
    check_against_dataset(batches, view, 0)


def test_build_loader_gives_dali_when_asked(rec_dir):
    assert dali_available()
    loader = build_loader(FaceRecords(rec_dir), 4, backend="dali", rank=0, world_size=1,
                          device="cpu", dali_threads=2)
    assert isinstance(loader, DaliLoader) and len(loader) == 9


def test_fn_readers_mxnet_ignores_the_order_of_its_index(rec_dir, tmp_path):
    """Why dali.py feeds its own order (see its docstring): fn.readers.mxnet sorts the offsets
    of an index, so a shuffled image-only index is still read in file order; source_info
    names the offset each sample was read at."""
    from nvidia.dali import fn, pipeline_def

    view = FaceRecords(rec_dir)
    keys = [int(k) for k in view.record_ids[::2]]  # an image-only index of every other image
    random.Random(0).shuffle(keys)
    (tmp_path / "images.idx").write_text("".join(f"{k}\t{view.reader.offset(k)}\n" for k in keys))

    @pipeline_def(batch_size=len(keys), num_threads=1, device_id=None)
    def read():
        jpegs, labels = fn.readers.mxnet(path=[str(view.path)], index_path=[str(tmp_path / "images.idx")],
                                         random_shuffle=False)
        return labels, fn.get_property(jpegs, key="source_info")

    pipe = read()
    pipe.build()
    labels, info = pipe.run()
    offsets = [int(bytes(np.asarray(info[i])).decode().rsplit(" at index ", 1)[1]) for i in range(len(keys))]
    by_offset = {view.reader.offset(k): k for k in keys}
    assert offsets == sorted(by_offset)  # file order, whatever the index said
    read_keys = [by_offset[o] for o in offsets]
    assert [int(np.asarray(labels[i])[0]) for i in range(len(keys))] == [
        int(view.labels[np.searchsorted(view.record_ids, k)]) for k in read_keys]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_mixed_decode_on_the_gpu(rec_dir):
    view = FaceRecords(rec_dir, seed=6)
    gpu = DaliLoader(view, 4, rank=0, world_size=2, device="cuda", num_threads=2)
    cpu = TorchLoader(view, 4, rank=0, world_size=2, num_workers=0, device="cpu")
    batches = list(gpu)
    assert len(batches) == len(cpu)
    for a, b in zip(batches, cpu, strict=True):
        assert all(t.is_cuda for t in a)
        assert torch.equal(a.record_ids.cpu(), b.record_ids) and torch.equal(a.flipped.cpu(), b.flipped)
        assert torch.equal(a.labels.cpu(), b.labels)
        # nvJPEG and the hardware decoder may upsample chroma differently from libjpeg-turbo,
        # which on noise images moves pixels by several levels: check each image is its own
        # record's, mirrored as claimed, rather than a pixel tolerance.
        images = a.images.cpu()
        for j in range(len(images)):
            same = float((images[j] - b.images[j]).abs().mean())
            mirrored = float((images[j] - b.images[j].flip(-1)).abs().mean())
            assert same < 8 / 127.5 and same < 0.5 * mirrored
