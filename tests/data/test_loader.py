"""The torch loader and the batch plan shared with DALI (facecompat/data/loader.py)."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facecompat.config import AugmentConfig
from facecompat.data.dali import dali_available
from facecompat.data.faces import FaceRecords, FaceRecWriter, flip_flags
from facecompat.data.loader import (
    Batch,
    ShardBatchSampler,
    TorchLoader,
    build_loader,
    epoch_order,
    steps_per_epoch,
)
from facecompat.data.normalize import normalize_images
from facecompat.data.recordio import RecordIOError
from tests.helpers import SHARED_FIXTURES
from tests.helpers.data import is_channels_last, noise_rec

FIXTURES = SHARED_FIXTURES / "recordio"
needs_dali = pytest.mark.skipif(not dali_available(),
                                reason="DALI is not installed (pip install nvidia-dali-cuda120)")


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    return noise_rec(tmp_path_factory.mktemp("rec"), [7, 5, 9, 3, 6, 8])  # 38 images, 6 classes


def collect(loader) -> list[Batch]:
    return list(loader)


def check_batches_against_dataset(batches: list[Batch], view: FaceRecords, epoch: int, atol: float) -> None:
    """Every image is the dataset's own (decode, flip, normalise) of that record id, with the
    view's label and the flip_flags of this epoch."""
    view.set_epoch(epoch)
    position = {int(r): i for i, r in enumerate(view.record_ids)}
    for batch in batches:
        expected_flips = flip_flags(batch.record_ids.numpy(), view.seed, epoch) if view.flip else None
        if expected_flips is not None:
            assert np.array_equal(batch.flipped.numpy(), expected_flips)
        for j, rid in enumerate(batch.record_ids.tolist()):
            img, label, record_id, flipped = view[position[rid]]
            assert (record_id, label, flipped) == (rid, int(batch.labels[j]), bool(batch.flipped[j]))
            assert torch.allclose(batch.images[j], img, atol=atol, rtol=0)


def test_steps_per_epoch_drops_the_remainder():
    assert steps_per_epoch(38, 1, 4) == 9
    assert steps_per_epoch(38, 3, 4) == 3  # 12 per rank, 36 of 38 used
    assert steps_per_epoch(7, 2, 4) == 0
    with pytest.raises(ValueError):
        steps_per_epoch(10, 0, 4)


def test_epoch_order_partitions_a_fresh_global_shuffle():
    n, b, world = 50, 4, 3
    orders = [epoch_order(n, batch_size=b, rank=r, world_size=world, seed=7, epoch=0) for r in range(world)]
    assert {len(o) for o in orders} == {steps_per_epoch(n, world, b) * b} == {16}
    union = np.concatenate(orders)
    assert len(np.unique(union)) == len(union) == 48 and union.min() >= 0 and union.max() < n
    again = [epoch_order(n, batch_size=b, rank=r, world_size=world, seed=7, epoch=0) for r in range(world)]
    assert all(np.array_equal(x, y) for x, y in zip(orders, again))
    nxt = epoch_order(n, batch_size=b, rank=0, world_size=world, seed=7, epoch=1)
    other_seed = epoch_order(n, batch_size=b, rank=0, world_size=world, seed=8, epoch=0)
    assert not np.array_equal(nxt, orders[0]) and not np.array_equal(other_seed, orders[0])
    with pytest.raises(ValueError):
        epoch_order(n, batch_size=b, rank=3, world_size=world, seed=0, epoch=0)


def test_sampler_skips_to_start_step():
    s = ShardBatchSampler(40, 4, rank=1, world_size=2, seed=3)
    s.set_epoch(2)
    full = [k.positions for k in s]
    s.set_epoch(2, start_step=3)
    assert len(s) == 2 and all(k.epoch == 2 for k in s)
    assert all(np.array_equal(a, k.positions) for a, k in zip(full[3:], s))
    with pytest.raises(ValueError):
        s.set_epoch(0, start_step=6)


