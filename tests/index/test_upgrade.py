"""facecompat.index.upgrade: model stores, FCT over a store (equal to FCTransform.apply,
side-information by id, version rules, partial backfill, atomic output). The gallery tools that run it
(extract_gallery, transform_gallery, search_gallery): tests/tools."""

from __future__ import annotations

import numpy as np
import pytest

from facecompat.compat.fct import FCTransform
from facecompat.index import upgrade
from facecompat.index.store import FeatureStore, IncompatibleError, StoreError, model_version
from facecompat.index.upgrade import (
    backfill_store,
    read_uncertainty,
    store_model_features,
    transform_store,
)
from tests.helpers.errors import raises_one_line
from tests.helpers.gallery import NEW_DIM, OLD_DIM, SIDE_DIM, gallery_stores, make_gallery_models
from tests.helpers.models import single_thread

pytest.importorskip("faiss")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Three random-weight run directories, two transformations (with and without side-information)
    that name them, their fingerprints."""
    return make_gallery_models(tmp_path_factory.mktemp("gallery_models"))


# ------------------------------------------------------------------------------------------- library
def test_store_model_features_tags_every_row(tmp_path, models):
    fp = models["fp"]["old"]
    store = store_model_features(tmp_path / "s", np.ones((5, OLD_DIM)), np.arange(5) * 2, fp, meta={"a": 1})
    version = model_version(fp)
    assert store.versions == [version] and version["id"] == f"r18-w0.125-{fp['checkpoint_sha1'][:12]}"
    assert store.version_counts() == {version["id"]: 5} and store.meta == {"a": 1}
    raises_one_line(StoreError, "embedding_size 8, the features are 4-d", store_model_features,
                    tmp_path / "t", np.ones((5, 4)), np.arange(5), fp)


def test_transform_store_equals_apply_with_side_information_matched_by_id(tmp_path, models):
    old, side = gallery_stores(tmp_path, models)
    fct = FCTransform.load(models["dirs"]["fct"])
    done: list[int] = []
    out = transform_store(fct, old, side, tmp_path / "fct", chunk_rows=37, progress=done.append)
    aligned = np.asarray(side.features)[side.rows_of(old.ids)]
    want, var = fct.apply(np.asarray(old.features), aligned)
    np.testing.assert_allclose(out.features, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.ids, old.ids)
    assert done == [37, 74, 111, 148, 185, 200]
    version = out.versions[0]
    assert out.versions == [version] and version["kind"] == "transform" and version["id"] == fct.version
    assert version["from"] == model_version(models["fp"]["old"])["id"]
    assert version["side"] == model_version(models["fp"]["side"])["id"]
    assert version["to"] == model_version(models["fp"]["new"])["id"]
    assert out.spaces() == {version["to"]: 200}  # comparable with new-model queries
    sigma2 = read_uncertainty(out)
    np.testing.assert_allclose(sigma2, var, rtol=1e-5)
    assert (out.path / "uncertainty.npy").is_file() and out.meta["uncertainty"]["file"] == "uncertainty.npy"
    assert out.meta["items"] == "test" and out.meta["upgrade"]["rows_transformed"] == 200
    assert FeatureStore.open(out.path).num_items == 200  # a complete, valid store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fct", "old", "side"]  # no temporary left
    # without side-information: no uncertainty head, no side store
    plain = transform_store(FCTransform.load(models["dirs"]["noside"]), old, None, tmp_path / "plain")
    assert plain.versions[0]["side"] is None and read_uncertainty(plain) is None
    assert not (plain.path / "uncertainty.npy").exists()


def test_transform_store_refuses_other_versions_and_missing_side_items(tmp_path, models):
    old, side = gallery_stores(tmp_path, models)
    fct = FCTransform.load(models["dirs"]["fct"])
    from_id = model_version(models["fp"]["old"])["id"]
    other = {"checkpoint_sha1": "f" * 40, "network": "r18", "embedding_size": OLD_DIM}
    stranger = store_model_features(tmp_path / "stranger", np.asarray(old.features), old.ids, other)
    msg = raises_one_line(IncompatibleError, "200 rows of version 'r18-ffffffffffff'", transform_store, fct,
                          stranger, side, tmp_path / "out")
    assert f"expected rows of {from_id!r}" in msg
    wrong_side = store_model_features(tmp_path / "wrong_side", np.asarray(side.features), side.ids,
                                      {**other, "embedding_size": SIDE_DIM})
    raises_one_line(IncompatibleError, "side-information .* must be version", transform_store, fct, old,
                    wrong_side, tmp_path / "out")
    short = store_model_features(tmp_path / "short", np.asarray(side.features)[1:], side.ids[1:],
                                 models["fp"]["side"])
    raises_one_line(StoreError, f"does not cover the items of .*no item id {int(side.ids[0])} ",
                    transform_store, fct, old, short, tmp_path / "out")
    raises_one_line(StoreError, "needs 4-d side-information", transform_store, fct, old, None,
                    tmp_path / "out")
    raises_one_line(StoreError, "trained without side-information", transform_store,
                    FCTransform.load(models["dirs"]["noside"]), old, side, tmp_path / "out")
    raises_one_line(StoreError, "another directory than its input", transform_store, fct, old, side, old.path)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_partially_backfilled_rows_are_copied_and_uncertainty_follows(tmp_path, models):
    old, side = gallery_stores(tmp_path, models)
    fct = FCTransform.load(models["dirs"]["fct"])
    new_fp, new_id = models["fp"]["new"], model_version(models["fp"]["new"])["id"]
    chosen = old.ids[[5, 0, 150]]
    new_feats = np.random.default_rng(1).standard_normal((3, NEW_DIM)).astype(np.float32)
    partial = backfill_store(old, chosen, new_feats, new_fp, tmp_path / "partial")
    assert partial.version_counts() == {model_version(models["fp"]["old"])["id"]: 197, new_id: 3}
    # the side store need not hold the backfilled items
    keep = ~np.isin(side.ids, chosen)
    side_part = store_model_features(tmp_path / "side_part", np.asarray(side.features)[keep], side.ids[keep],
                                     models["fp"]["side"])
    out = transform_store(fct, partial, side_part, tmp_path / "fct", chunk_rows=64)
    rows = out.rows_of(chosen)
    np.testing.assert_array_equal(out.features[rows], new_feats)
    assert [out.version_of(r)["id"] for r in rows] == [new_id] * 3
    assert out.version_counts() == {fct.version: 197, new_id: 3} and out.spaces() == {new_id: 200}
    rest = np.setdiff1d(np.arange(200), rows)
    aligned = np.asarray(side.features)[side.rows_of(old.ids[rest])]
    want, _ = fct.apply(np.asarray(old.features)[rest], aligned)
    np.testing.assert_allclose(out.features[rest], want, rtol=1e-5, atol=1e-6)
    sigma2 = read_uncertainty(out)
    assert np.isnan(sigma2[rows]).all() and np.isfinite(sigma2[rest]).all()
    assert out.meta["upgrade"] == {**out.meta["upgrade"], "rows_transformed": 197, "rows_copied": 3}
    # an upgraded store given again: every row is already in the new space, copied with its σ²
    again = transform_store(fct, out, side, tmp_path / "again")
    np.testing.assert_array_equal(again.features, out.features)
    assert again.versions == out.versions and again.meta["upgrade"]["rows_copied"] == 200
    np.testing.assert_array_equal(read_uncertainty(again), sigma2)
    # backfilling the upgraded store: rows by position, uncertainty NaN there, the file goes along
    more = backfill_store(out, [rest[0]], np.ones((1, NEW_DIM)), new_fp, tmp_path / "more", by="row")
    assert np.isnan(read_uncertainty(more)[rest[0]]) and np.isfinite(read_uncertainty(more)[rest[1]])
    assert more.version_counts() == {fct.version: 196, new_id: 4}
    in_place = backfill_store(more, [int(more.ids[rest[1]])], np.ones((1, NEW_DIM)), new_fp)
    assert in_place.path == more.path and np.isnan(read_uncertainty(in_place)[rest[1]])
    raises_one_line(StoreError, "no item id 1", backfill_store, out, [1], np.ones((1, NEW_DIM)), new_fp,
                    tmp_path / "x")


def test_transform_store_output_is_atomic(tmp_path, models, monkeypatch):
    old, side = gallery_stores(tmp_path, models)
    fct = FCTransform.load(models["dirs"]["fct"])
    real_apply, calls = fct.apply, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(fct, "apply", failing)
    with pytest.raises(OSError, match="disk full"):
        transform_store(fct, old, side, tmp_path / "out", chunk_rows=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "side"]  # nothing half-written
    monkeypatch.setattr(fct, "apply", real_apply)
    first = transform_store(fct, old, side, tmp_path / "out")
    raises_one_line(StoreError, "a feature store exists there", transform_store, fct, old, side,
                    tmp_path / "out")
    # a failed overwrite keeps the store that was there
    calls.clear()
    monkeypatch.setattr(fct, "apply", failing)
    with pytest.raises(OSError, match="disk full"):
        transform_store(fct, old, side, tmp_path / "out", chunk_rows=50, overwrite=True)
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "out").features, first.features)
    monkeypatch.setattr(fct, "apply", real_apply)
    again = transform_store(fct, old, side, tmp_path / "out", overwrite=True)
    assert again.num_items == 200 and sorted(p.name for p in tmp_path.iterdir()) == ["old", "out", "side"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    raises_one_line(StoreError, "non-empty directory that is not a feature store", transform_store, fct, old,
                    side, tmp_path / "junk")


def test_fct_meta_without_a_model_fingerprint(tmp_path, models):
    fct = FCTransform.load(models["dirs"]["fct"])
    fct.meta = {**fct.meta, "models": {**fct.meta["models"], "new": {"network": "r18"}}}
    raises_one_line(StoreError, "models.new lacks checkpoint_sha1, embedding_size",
                    upgrade.fct_model_versions, fct)
