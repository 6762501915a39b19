"""Face datasets over RecordIO: layouts, the sample contract, flips, subsets, bad data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facecompat.data.faces import FaceRecords, FaceRecWriter, flip_flags, summarize_rec
from facecompat.data.recordio import RecordIOError, RecordReader, RecordWriter, pack
from tests.helpers import SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES / "recordio"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def _jpeg(color, size=112) -> bytes:
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = color
    img[:, size // 2:] = np.array(color) // 2
    return cv2.imencode(".png", img)[1].tobytes()


def make_rec(out: Path, class_sizes: list[int]) -> Path:
    rng = np.random.default_rng(0)
    with FaceRecWriter(out) as w:
        for label, n in enumerate(class_sizes):
            for _ in range(n):
                w.add(label, _jpeg(rng.integers(0, 255, 3).tolist()))
    return out


def test_fixture_layout_is_derived():
    ds = FaceRecords(FIXTURES / "train.rec")
    assert ds.layout == "insightface"
    meta = MANIFEST["train"]
    assert (ds.num_classes, ds.num_images) == (meta["num_classes"], meta["num_images"])
    identity = [r for r in MANIFEST["train"]["records"] if r["kind"] == "identity"]
    assert ds.class_ranges.tolist() == [r["label"] for r in identity]
    images = [r for r in MANIFEST["train"]["records"] if r["kind"] == "image"]
    assert ds.record_ids.tolist() == [r["key"] for r in images]
    assert ds.labels.tolist() == [int(r["label"]) for r in images]


def test_sample_contract_is_rgb_chw_in_unit_range():
    ds = FaceRecords(FIXTURES / "train.rec", flip=False)
    images = [r for r in MANIFEST["train"]["records"] if r["kind"] == "image"]
    for i, entry in enumerate(images):
        img, label, record_id, flipped = ds[i]
        assert img.dtype == torch.float32 and img.shape == (3, 112, 112)
        assert img.min() >= -1.0 and img.max() <= 1.0
        assert (label, record_id, flipped) == (int(entry["label"]), entry["key"], False)
        left = img[:, :, 4:50].mean(dim=(1, 2)).numpy() * 127.5 + 127.5
        # channel 0 is red: the manifest's BGR means reversed
        np.testing.assert_allclose(left, entry["bgr_mean_left_half"][::-1], atol=2.5)


def test_flip_is_seeded_and_mirrors_the_image():
    ds = FaceRecords(FIXTURES / "train.rec", seed=3)
    flags = flip_flags(np.arange(10_000), seed=3, epoch=0)
    assert 0.47 < flags.mean() < 0.53
    assert not np.array_equal(flags, flip_flags(np.arange(10_000), seed=3, epoch=1))
    assert not np.array_equal(flags, flip_flags(np.arange(10_000), seed=4, epoch=0))
    np.testing.assert_array_equal(ds.flips(), flip_flags(ds.record_ids, 3, 0))
    plain = FaceRecords(FIXTURES / "train.rec", flip=False)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(ds.num_images):
            img, _, rid, flipped = ds[i]
            assert flipped == bool(flip_flags(rid, 3, epoch))
            ref = plain[i][0]
            assert torch.equal(img, ref.flip(-1) if flipped else ref)


def test_subsets_by_class_and_record(tmp_path):
    ds = FaceRecords(make_rec(tmp_path, [3, 1, 4, 2]))
    view = ds.subset(classes=[3, 1])
    assert view.num_classes == 4 and sorted(set(view.labels.tolist())) == [1, 3]
    relabelled = ds.subset(classes=[3, 1], relabel=True)
    assert relabelled.num_classes == 2 and relabelled.label_map.tolist() == [1, 3]
    assert relabelled.labels.tolist() == [0, 1, 1]
    assert [relabelled[i][1] for i in range(3)] == [0, 1, 1]
    picked = ds.subset(records=[2, 9, 5])
    assert picked.record_ids.tolist() == [2, 5, 9] and picked.labels.tolist() == [0, 2, 3]
    nested = relabelled.subset(classes=[1], relabel=True)  # class 1 of the view = class 3 of the set
    assert nested.label_map.tolist() == [3] and nested.record_ids.tolist() == [9, 10]
    with pytest.raises(ValueError, match="class 7 outside"):
        ds.subset(classes=[7])
    with pytest.raises(RecordIOError, match="key 11: record id is not an image"):
        ds.subset(records=[1, 11])


def test_headerless_im2rec_layout(tmp_path):
    with RecordWriter(tmp_path / "plain.rec", tmp_path / "plain.idx") as w:
        for key, label in enumerate([2, 0, 2, 1]):
            w.write(key, pack(float(label), _jpeg([key * 40, 0, 0]), id=key))
    ds = FaceRecords(tmp_path / "plain.rec")
    assert ds.layout == "im2rec" and ds.num_classes == 3 and ds.labels.tolist() == [2, 0, 2, 1]
    assert ds.record_ids.tolist() == [0, 1, 2, 3] and ds.class_ranges is None
    with RecordWriter(tmp_path / "arr.rec", tmp_path / "arr.idx") as w:
        w.write(0, pack([4.0, 7.0], _jpeg([1, 2, 3])))  # label array: first value is the class
    assert FaceRecords(tmp_path / "arr.rec").labels.tolist() == [4]


def test_writer_reproduces_mxnet_bytes(tmp_path):
    src = FaceRecords(FIXTURES / "train.rec")
    with FaceRecWriter(tmp_path) as w:
        for rid, label in zip(src.record_ids.tolist(), src.labels.tolist()):
            w.add(label, src.reader.read(rid).payload)
    assert (tmp_path / "train.rec").read_bytes() == (FIXTURES / "train.rec").read_bytes()
    assert (tmp_path / "train.idx").read_text() == (FIXTURES / "train.idx").read_text()
    assert (tmp_path / "property").read_text() == "3,112,112"


def test_writer_rejects_gaps_and_cleans_up(tmp_path):
    with pytest.raises(ValueError, match="label 2 after class 0"), FaceRecWriter(tmp_path) as w:
        w.add(0, b"x")
        w.add(2, b"y")
    assert list(tmp_path.iterdir()) == []


def test_property_must_agree(tmp_path):
    make_rec(tmp_path, [1, 2])
    (tmp_path / "property").write_text("5,112,112")
    with pytest.raises(RecordIOError, match=r"property: says 5 classes but .* holds 2"):
        FaceRecords(tmp_path)


def test_label_disagreeing_with_identity_record(tmp_path):
    shutil.copy(FIXTURES / "train.idx", tmp_path / "train.idx")
    reader = RecordReader(FIXTURES / "train.rec")
    with RecordWriter(tmp_path / "train.rec") as w:
        for key in reader.keys:
            rec = reader.read(key)
            w.write(key, pack(2.0, rec.payload, rec.id) if key == 2 else rec)
    ds = FaceRecords(tmp_path / "train.rec")
    with pytest.raises(RecordIOError, match=r"key 2, offset 928: image label 2 disagrees"):
        ds[1]
    with pytest.raises(RecordIOError, match="key 2"):
        summarize_rec(tmp_path / "train.rec")


def test_broken_identity_ranges(tmp_path):
    reader = RecordReader(FIXTURES / "train.rec")
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key in reader.keys:
            rec = reader.read(key)
            w.write(key, pack([4.0, 7.0], b"") if key == 11 else rec)
    with pytest.raises(RecordIOError, match="key 10: identity ranges do not tile"):
        FaceRecords(tmp_path)


def test_dataloader_workers_read_after_fork(tmp_path):
    ds = FaceRecords(make_rec(tmp_path, [5, 5, 6]), seed=1)
    ds[0]  # open the file in the parent first: workers must not reuse its descriptor
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         multiprocessing_context="fork")
    ids = torch.cat([batch[2] for batch in loader])
    assert sorted(ids.tolist()) == ds.record_ids.tolist()


def test_summary_counts(tmp_path):
    make_rec(tmp_path, [3, 1, 4])
    s = summarize_rec(tmp_path, decode=True)
    assert (s["layout"], s["images"], s["classes"], s["records"]) == ("insightface", 8, 3, 1 + 8 + 3)
    assert (s["images_per_class_min"], s["images_per_class_max"]) == (1, 4)