def test_torch_loader_ranks_cover_the_view_once_per_epoch(rec_dir):
    view = FaceRecords(rec_dir, seed=5)
    world, b = 2, 4
    loaders = [TorchLoader(view, b, rank=r, world_size=world, num_workers=0, device="cpu")
               for r in range(world)]
    epochs = []
    for epoch in (0, 1):
        ids = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = collect(loader)
            assert len(batches) == len(loader) == steps_per_epoch(38, world, b) == 4
            for batch in batches:
                assert batch.images.shape == (b, 3, 112, 112) and batch.images.dtype == torch.float32
                assert batch.labels.dtype == batch.record_ids.dtype == torch.int64
                assert batch.flipped.dtype == torch.bool
                assert float(batch.images.min()) >= -1.0 and float(batch.images.max()) <= 1.0
            check_batches_against_dataset(batches, view, epoch, atol=1e-6)
            ids.append(torch.cat([x.record_ids for x in batches]).numpy())
        union = np.concatenate(ids)
        assert len(np.unique(union)) == len(union) == 32 and np.isin(union, view.record_ids).all()
        epochs.append(ids)
    assert not np.array_equal(epochs[0][0], epochs[1][0])
    again = TorchLoader(view, b, rank=0, world_size=world, num_workers=0, device="cpu")
    assert np.array_equal(torch.cat([x.record_ids for x in again]).numpy(), epochs[0][0])


def test_workers_and_persistent_workers_follow_the_epoch(rec_dir):
    view = FaceRecords(rec_dir, seed=1)
    in_process = TorchLoader(view, 5, rank=0, world_size=1, num_workers=0, device="cpu")
    workers = TorchLoader(view, 5, rank=0, world_size=1, num_workers=2, device="cpu")
    for epoch in (0, 1, 2):  # persistent workers must still flip by the current epoch
        in_process.set_epoch(epoch)
        workers.set_epoch(epoch)
        for a, b in zip(collect(in_process), collect(workers), strict=True):
            assert torch.equal(a.record_ids, b.record_ids) and torch.equal(a.flipped, b.flipped)
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_resume_skips_batches_without_reading_them(rec_dir, monkeypatch):
    view = FaceRecords(rec_dir)
    loader = TorchLoader(view, 4, rank=0, world_size=1, num_workers=0, device="cpu")
    loader.set_epoch(3)
    full = collect(loader)
    reads = []
    original = view.reader.read_raw_many
    monkeypatch.setattr(view.reader, "read_raw_many", lambda keys: reads.extend(keys) or original(keys))
    loader.set_epoch(3, start_step=6)
    tail = collect(loader)
    assert len(loader) == 9 and len(tail) == 3 and len(reads) == 3 * 4
    for a, b in zip(full[6:], tail, strict=True):
        assert torch.equal(a.record_ids, b.record_ids) and torch.equal(a.images, b.images)
    loader.set_epoch(3, start_step=9)
    assert collect(loader) == []


def test_relabelled_subset_yields_view_labels(rec_dir):
    full = FaceRecords(rec_dir)
    view = full.subset(classes=[1, 3, 4], relabel=True)  # 5 + 3 + 6 = 14 images
    loader = TorchLoader(view, 3, rank=0, world_size=1, num_workers=0, device="cpu")
    batches = collect(loader)
    labels = torch.cat([b.labels for b in batches]).numpy()
    ids = torch.cat([b.record_ids for b in batches]).numpy()
    assert set(labels) <= {0, 1, 2} and len(ids) == 12
    stored = np.array([int(full.reader.read(int(r)).label) for r in ids])
    assert np.array_equal(view.label_map[labels], stored)
    check_batches_against_dataset(batches, view, 0, atol=1e-6)


def test_label_disagreeing_with_the_record_raises(rec_dir):
    view = FaceRecords(rec_dir).subset(classes=[0])
    view.labels = view.labels + 1  # the view now claims class 1 for class-0 images
    with pytest.raises(RecordIOError, match="disagrees"):
        collect(TorchLoader(view, 2, rank=0, world_size=1, num_workers=0, device="cpu"))


def test_images_of_different_sizes_in_one_batch_raise(tmp_path):
    with FaceRecWriter(tmp_path) as w:
        for size in (112, 96):
            w.add(0, cv2.imencode(".jpg", np.zeros((size, size, 3), np.uint8))[1].tobytes())
    with pytest.raises(RecordIOError, match="share one size"):
        collect(TorchLoader(FaceRecords(tmp_path), 2, rank=0, world_size=1, num_workers=0, device="cpu"))


