"""Protocol splits: disjointness, coverage, ratios, determinism, list and rec storage
(tools/split_dataset.py: tests/tools/test_split_dataset.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facecompat.data.faces import FaceRecords
from facecompat.data.recordio import RecordIOError
from facecompat.data.splits import (
    PARTS,
    dataset_fingerprint,
    list_protocols,
    load_record_list,
    load_record_map,
    load_view,
    make_split,
    split_records,
    write_split_lists,
    write_split_recs,
)
from tests.helpers import SHARED_FIXTURES
from tests.helpers.data import SPLIT_CLASS_SIZES, payload_rec

FIXTURE = SHARED_FIXTURES / "recordio" / "train.rec"
PINNED_OPDATA_OLD = [1, 4, 8]  # fixture, opdata, ratio 0.3, seed 0
CLASS_SIZES = SPLIT_CLASS_SIZES  # 12 identities, 63 images


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    return payload_rec(tmp_path_factory.mktemp("src"), CLASS_SIZES)


@pytest.fixture(scope="module")
def dataset(rec_dir) -> FaceRecords:
    return FaceRecords(rec_dir, flip=False)


def _classes_of(dataset: FaceRecords, ids: np.ndarray) -> np.ndarray:
    return np.unique(dataset.labels[np.isin(dataset.record_ids, ids)])


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


# -- protocol semantics ----------------------------------------------------------------------

def test_registry_and_unknown_protocol(dataset):
    assert list_protocols() == ["exclass", "exdata", "opclass", "opdata"]
    with pytest.raises(ValueError, match="valid: exclass, exdata, opclass, opdata"):
        make_split(dataset, "openclass")
    assert make_split(dataset, "OPclass").protocol == "opclass"


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_open_interval_rejected(dataset, ratio):
    with pytest.raises(ValueError, match="ratio"):
        make_split(dataset, "opdata", ratio=ratio)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_opclass_disjoint_identities_full_coverage(dataset, ratio):
    split = make_split(dataset, "opclass", ratio=ratio)
    old_classes = _classes_of(dataset, split.old_records)
    new_classes = _classes_of(dataset, split.new_records)
    num_old = _round_half_up(ratio * len(CLASS_SIZES))
    np.testing.assert_array_equal(old_classes, np.arange(num_old))  # the first identities
    np.testing.assert_array_equal(new_classes, np.arange(num_old, len(CLASS_SIZES)))
    assert np.intersect1d(split.old_records, split.new_records).size == 0
    np.testing.assert_array_equal(np.union1d(split.old_records, split.new_records), dataset.record_ids)
    assert split.summary(dataset)["shared_classes"] == 0


def test_opclass_views_relabel(dataset):
    split = make_split(dataset, "opclass", ratio=0.3)
    old, new = split.view(dataset, "old"), split.view(dataset, "new")
    num_old = _round_half_up(0.3 * len(CLASS_SIZES))
    assert old.num_classes == num_old and new.num_classes == len(CLASS_SIZES) - num_old
    # Old labels are the original ones (the first classes), the head has only those classes.
    np.testing.assert_array_equal(old.labels, dataset.labels[np.isin(dataset.record_ids, old.record_ids)])
    np.testing.assert_array_equal(np.unique(new.labels), np.arange(new.num_classes))
    original = dataset.labels[np.isin(dataset.record_ids, new.record_ids)]
    np.testing.assert_array_equal(new.label_map[new.labels], original)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_opdata_disjoint_images_shared_identities(dataset, ratio):
    split = make_split(dataset, "opdata", ratio=ratio, seed=3)
    assert np.intersect1d(split.old_records, split.new_records).size == 0
    np.testing.assert_array_equal(np.union1d(split.old_records, split.new_records), dataset.record_ids)
    np.testing.assert_array_equal(_classes_of(dataset, split.old_records), np.arange(len(CLASS_SIZES)))
    np.testing.assert_array_equal(_classes_of(dataset, split.new_records), np.arange(len(CLASS_SIZES)))
    old_labels = dataset.labels[np.isin(dataset.record_ids, split.old_records)]
    per_class = np.bincount(old_labels, minlength=len(CLASS_SIZES))
    expected = [min(max(_round_half_up(ratio * n), 1), n - 1) for n in CLASS_SIZES]
    np.testing.assert_array_equal(per_class, expected)
    for part in PARTS:  # labels unchanged, head keeps every class
        view = split.view(dataset, part)
        assert view.num_classes == len(CLASS_SIZES) and view.label_map is None


@pytest.mark.parametrize("protocol, like", [("exclass", "opclass"), ("exdata", "opdata")])
def test_extended_protocols_new_is_full_set(dataset, protocol, like):
    split, op = make_split(dataset, protocol, seed=5), make_split(dataset, like, seed=5)
    np.testing.assert_array_equal(split.old_records, op.old_records)
    np.testing.assert_array_equal(split.new_records, dataset.record_ids)
    new = split.view(dataset, "new")
    assert new.num_classes == len(CLASS_SIZES)
    np.testing.assert_array_equal(new.labels, dataset.labels)


def test_deterministic_and_seeded(dataset):
    a, b = make_split(dataset, "opdata", seed=0), make_split(dataset, "opdata", seed=0)
    np.testing.assert_array_equal(a.old_records, b.old_records)
    c = make_split(dataset, "opdata", seed=1)
    assert not np.array_equal(a.old_records, c.old_records)
    assert a.num_images == c.num_images  # same per-class counts, other images


def test_selection_does_not_depend_on_input_order(dataset):
    perm = np.random.default_rng(0).permutation(dataset.num_images)
    a = split_records(dataset.record_ids, dataset.labels, "opdata", seed=7)
    b = split_records(dataset.record_ids[perm], dataset.labels[perm], "opdata", seed=7)
    np.testing.assert_array_equal(a.old_records, b.old_records)
    np.testing.assert_array_equal(a.new_records, b.new_records)


def test_pinned_selection_on_fixture():
    # Pinned values: a change here means every existing split on disk changes meaning.
    fixture = FaceRecords(FIXTURE, flip=False)
    assert fixture.num_classes == 3 and fixture.num_images == 9
    opclass = make_split(fixture, "opclass")
    np.testing.assert_array_equal(_classes_of(fixture, opclass.old_records), [0])
    opdata = make_split(fixture, "opdata", seed=0)
    assert np.bincount(fixture.labels[np.isin(fixture.record_ids, opdata.old_records)]).tolist() == [1, 1, 1]
    assert opdata.old_records.tolist() == PINNED_OPDATA_OLD


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=2, max_size=25),
       ratio=st.floats(0.05, 0.95), seed=st.integers(0, 2**32), shuffle_seed=st.integers(0, 1000))
def test_property_random_class_sizes(sizes, ratio, seed, shuffle_seed):
    rng = np.random.default_rng(shuffle_seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    ids = rng.choice(10 * labels.size + 10, size=labels.size, replace=False).astype(np.int64)
    perm = rng.permutation(labels.size)
    ids, labels = ids[perm], labels[perm]
    by_id = dict(zip(ids.tolist(), labels.tolist()))

    opdata = split_records(ids, labels, "opdata", ratio, seed)
    # only one-image identities are shared (they cannot be split by images: both parts get them)
    singles = np.sort(ids[np.isin(labels, np.flatnonzero(np.asarray(sizes) == 1))])
    np.testing.assert_array_equal(np.intersect1d(opdata.old_records, opdata.new_records), singles)
    np.testing.assert_array_equal(np.union1d(opdata.old_records, opdata.new_records), np.sort(ids))
    assert {by_id[i] for i in opdata.new_records.tolist()} == set(range(len(sizes)))
    old_counts = np.bincount([by_id[i] for i in opdata.old_records.tolist()], minlength=len(sizes))
    sizes_arr = np.asarray(sizes)
    assert (old_counts >= 1).all()
    assert (old_counts[sizes_arr >= 2] <= sizes_arr[sizes_arr >= 2] - 1).all()

    opclass = split_records(ids, labels, "opclass", ratio, seed)
    old_classes = {by_id[i] for i in opclass.old_records.tolist()}
    new_classes = {by_id[i] for i in opclass.new_records.tolist()}
    assert not old_classes & new_classes and old_classes | new_classes == set(range(len(sizes)))
    expected = min(max(_round_half_up(ratio * len(sizes)), 1), len(sizes) - 1)
    assert old_classes == set(range(expected))


# -- record-id lists -------------------------------------------------------------------------

def test_lists_round_trip_and_identical_reruns(dataset, tmp_path):
    split = make_split(dataset, "opclass")
    summary = write_split_lists(dataset, split, tmp_path / "a")
    write_split_lists(dataset, make_split(dataset, "opclass"), tmp_path / "b")
    for name in ("old.lst", "new.lst", "split.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "split.json").read_text()) == summary
    assert summary["parts"]["new"] == {"images": split.num_images["new"], "classes": 8, "relabel": True,
                                       "file": "new.lst"}
    for part in PARTS:
        ids, meta = load_record_list(tmp_path / "a" / f"{part}.lst")
        np.testing.assert_array_equal(ids, split.records(part))
        assert meta["part"] == part and meta["protocol"] == "opclass" and meta["relabel"] is True
        view, expected = load_view(dataset.path, tmp_path / "a" / f"{part}.lst"), split.view(dataset, part)
        np.testing.assert_array_equal(view.record_ids, expected.record_ids)
        np.testing.assert_array_equal(view.labels, expected.labels)
        np.testing.assert_array_equal(view.label_map, expected.label_map)
        assert view.num_classes == expected.num_classes


def test_load_view_rejects_list_of_another_dataset(dataset, tmp_path):
    write_split_lists(dataset, make_split(dataset, "opdata"), tmp_path / "lists")
    other_size = FaceRecords(payload_rec(tmp_path / "small", [2, 3]), flip=False)
    with pytest.raises(RecordIOError, match=r"old\.lst.*63 images"):
        load_view(other_size, tmp_path / "lists" / "old.lst")
    # Same number of images, other class sizes: caught by the fingerprint.
    same_size = FaceRecords(payload_rec(tmp_path / "same", CLASS_SIZES[::-1]), flip=False)
    assert dataset_fingerprint(same_size) != dataset_fingerprint(dataset)
    with pytest.raises(RecordIOError, match=r"new\.lst.*fingerprint"):
        load_view(same_size, tmp_path / "lists" / "new.lst")


def test_load_view_rejects_unknown_id_and_bad_lines(dataset, tmp_path):
    plain = tmp_path / "plain.lst"
    plain.write_text("# hand-made list\n1\n2\n9999\n")
    with pytest.raises(RecordIOError, match=r"plain\.lst: key 9999"):
        load_view(dataset, plain)
    bad = tmp_path / "bad.lst"
    bad.write_text("1\nseven\n")
    with pytest.raises(RecordIOError, match=r"bad\.lst.*line 2"):
        load_record_list(bad)
    dup = tmp_path / "dup.lst"
    dup.write_text("1\n2\n1\n")
    with pytest.raises(RecordIOError, match="twice"):
        load_record_list(dup)
    write_split_lists(dataset, make_split(dataset, "opdata"), tmp_path / "lists")
    cut = tmp_path / "lists" / "old.lst"
    cut.write_text("".join(cut.read_text().splitlines(keepends=True)[:-2]))
    with pytest.raises(RecordIOError, match="truncated"):
        load_record_list(cut)


# -- rec sets --------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["opclass", "opdata", "exclass"])
def test_rec_sets_read_back_with_original_payloads(dataset, tmp_path, protocol):
    split = make_split(dataset, protocol, seed=2)
    summary = write_split_recs(dataset, split, tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "a" / "split.json").read_text()) == summary
    for part in PARTS:
        written = FaceRecords(tmp_path / "a" / part, flip=False)
        record_map, label_map = load_record_map(tmp_path / "a" / part)
        view = split.view(dataset, part)
        assert written.num_images == view.num_images == summary["parts"][part]["images"]
        assert written.num_classes == label_map.size == summary["parts"][part]["classes"]
        np.testing.assert_array_equal(record_map[:, 0], written.record_ids)
        np.testing.assert_array_equal(np.sort(record_map[:, 1]), split.records(part))
        source_labels = dataset.labels[np.searchsorted(dataset.record_ids, record_map[:, 1])]
        np.testing.assert_array_equal(label_map[written.labels], source_labels)
        for new_id, source_id in record_map.tolist():
            assert written.reader.read(new_id).payload == dataset.reader.read(source_id).payload
    if protocol == "opclass":  # new part renumbered 0..k-1 like the view
        new_view = split.view(dataset, "new")
        assert summary["parts"]["new"]["written_classes_renumbered"] is True
        np.testing.assert_array_equal(load_record_map(tmp_path / "a" / "new")[1], new_view.label_map)
    # A second run writes identical bytes.
    write_split_recs(dataset, make_split(dataset, protocol, seed=2), tmp_path / "b", progress=False)
    for part in PARTS:
        for name in ("train.rec", "train.idx", "property", "record_map.npy", "label_map.npy"):
            assert (tmp_path / "a" / part / name).read_bytes() == (tmp_path / "b" / part / name).read_bytes()


def test_rec_sets_one_image_identity_in_both_parts(tmp_path):
    dataset = FaceRecords(payload_rec(tmp_path / "src", [3, 1, 4]), flip=False)
    split = make_split(dataset, "opdata")
    summary = split.summary(dataset)
    assert summary["parts"]["new"]["classes"] == 3 and summary["parts"]["old"]["classes"] == 3
    assert summary["shared_images"] == 1 and summary["shared_classes"] == 3  # class 1's one image
    summary = write_split_recs(dataset, split, tmp_path / "out", progress=False)
    assert summary["parts"]["new"]["written_classes_renumbered"] is False
    for part in PARTS:
        assert load_record_map(tmp_path / "out" / part)[1].tolist() == [0, 1, 2]
        assert FaceRecords(tmp_path / "out" / part).num_classes == 3


def test_rec_sets_renumber_a_class_without_images(tmp_path, dataset):
    """A view that drops a whole identity keeps its id as a gap; a written part renumbers it away."""
    view = dataset.subset(records=dataset.record_ids[dataset.labels != 1])
    split = make_split(view, "opdata")
    assert split.view(view, "new").num_classes == len(CLASS_SIZES)  # the gap stays a class id
    summary = write_split_recs(view, split, tmp_path / "out", progress=False)
    assert summary["parts"]["new"]["written_classes_renumbered"] is True
    want = [c for c in range(len(CLASS_SIZES)) if c != 1]
    assert load_record_map(tmp_path / "out" / "new")[1].tolist() == want
