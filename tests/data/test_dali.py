"""DALI decoding (facecompat/data/dali.py, both readers): CPU mode always, mixed GPU decode when a
GPU is present. Two "ranks" are two loaders in one process (no process group needed)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install nvidia-dali-cuda120)")

from facecompat.data import dali as dali_mod  # noqa: E402
from facecompat.data._dali_mxnet import ViewOffsets, parse_offsets, plan_epoch_index  # noqa: E402
from facecompat.data.dali import DaliLoader, dali_available  # noqa: E402
from facecompat.data.faces import FaceRecords, flip_flags  # noqa: E402
from facecompat.data.loader import TorchLoader, build_loader, epoch_order  # noqa: E402
from facecompat.data.recordio import RecordIOError, RecordWriter, pack  # noqa: E402
from tests.helpers import SHARED_FIXTURES
from tests.helpers.data import is_channels_last, noise_rec

FIXTURES = SHARED_FIXTURES / "recordio"
# JPEG decoders may round differently (DALI's libjpeg-turbo and OpenCV's agree exactly on
# these files): allow 2 grey levels, in normalised units.
PIXEL_TOL = 2 / 127.5 + 1e-6
READERS = pytest.mark.parametrize("reader", ["external", "mxnet"])


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    return noise_rec(tmp_path_factory.mktemp("rec"), [7, 5, 9, 3, 6, 8])  # 38 images, 6 classes


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


@READERS
def test_dali_cpu_gives_the_torch_loaders_batches(rec_dir, reader):
    view = FaceRecords(rec_dir, seed=2)
    for epoch in (0, 1):
        d = dali(view, 4, rank=1, world=2, reader=reader)
        t = TorchLoader(view, 4, rank=1, world_size=2, num_workers=0)
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


@READERS
def test_dali_epochs_partition_the_view(rec_dir, reader):
    view = FaceRecords(rec_dir, seed=4)
    per_epoch = []
    for epoch in (0, 1):
        ids = []
        for rank in range(3):
            loader = dali(view, 3, rank=rank, world=3, reader=reader)
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
    assert np.array_equal(ids_of(list(dali(view, 3, rank=0, world=3, reader=reader))), per_epoch[0][0])


@READERS
def test_dali_resume_and_early_exit(rec_dir, reader):
    view = FaceRecords(rec_dir)
    loader = dali(view, 5, reader=reader)
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


@READERS
@pytest.mark.parametrize("batch_size", [38, 37, 19])  # one or two steps: fewer than DALI's prefetch
def test_dali_epochs_shorter_than_the_prefetch_queue(rec_dir, batch_size, reader):
    loader = dali(FaceRecords(rec_dir), batch_size, reader=reader)  # mxnet: 0, 1 and 2 sentinels
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 38 // batch_size
        assert len(np.unique(ids_of(batches))) == 38 // batch_size * batch_size


@READERS
def test_dali_relabelled_subset(rec_dir, reader):
    full = FaceRecords(rec_dir)
    view = full.subset(classes=[0, 2, 5], relabel=True)  # 7 + 9 + 8 = 24 images
    batches = list(dali(view, 6, reader=reader))
    labels, ids = torch.cat([b.labels for b in batches]).numpy(), ids_of(batches)
    assert len(ids) == 24 and set(labels) == {0, 1, 2} and labels.dtype == np.int64
    stored = np.array([int(full.reader.read(int(r)).label) for r in ids])
    assert np.array_equal(view.label_map[labels], stored)
    check_against_dataset(batches, view, 0)


@READERS
def test_dali_on_the_mxnet_written_fixture(reader):
    manifest = json.loads((FIXTURES / "manifest.json").read_text())["train"]["records"]
    labels = {r["key"]: int(r["label"]) for r in manifest if r["kind"] == "image"}
    view = FaceRecords(FIXTURES / "train.rec", seed=3)
    batches = list(dali(view, 3, reader=reader))
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


def test_dali_rejects_an_unknown_reader(rec_dir):
    with pytest.raises(ValueError, match="reader must be one of"):
        dali(FaceRecords(rec_dir), 4, reader="lmdb")


@READERS
def test_dali_names_a_record_whose_stored_label_disagrees(rec_dir, reader):
    view = FaceRecords(rec_dir)
    view.labels = view.labels.copy()
    view.labels[view.record_ids == 9] = 3  # record 9 is stored as class 1
    with pytest.raises(RecordIOError, match="disagrees") as err:
        list(dali(view, 38, reader=reader))
    assert err.value.key == 9


def test_mxnet_two_ranks_share_a_fresh_global_shuffle(rec_dir):
    view = FaceRecords(rec_dir, seed=5).subset(records=np.arange(2, 39))  # 37 images: shards of 19 and 18
    loaders = [dali(view, 4, rank=r, world=2, reader="mxnet") for r in range(2)]
    where = []  # per epoch: record id -> (rank, position in the rank's epoch)
    for epoch in (0, 1):
        ranks = []
        for rank, loader in enumerate(loaders):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 4  # (37 // 2) // 4 on both ranks
            assert all(len(torch.unique(b.record_ids)) == 4 for b in batches)  # no padded duplicates
            ranks.append(ids_of(batches))
            order = epoch_order(37, batch_size=4, rank=rank, world_size=2, seed=5, epoch=epoch)
            assert np.array_equal(ranks[-1], view.record_ids[order])  # the plan, no sentinel yielded
            check_against_dataset(batches, view, epoch)
        union = np.concatenate(ranks)
        assert len(union) == len(np.unique(union)) == 32
        where.append({int(r): (k, i) for k, ids in enumerate(ranks) for i, r in enumerate(ids)})
    common = where[0].keys() & where[1].keys()
    assert sum(where[0][r][0] != where[1][r][0] for r in common) >= 4  # records change rank
    assert sum(where[0][r] != where[1][r] for r in common) >= len(common) - 2


def test_mxnet_index_holds_view_images_only_and_leaves_the_rec_untouched(rec_dir, tmp_path, monkeypatch):
    rec = rec_dir / "train.rec"
    before = (rec.stat().st_size, rec.stat().st_mtime_ns, rec.read_bytes())
    captured = []

    def keep_a_copy(path, index, file_size):
        write_index(path, index, file_size)
        captured.append((Path(shutil.copy(path, tmp_path / f"{len(captured)}.idx")), file_size))

    write_index = dali_mod.write_index
    monkeypatch.setattr(dali_mod, "write_index", keep_a_copy)
    full = FaceRecords(rec_dir)
    view = full.subset(classes=[1, 3, 4], relabel=True)  # 5 + 3 + 6 = 14 images
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    loader = DaliLoader(view, 4, rank=0, world_size=1, device="cpu", num_threads=2, reader="mxnet",
                        index_dir=index_dir)
    batches = list(loader)
    loader.set_epoch(1, start_step=2)
    assert len(list(loader)) == 1
    assert list(index_dir.iterdir()) == []  # each index is deleted once DALI has read it
    first_id, end_id = (int(v) for v in full.reader.read_header(0).label)
    for (path, file_size), steps in zip(captured, (3, 1), strict=True):
        keys, virtual = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2).T
        assert set(keys.tolist()) <= set(view.record_ids.tolist())  # images of the view only
        assert not set(keys.tolist()) & {0, *range(first_id, end_id)}  # no header, no identity record
        copy, offset = np.divmod(virtual, file_size)
        assert np.array_equal(offset, [full.reader.offset(int(k)) for k in keys])
        assert np.array_equal(copy, np.repeat(np.arange(steps), 6))  # copy s: step s, 4 planned + 2 sentinels
        assert (np.diff(virtual) > 0).all() and file_size == before[0]
    keys = np.loadtxt(captured[0][0], dtype=np.int64, delimiter="\t")[:, 0].reshape(3, 6)
    for row, batch in zip(keys, batches, strict=True):  # sentinels are read, never yielded
        assert set(batch.record_ids.tolist()) < set(row.tolist())
    assert (rec.stat().st_size, rec.stat().st_mtime_ns, rec.read_bytes()) == before


def test_mxnet_headerless_rec_with_label_arrays(tmp_path):
    rng = np.random.default_rng(1)
    with RecordWriter(tmp_path / "plain.rec", tmp_path / "plain.idx") as w:  # im2rec: key 0 is an image
        for key, label in enumerate([2, 0, 2, 1, 0, 1, 1, 2, 0, 0, 2]):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
            w.write(key, pack([float(label), 7.0], jpeg, id=key))
    view = FaceRecords(tmp_path / "plain.rec", seed=1)
    assert view.layout == "im2rec"
    batches = list(dali(view, 5, reader="mxnet"))
    torch_batches = list(TorchLoader(view, 5, rank=0, world_size=1, num_workers=0))
    for a, b in zip(batches, torch_batches, strict=True):
        assert torch.equal(a.record_ids, b.record_ids) and torch.equal(a.labels, b.labels)
    check_against_dataset(batches, view, 0)


@pytest.mark.parametrize("batch_size", [3, 18, 36, 37, 38])
def test_mxnet_plan_brackets_each_batch_with_the_outermost_other_records(rec_dir, batch_size):
    view = FaceRecords(rec_dir)
    offsets = ViewOffsets(view)
    positions = epoch_order(38, batch_size=batch_size, rank=0, world_size=1, seed=3, epoch=2)
    index = plan_epoch_index(view, offsets, positions.reshape(-1, batch_size))
    others_sorted = np.sort(offsets.offsets)
    for row, take, planned in zip(index.offsets, index.take, positions.reshape(-1, batch_size), strict=True):
        assert (np.diff(row) > 0).all() and sorted(take) == list(range(len(row)))
        assert np.array_equal(row[take[:batch_size]], offsets.offsets[planned])
        sentinels = np.setdiff1d(row, offsets.offsets[planned])
        others = np.setdiff1d(others_sorted, offsets.offsets[planned])
        assert len(sentinels) == min(2, 38 - batch_size)
        if len(sentinels):
            assert sentinels[0] == others[0]
        if len(sentinels) == 2:
            assert sentinels[1] == others[-1]
    assert np.array_equal(index.offsets, np.vectorize(view.reader.offset)(index.record_ids))


def test_parse_offsets_of_source_info():
    prefix = b"/d/train.rec at index "
    rows = [prefix + b"7", prefix + b"1234567890123", prefix + b"40"]
    info = np.zeros((3, max(map(len, rows))), dtype=np.uint8)
    for i, row in enumerate(rows):
        info[i, :len(row)] = np.frombuffer(row, dtype=np.uint8)
    assert parse_offsets(info, prefix).tolist() == [7, 1234567890123, 40]
    with pytest.raises(RuntimeError, match="does not start with"):
        parse_offsets(info, b"/other.rec at index ")


def test_fn_readers_mxnet_shuffle_after_epoch_keeps_one_rec_in_order(rec_dir, tmp_path):
    """Why the mxnet reader plans its own epochs (see dali.py): DALI 2.x's shuffle_after_epoch
    shuffles the order of the rec *files*; over one rec every epoch reads the same samples in
    the same order, and it pins each shard to its slice."""
    from nvidia.dali import fn, pipeline_def

    view = FaceRecords(rec_dir)
    keys = view.record_ids.tolist()
    (tmp_path / "images.idx").write_text("".join(f"{k}\t{view.reader.offset(k)}\n" for k in keys))
    by_offset = {view.reader.offset(k): k for k in keys}

    @pipeline_def(batch_size=19, num_threads=1, device_id=None, seed=1)
    def read():
        jpegs, _ = fn.readers.mxnet(path=[str(view.path)], index_path=[str(tmp_path / "images.idx")],
                                    shard_id=1, num_shards=2, shuffle_after_epoch=True, name="reader")
        return fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)

    pipe = read()
    pipe.build()
    prefix = f"{view.path} at index ".encode()
    epochs = [[by_offset[o] for o in parse_offsets(np.asarray(pipe.run()[0].as_tensor()), prefix).tolist()]
              for _ in range(3)]
    assert epochs[0] == epochs[1] == epochs[2] == keys[19:]


def on_device(batch, device: torch.device) -> bool:
    """Every tensor field of a Batch (``inputs`` is None or a dict of tensors) is on ``device``."""
    tensors = [batch.images, batch.labels, batch.record_ids, batch.flipped, *(batch.inputs or {}).values()]
    return all(t.device == device for t in tensors)


@READERS
def test_dali_channels_last_is_a_view_of_hwc_output(rec_dir, reader):
    view = FaceRecords(rec_dir, seed=2)
    batches = {cl: list(dali(view, 4, reader=reader, channels_last=cl)) for cl in (False, True)}
    assert len(batches[True]) == len(batches[False]) == 9
    for plain, nhwc in zip(batches[False], batches[True], strict=True):
        assert plain.images.is_contiguous() and not is_channels_last(plain.images)
        assert is_channels_last(nhwc.images) and nhwc.images.shape == plain.images.shape == (4, 3, 112, 112)
        assert torch.equal(nhwc.images, plain.images) and torch.equal(nhwc.record_ids, plain.record_ids)
    check_against_dataset(batches[True], view, 0)


@pytest.mark.gpu
@READERS
@pytest.mark.parametrize("channels_last", [False, True])
def test_dali_mixed_decode_on_the_gpu(rec_dir, reader, channels_last):
    view = FaceRecords(rec_dir, seed=6)
    gpu = DaliLoader(view, 4, rank=0, world_size=2, device="cuda", num_threads=2, reader=reader,
                     channels_last=channels_last)
    assert gpu.decode_device == "gpu"
    gpu.batch_inputs = lambda ids, flips, labels: {"twice": torch.from_numpy(ids * 2)}
    cpu = TorchLoader(view, 4, rank=0, world_size=2, num_workers=0, device="cpu")
    batches = list(gpu)
    assert len(batches) == len(cpu)
    for a, b in zip(batches, cpu, strict=True):
        assert on_device(a, gpu.device) and is_channels_last(a.images) is channels_last
        assert torch.equal(a.inputs["twice"].cpu(), b.record_ids * 2)
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


@pytest.mark.gpu
@READERS
def test_dali_device_cpu_delivers_to_the_training_gpu(tmp_path, reader):
    """data.dali_device cpu on a GPU machine: DALI's CPU decoder, batches on the training GPU
    (channels_last when asked), equal to the torch loader's."""
    from facecompat.config import load_config
    from facecompat.data.loader import build_train_loader

    rec = noise_rec(tmp_path / "rec", [4, 4, 4, 4])
    cfg = load_config(None, [f"data.rec={rec}", "data.batch_size=4", "data.loader=dali", "data.num_workers=2",
                             "data.dali_device=cpu", f"data.dali_reader={reader}"])
    device = torch.device("cuda", 0)
    cpu = list(TorchLoader(FaceRecords(rec), 4, rank=0, world_size=1, num_workers=0, device="cpu"))
    for channels_last in (False, True):
        _, loader = build_train_loader(cfg.data, rank=0, world_size=1, device=device,
                                       channels_last=channels_last)
        assert isinstance(loader, DaliLoader) and loader.decode_device == "cpu"
        batches = list(loader)
        assert len(batches) == len(cpu) == 4
        for a, b in zip(batches, cpu, strict=True):
            assert on_device(a, device) and is_channels_last(a.images) is channels_last
            assert torch.equal(a.record_ids.cpu(), b.record_ids) and torch.equal(a.labels.cpu(), b.labels)
            assert torch.equal(a.flipped.cpu(), b.flipped)
            assert float((a.images.cpu() - b.images).abs().max()) <= PIXEL_TOL