def test_too_few_images_and_bad_backend(rec_dir):
    view = FaceRecords(rec_dir)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        TorchLoader(view, 20, rank=0, world_size=2, num_workers=0, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        build_loader(view, 4, backend="mxnet")


def test_build_loader_picks_torch_without_a_gpu(rec_dir, monkeypatch):
    loader = build_loader(FaceRecords(rec_dir), 4, rank=0, world_size=1, num_workers=0, device="cpu")
    assert isinstance(loader, TorchLoader) and len(loader) == 9
    from facecompat.data import dali

    monkeypatch.setattr(dali, "dali_available", lambda: False)
    with pytest.raises(ImportError, match="DALI is not installed"):
        build_loader(FaceRecords(rec_dir), 4, backend="dali", rank=0, world_size=1, device="cpu")


def test_mxnet_written_fixture():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())["train"]["records"]
    labels = {r["key"]: int(r["label"]) for r in manifest if r["kind"] == "image"}
    view = FaceRecords(FIXTURES / "train.rec", flip=False)
    loader = TorchLoader(view, 2, rank=1, world_size=2, num_workers=0, device="cpu")
    batches = collect(loader)
    assert len(batches) == 2 and not any(b.flipped.any() for b in batches)
    for b in batches:
        assert [labels[r] for r in b.record_ids.tolist()] == b.labels.tolist()
    check_batches_against_dataset(batches, view, 0, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, rec: str, out: str) -> None:
    import os

    from facecompat import dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_distributed(backend="gloo")
    try:
        loader = build_loader(FaceRecords(rec), 4, backend="torch", num_workers=0, device="cpu")
        ids = torch.cat([b.record_ids for b in loader]).tolist()
        Path(out).write_text(json.dumps({"rank": loader.rank, "steps": len(loader), "ids": ids}))
    finally:
        dist.destroy()


