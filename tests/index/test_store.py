"""facecompat.index.store: the versioned feature store format, its validation and the compatibility rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facecompat.index import store as store_mod
from facecompat.index.store import (
    FeatureStore,
    IncompatibleError,
    StoreError,
    check_comparable,
    model_version,
    transform_version,
)

OLD = model_version({"checkpoint_sha1": "a" * 40, "network": "r18", "embedding_size": 8})
NEW = model_version({"checkpoint_sha1": "b" * 40, "network": "r50", "embedding_size": 8})
FCT = transform_version({"sha1": "c" * 40, "hidden": 64}, from_id=OLD["id"], to_id=NEW["id"], side_id=None)


def _expect(exc: type[Exception], match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(exc, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def _make(tmp_path: Path, num: int = 50, name: str = "store", **kwargs) -> tuple[FeatureStore, np.ndarray]:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((num, 8)).astype(np.float32)
    ids = np.arange(num, dtype=np.int64) * 10 + 3
    versions = np.r_[np.zeros(num - num // 5, np.int64), np.ones(num // 5, np.int64)]
    return FeatureStore.create(tmp_path / name, feats, ids, versions, [OLD, FCT], **kwargs), feats


def test_version_ids() -> None:
    assert OLD["id"] == "r18-aaaaaaaaaaaa" and OLD["kind"] == "model" and OLD["model"]["embedding_size"] == 8
    want = {"id": "fct-cccccccccccc", "kind": "transform", "from": OLD["id"], "side": None,
            "to": NEW["id"], "transform": {"sha1": "c" * 40, "hidden": 64}}
    assert want == FCT
    assert store_mod.version_space(OLD) == OLD["id"] and store_mod.version_space(FCT) == NEW["id"]
    _expect(StoreError, "checkpoint_sha1", model_version, {"network": "r18"})
    _expect(StoreError, "no 'sha1' or 'weights_sha1'", transform_version, {"hidden": 3}, "a", "b")
    assert transform_version({"weights_sha1": "e" * 40}, "a", "b")["id"] == "fct-eeeeeeeeeeee"


def test_create_open_roundtrip(tmp_path: Path) -> None:
    store, feats = _make(tmp_path, meta={"items": "IJBC faces"}, chunk_rows=7)  # several chunks
    for name in ("features.npy", "ids.npy", "versions.npy", "store.json"):
        assert (store.path / name).is_file()
    assert not list(store.path.glob("*.tmp"))
    opened = FeatureStore.open(store.path)
    assert isinstance(opened.features, np.memmap) and opened.features.dtype == np.float32
    np.testing.assert_array_equal(opened.features, feats)
    assert opened.ids.dtype == np.int64 and opened.version_index.dtype == np.uint8
    assert opened.num_items == 50 and opened.dim == 8 and len(opened) == 50
    assert opened.meta == {"items": "IJBC faces"}
    assert opened.version_counts() == {OLD["id"]: 40, FCT["id"]: 10}
    assert opened.spaces() == {OLD["id"]: 40, NEW["id"]: 10}  # the FCT rows live in the new space
    assert opened.version_of(0) == OLD and opened.version_of(49) == FCT
    assert opened.space_of(0) == OLD["id"] and opened.space_of(49) == NEW["id"]
    assert opened.row_spaces().tolist() == [OLD["id"]] * 40 + [NEW["id"]] * 10
    assert opened.version(FCT["id"]) == FCT
    np.testing.assert_array_equal(opened.rows_of([493, 3, 13]), [49, 0, 1])
    _expect(StoreError, "no item id 4", opened.rows_of, [3, 4])
    doc = json.loads((store.path / "store.json").read_text())
    assert doc["format"] == "facecompat-feature-store" and doc["format_version"] == 1
    assert doc["num_items"] == 50 and doc["dim"] == 8 and doc["versions"] == [OLD, FCT]
    assert doc["counts"] == {OLD["id"]: 40, FCT["id"]: 10}
    # one version id for every row; an empty store
    one = FeatureStore.create(tmp_path / "one", feats, np.arange(50), OLD["id"], [OLD])
    assert one.version_counts() == {OLD["id"]: 50}
    empty = FeatureStore.create(tmp_path / "empty", np.zeros((0, 8)), np.zeros(0, np.int64), OLD["id"], [OLD])
    assert FeatureStore.open(empty.path).num_items == 0 and empty.spaces() == {}


def test_create_rejects_bad_input(tmp_path: Path) -> None:
    feats = np.ones((4, 8), np.float32)
    ids = np.arange(4)
    out = tmp_path / "s"
    _expect(StoreError, "shape", FeatureStore.create, out, np.ones(4), ids, OLD["id"], [OLD])
    _expect(StoreError, "floating", FeatureStore.create, out, np.ones((4, 8), int), ids, OLD["id"], [OLD])
    _expect(StoreError, "appears more than once", FeatureStore.create, out, feats, [1, 2, 2, 3], OLD["id"],
            [OLD])
    _expect(StoreError, "ids must be 4", FeatureStore.create, out, feats, ids[:3], OLD["id"], [OLD])
    _expect(StoreError, "not in the version table", FeatureStore.create, out, feats, ids, NEW["id"], [OLD])
    _expect(StoreError, "row 2 has version index 1, outside the table of 1 versions", FeatureStore.create,
            out, feats, ids, [0, 0, 1, 0], [OLD])
    _expect(StoreError, "meta is not JSON-serialisable", FeatureStore.create, out, feats, ids, OLD["id"],
            [OLD], meta={"when": object()})
    _expect(StoreError, "appears twice", FeatureStore.create, out, feats, ids, OLD["id"], [OLD, OLD])
    wide = model_version({"checkpoint_sha1": "d" * 40, "network": "x", "embedding_size": 512})
    _expect(StoreError, "embedding_size 512", FeatureStore.create, out, feats, ids, wide["id"], [wide])
    _expect(StoreError, "kind 'mystery'", FeatureStore.create, out, feats, ids, "m",
            [{"id": "m", "kind": "mystery"}])
    _expect(StoreError, "needs 'to'", FeatureStore.create, out, feats, ids, FCT["id"],
            [{k: v for k, v in FCT.items() if k != "to"}])
    bad = feats.copy()
    bad[2, 5] = np.nan
    msg = _expect(StoreError, "row 2 has a NaN", FeatureStore.create, out, bad, ids, OLD["id"], [OLD])
    assert "features.npy" in msg
    assert not (out / "store.json").exists()  # a failed write leaves no complete store
    FeatureStore.create(out, feats, ids, OLD["id"], [OLD])
    _expect(StoreError, "overwrite=True", FeatureStore.create, out, feats, ids, OLD["id"], [OLD])
    FeatureStore.create(out, feats * 2, ids, OLD["id"], [OLD], overwrite=True)
    np.testing.assert_array_equal(FeatureStore.open(out).features, feats * 2)


def test_open_rejects_damaged_stores(tmp_path: Path) -> None:
    store, feats = _make(tmp_path)
    path = store.path
    del store
    backup = {p.name: p.read_bytes() for p in path.iterdir()}

    def damaged(file: str, match: str) -> None:
        msg = _expect(StoreError, match, FeatureStore.open, path)
        assert file in msg
        for name, data in backup.items():
            (path / name).write_bytes(data)

    (path / "store.json").unlink()
    damaged(str(path), "incomplete feature store")
    _expect(StoreError, "no such feature store", FeatureStore.open, tmp_path / "nowhere")
    (path / "store.json").write_text("{not json")
    damaged("store.json", "not readable JSON")
    (path / "store.json").write_text(json.dumps({"format": "something-else"}))
    damaged("store.json", "not a feature store")
    doc = json.loads(backup["store.json"])
    (path / "store.json").write_text(json.dumps({**doc, "dim": 9}))
    damaged("store.json", "has embedding_size 8, the features are 9-d")
    (path / "store.json").write_text(json.dumps({**doc, "num_items": 51}))
    damaged("features.npy", r"expected float32 \(51, 8\)")
    (path / "store.json").write_text(json.dumps({**doc, "counts": {OLD["id"]: 50}}))
    damaged("versions.npy", "differ from store.json")
    np.save(path / "features.npy", feats.astype(np.float64))
    damaged("features.npy", "expected float32")
    nan = feats.copy()
    nan[17, 0] = np.inf
    np.save(path / "features.npy", nan)
    damaged("features.npy", "row 17 has a NaN or infinite value")
    (path / "ids.npy").unlink()
    damaged("ids.npy", "missing")
    np.save(path / "ids.npy", np.zeros(50, np.int64))
    damaged("ids.npy", "appears more than once")
    np.save(path / "versions.npy", np.full(50, 2, np.uint8))
    damaged("versions.npy", "outside the table of 2 versions")
    np.save(path / "versions.npy", np.zeros(50, np.int32))
    damaged("versions.npy", "expected uint8 or int16")
    (path / "features.npy").write_bytes(b"garbage")
    damaged("features.npy", "not a readable .npy")
    assert FeatureStore.open(path).num_items == 50


def test_replace_new_directory_and_in_place(tmp_path: Path) -> None:
    store, feats = _make(tmp_path, chunk_rows=8)
    rows = np.array([41, 2, 7])
    new_feats = np.full((3, 8), 5.0, np.float32)
    moved = store.replace(rows, new_feats, NEW, tmp_path / "moved", chunk_rows=8)
    want = feats.copy()
    want[rows] = 5.0
    np.testing.assert_array_equal(moved.features, want)
    np.testing.assert_array_equal(store.features, feats)  # the source is untouched
    assert moved.versions == [OLD, FCT, NEW]
    assert moved.version_counts() == {OLD["id"]: 38, FCT["id"]: 9, NEW["id"]: 3}
    assert moved.version_of(41) == NEW and moved.space_of(2) == NEW["id"]
    np.testing.assert_array_equal(moved.ids, store.ids)
    # in place (path None): the new store is on disk, the old object keeps reading its old arrays
    again = moved.replace([2], np.ones((1, 8)), OLD["id"])  # row 2 back to the old model
    assert again.path == moved.path and again.version_counts()[OLD["id"]] == 39
    np.testing.assert_array_equal(FeatureStore.open(moved.path).features[2], np.ones(8))
    np.testing.assert_array_equal(moved.features[2], np.full(8, 5.0))
    # another complete store is never overwritten by a replace
    _expect(StoreError, "overwrite", store.replace, [0], np.ones((1, 8)), OLD["id"], moved.path)
    _expect(StoreError, "not in the table", store.replace, [0], np.ones((1, 8)), NEW["id"])
    _expect(StoreError, "different definition", store.replace, [0], np.ones((1, 8)), {**OLD, "model": {}})
    _expect(StoreError, "outside", store.replace, [50], np.ones((1, 8)), OLD["id"])
    _expect(StoreError, "repeat", store.replace, [1, 1], np.ones((2, 8)), OLD["id"])
    _expect(StoreError, r"\[2, 8\]", store.replace, [1, 3], np.ones((1, 8)), OLD["id"])
    _expect(StoreError, "row 3 have a NaN", store.replace, [3], np.full((1, 8), np.nan), OLD["id"])


def test_replace_widens_version_dtype_and_crash_leaves_incomplete(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    table = [model_version({"checkpoint_sha1": f"{i:012x}" + "0" * 28, "network": "r18"}) for i in range(256)]
    store = FeatureStore.create(tmp_path / "s", np.ones((6, 4)), np.arange(6), table[0]["id"], table)
    assert store.version_index.dtype == np.uint8
    wide = store.replace([5], np.zeros((1, 4)) + 2, NEW | {"model": {"network": "r50"}}, tmp_path / "w")
    assert wide.version_index.dtype == np.int16 and wide.version_of(5)["id"] == NEW["id"]

    def fail(path: Path, array: np.ndarray) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_save_array", fail)
    with pytest.raises(OSError, match="disk full"):
        wide.replace([0], np.zeros((1, 4)) + 3, NEW["id"])
    _expect(StoreError, "incomplete feature store", FeatureStore.open, wide.path)


def test_check_comparable(tmp_path: Path) -> None:
    store, _ = _make(tmp_path)  # 40 rows of OLD, 10 rows of FCT (space NEW)
    msg = _expect(IncompatibleError, "query version 'r50-bbbbbbbbbbbb'", check_comparable, NEW["id"], store)
    assert "40 rows of version 'r18-aaaaaaaaaaaa'" in msg and "fct" not in msg
    check_comparable(NEW, store, declared={(NEW["id"], OLD["id"])})  # e.g. a BCT-trained new model
    msg = _expect(IncompatibleError, "10 rows of version 'fct-cccccccccccc' \\(space 'r50-bbbbbbbbbbbb'\\)",
                  check_comparable, OLD["id"], store)
    assert "40 rows" not in msg
    # declared pairs are ordered (query space, gallery space)
    _expect(IncompatibleError, "40 rows", check_comparable, NEW["id"], store,
            declared={(OLD["id"], NEW["id"])})
    fully = store.replace(np.arange(40), np.ones((40, 8)), NEW, tmp_path / "full")
    check_comparable(NEW["id"], fully)  # every row is now in the new space (model or transform)