def test_two_process_gloo_ranks_take_disjoint_equal_shards(rec_dir, tmp_path):
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(rec_dir), str(tmp_path / f"{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and {r["steps"] for r in results} == {4}
    ids = results[0]["ids"] + results[1]["ids"]
    assert len(ids) == len(set(ids)) == 32
    expected = FaceRecords(rec_dir).record_ids
    for r in range(2):
        order = epoch_order(38, batch_size=4, rank=r, world_size=2, seed=0, epoch=0)
        assert results[r]["ids"] == expected[order].tolist()


def test_build_from_config_protocol_and_subset(tmp_path):
    from facecompat.config import ConfigError, load_config
    from facecompat.data.loader import build_dataset, build_train_loader
    from facecompat.data.splits import make_split, write_split_lists

    rec = noise_rec(tmp_path / "rec", [4, 3, 5, 2, 4, 6, 3, 5, 4, 4])
    base = [f"data.rec={rec}", "data.batch_size=4", "data.num_workers=0", "data.loader=torch"]
    cfg = load_config(None, base + ["data.protocol=opclass", "data.part=new"])
    records, loader = build_train_loader(cfg.data, rank=0, world_size=1, device="cpu")
    full = FaceRecords(rec)
    split = make_split(full, "opclass", 0.3)
    assert records.record_ids.tolist() == split.new_records.tolist()
    assert records.num_classes == 7 and records.label_map.tolist() == list(range(3, 10))
    labels = torch.cat([b.labels for b in loader])
    assert labels.min() >= 0 and labels.max() < 7 and len(loader) == records.num_images // 4

    write_split_lists(full, make_split(full, "opdata", 0.3), tmp_path / "lists")
    cfg = load_config(None, base + [f"data.subset={tmp_path / 'lists' / 'old.lst'}"])
    assert build_dataset(cfg.data).num_images == len(make_split(full, "opdata", 0.3).old_records)

    with pytest.raises(ConfigError, match="data.rec: not set"):
        build_dataset(load_config(None).data)


@needs_dali
@pytest.mark.parametrize("reader", ["external", "mxnet"])
def test_config_selects_dali_reader(tmp_path, reader):
    from facecompat.config import load_config
    from facecompat.data.dali import DaliLoader
    from facecompat.data.loader import build_train_loader

    rec = noise_rec(tmp_path / "rec", [4, 4, 4])
    cfg = load_config(None, [f"data.rec={rec}", "data.batch_size=4", "data.loader=dali",
                             "data.dali_device=cpu", f"data.dali_reader={reader}"])
    records, loader = build_train_loader(cfg.data, rank=0, world_size=1)
    assert isinstance(loader, DaliLoader) and loader.reader == reader
    ids = torch.cat([b.record_ids for b in loader])
    assert sorted(ids.tolist()) == records.record_ids.tolist()


def test_batch_buffers_are_reused_only_when_released(tmp_path):
    from facecompat.data.loader import TorchLoader

    records = FaceRecords(noise_rec(tmp_path / "rec", [6] * 8))
    loader = TorchLoader(records, 8, rank=0, world_size=1, num_workers=0, device="cpu")
    kept = [b.images for b in loader]  # all held: each batch must own its memory
    assert len({t.data_ptr() for t in kept}) == len(kept)
    again = [b.images.clone() for b in loader]
    for held, fresh in zip(kept, again):
        assert torch.equal(held, fresh)  # nothing overwrote a batch still referenced
    del kept
    ptrs = [b.images.data_ptr() for b in loader]  # each batch dropped before the next
    assert len(set(ptrs)) < len(ptrs)


@pytest.mark.timeout(90)
def test_workers_do_not_hang_after_parallel_opencv_in_the_parent(tmp_path):
    """OpenCV's thread pool, once started in the parent, hangs forked workers' cv2 calls."""
    from facecompat.data.loader import TorchLoader

    cv2.setNumThreads(2)
    cv2.LUT(np.zeros((4096, 4096), np.uint8), np.arange(256, dtype=np.float32))  # starts the pool
    records = FaceRecords(noise_rec(tmp_path / "rec", [6] * 6))
    loader = TorchLoader(records, 4, rank=0, world_size=1, num_workers=2, device="cpu")
    assert sum(len(b.labels) for b in loader) == len(loader) * 4


@pytest.mark.parametrize("num_workers", [0, 2])  # 2: the layout survives the trip between processes
@pytest.mark.parametrize("augment", [None, AugmentConfig()], ids=["plain", "views"])
def test_channels_last_torch_batches_equal_the_default_layout(rec_dir, num_workers, augment):
    view = FaceRecords(rec_dir, seed=3)
    batches = {}
    for channels_last in (False, True):
        loader = TorchLoader(view, 4, rank=0, world_size=1, num_workers=num_workers, device="cpu",
                             augment=augment, channels_last=channels_last)
        loader.set_epoch(1)
        batches[channels_last] = collect(loader)
    assert len(batches[True]) == len(batches[False]) == 9
    for plain, nhwc in zip(batches[False], batches[True], strict=True):
        assert plain.images.is_contiguous() and not is_channels_last(plain.images)
        assert is_channels_last(nhwc.images) and nhwc.images.shape == plain.images.shape
        assert torch.equal(nhwc.images, plain.images)
        assert torch.equal(nhwc.record_ids, plain.record_ids) and torch.equal(nhwc.flipped, plain.flipped)


def test_normalize_images_keeps_the_memory_format():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    plain = normalize_images(images)
    assert plain.dtype == torch.float32 and plain.is_contiguous()
    assert torch.equal(plain, (images.float() - 127.5) * np.float32(1 / 127.5))
    nhwc = normalize_images(images.contiguous(memory_format=torch.channels_last))
    assert is_channels_last(nhwc) and torch.equal(nhwc, plain)
    strided = normalize_images(images[:, :, ::2])  # neither layout: normalised all the same
    assert torch.equal(strided, plain[:, :, ::2])


def test_build_train_loader_passes_channels_last(tmp_path):
    from facecompat.config import load_config
    from facecompat.data.loader import build_train_loader

    rec = noise_rec(tmp_path / "rec", [4, 4, 4])
    cfg = load_config(None, [f"data.rec={rec}", "data.batch_size=4", "data.num_workers=0",
                             "data.loader=torch"])
    for channels_last in (False, True):
        _, loader = build_train_loader(cfg.data, rank=0, world_size=1, device="cpu",
                                       channels_last=channels_last)
        assert loader.channels_last is channels_last
        assert all(is_channels_last(b.images) is channels_last for b in loader)


@needs_dali
def test_dali_device_cpu_decodes_on_the_cpu_for_the_training_gpu(tmp_path, monkeypatch):
    """data.dali_device names where DALI decodes; batches still go to the training device.

    Only constructed: this machine has no GPU, so torch is told there is one (nothing here touches
    CUDA before the first batch); the gpu-marked test in data/test_dali.py iterates it on a real GPU."""
    from facecompat.config import load_config
    from facecompat.data.dali import DaliLoader
    from facecompat.data.loader import build_train_loader

    rec = noise_rec(tmp_path / "rec", [4, 4, 4])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    base = [f"data.rec={rec}", "data.batch_size=4", "data.loader=dali"]
    for dali_device, decode in (("cpu", "cpu"), ("gpu", "gpu"), ("auto", "gpu")):
        cfg = load_config(None, base + [f"data.dali_device={dali_device}"])
        _, loader = build_train_loader(cfg.data, rank=0, world_size=1, device=torch.device("cuda", 0))
        assert isinstance(loader, DaliLoader)
        assert loader.device == torch.device("cuda", 0) and loader.decode_device == decode


@needs_dali
def test_dali_gpu_decode_needs_a_gpu_target(tmp_path):
    from facecompat.config import ConfigError, load_config
    from facecompat.data.dali import DaliLoader
    from facecompat.data.loader import build_train_loader

    rec = noise_rec(tmp_path / "rec", [4, 4, 4])
    base = [f"data.rec={rec}", "data.batch_size=4", "data.dali_device=gpu"]
    with pytest.raises(ConfigError, match=r"^data.dali_device: 'gpu' decodes on the training GPU, "
                                          r"but training runs on cpu"):
        build_train_loader(load_config(None, base + ["data.loader=dali"]).data, device="cpu")
    # with loader auto the CPU gets the torch loader: where DALI would decode does not matter
    _, loader = build_train_loader(load_config(None, base + ["data.loader=auto"]).data, device="cpu")
    assert isinstance(loader, TorchLoader)
    records = FaceRecords(rec)
    with pytest.raises(ValueError, match="decode_device 'gpu' decodes on the target GPU"):
        DaliLoader(records, 4, rank=0, world_size=1, device="cpu", decode_device="gpu")
    with pytest.raises(ValueError, match="decode_device must be one of"):
        DaliLoader(records, 4, rank=0, world_size=1, device="cpu", decode_device="mixed")
    assert DaliLoader(records, 4, rank=0, world_size=1, device="cpu").decode_device == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_loader_batches_on_the_gpu_without_host_syncs(rec_dir, num_workers):
    """Every field (and a batch_inputs extra) arrives on the GPU, channels_last when asked,
    equal to the CPU loader's batch; no copy or normalisation makes the host wait for the GPU
    (torch's sync debug mode raises on a synchronising call)."""
    view = FaceRecords(rec_dir, seed=4)
    cpu = collect(TorchLoader(view, 4, rank=1, world_size=2, num_workers=0, device="cpu"))
    for channels_last in (False, True):
        gpu = TorchLoader(view, 4, rank=1, world_size=2, num_workers=num_workers, device="cuda",
                          channels_last=channels_last)
        gpu.batch_inputs = lambda ids, flips, labels: {"twice": torch.from_numpy(ids * 2)}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            batches = collect(gpu)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(batches) == len(cpu) == 4
        for a, b in zip(batches, cpu, strict=True):
            fields = (a.images, a.labels, a.record_ids, a.flipped, a.inputs["twice"])
            assert all(t.device == gpu.device for t in fields)
            assert is_channels_last(a.images) is channels_last and a.images.dtype == torch.float32
            torch.testing.assert_close(a.images.cpu(), b.images, atol=1e-6, rtol=0)
            assert torch.equal(a.record_ids.cpu(), b.record_ids) and torch.equal(a.labels.cpu(), b.labels)
            assert torch.equal(a.flipped.cpu(), b.flipped)
            assert torch.equal(a.inputs["twice"].cpu(), b.record_ids * 2)
