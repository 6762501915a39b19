"""facecompat.index.upgrade and the gallery tools (extract_gallery, transform_gallery, search_gallery):
model stores, FCT over a store (equal to FCTransform.apply, side-information by id, version rules,
partial backfill, atomic output), and each tool's help, bad input and a run on the tiny IJB-C set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from facecompat.compat.fct import FCTransform
from facecompat.index import upgrade
from facecompat.index.store import FeatureStore, IncompatibleError, StoreError, model_version
from facecompat.index.upgrade import (
    backfill_store,
    read_uncertainty,
    store_model_features,
    transform_store,
)
from tests.helpers.errors import error_line, raises_one_line
from tests.helpers.fct import NEW_DIM, OLD_DIM, SIDE_DIM, fct_stores, make_fct_models
from tests.helpers.models import single_thread
from tests.helpers.tools import exit_status, load_tool

pytest.importorskip("faiss")

TOOLS = ("extract_gallery", "transform_gallery", "search_gallery")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Three random-weight run directories, two transformations (with and without side-information)
    that name them, their fingerprints."""
    return make_fct_models(tmp_path_factory.mktemp("gallery_models"))


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
    old, side = fct_stores(tmp_path, models)
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
    old, side = fct_stores(tmp_path, models)
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
    old, side = fct_stores(tmp_path, models)
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
    old, side = fct_stores(tmp_path, models)
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


# --------------------------------------------------------------------------------------------- tools
@pytest.fixture(scope="module")
def tools() -> dict:
    return {name: load_tool(name) for name in TOOLS}


@pytest.mark.parametrize("name", TOOLS)
def test_tool_help_explains_itself(tools, name, capsys):
    with pytest.raises(SystemExit) as exit_:
        tools[name].main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"tools/{name}.py" in text
    with pytest.raises(SystemExit) as exit_:
        tools[name].main([])  # required arguments missing: one line, status 2
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required" in err


def test_transform_gallery_tool_reports_time_per_million(tools, tmp_path, models, capsys):
    old, side = fct_stores(tmp_path, models)
    argv = ["--transform", str(models["dirs"]["fct"]), "--old", str(old.path), "--side", str(side.path),
            "--device", "cpu", "--no-progress"]
    assert tools["transform_gallery"].main([*argv, "--out", str(tmp_path / "fct"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == summary["rows_transformed"] == 200 and summary["rows_copied"] == 0
    assert summary["versions_in"] == old.version_counts() and summary["uncertainty"] is True
    assert summary["versions_out"] == {summary["transform"]: 200}
    assert summary["s_per_1M_items"] == pytest.approx(1e6 / summary["rows_per_s"], rel=1e-3)
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "fct").ids, old.ids)
    # human summary with a re-extraction figure from a store's recorded extraction
    meta = {"model": {"source": "new"}, "extraction": {"cached": False, "seconds": 2.0, "faces": 200,
                                                       "device": "cpu", "s_per_1M_items": 10000.0}}
    timed = store_model_features(tmp_path / "timed", np.ones((2, NEW_DIM)), [0, 1], models["fp"]["new"],
                                 meta=meta)
    assert tools["transform_gallery"].main([*argv, "--out", str(tmp_path / "fct"), "--overwrite",
                                            "--compare", str(timed.path)]) == 0
    text = capsys.readouterr().out
    assert "200 transformed, 0 copied" in text and "s per 1M items" in text
    assert "re-extraction (new, cpu): 10000 s per 1M items" in text
    # bad input: one line, exit 2
    assert tools["transform_gallery"].main([*argv[:2], "--old", str(tmp_path / "nowhere"), "--out",
                                            str(tmp_path / "o")]) == 2
    assert "no such feature store" in error_line(capsys.readouterr().err)
    assert tools["transform_gallery"].main(["--transform", str(models["dirs"]["fct"]), "--old",
                                            str(side.path), "--out", str(tmp_path / "o"), "--device",
                                            "cpu"]) == 2
    assert "takes 8-d old features" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_search_gallery_tool_checks_versions(tools, tmp_path, models, capsys):
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((60, NEW_DIM)).astype(np.float32)
    ids = np.arange(60) * 10 + 1
    gallery = store_model_features(tmp_path / "g", feats, ids, models["fp"]["new"])
    queries = tmp_path / "q.npy"
    np.save(queries, feats[[3, 41]] * 5 + 0.01 * rng.standard_normal((2, NEW_DIM)))
    base = ["--gallery", str(gallery.path), "--queries", str(queries), "-k", "3", "--cpu"]
    out = tmp_path / "r.json"
    assert tools["search_gallery"].main([*base, "--query-model", str(models["runs"]["new"]), "--out",
                                         str(out)]) == 0
    assert "2 queries" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [row[0] for row in result["ids"]] == [31, 411] and result["scores"][0][0] > 0.99
    assert result["query_version"] == gallery.versions[0]["id"] and result["index"]["kind"] == "flat"
    # the old model's queries against the new gallery: not comparable unless declared
    old_model = str(models["runs"]["old"])
    x = tmp_path / "x"
    assert tools["search_gallery"].main([*base, "--query-model", old_model, "--out", str(x)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "cannot be compared with 60 rows of version" in line and not (tmp_path / "x").exists()
    old_id, new_id = model_version(models["fp"]["old"])["id"], gallery.versions[0]["id"]
    for declaration in (f"{old_id}={new_id}", f"{old_model}={models['runs']['new']}"):
        assert tools["search_gallery"].main([*base, "--query-model", old_model, "--declare", declaration,
                                             "--out", str(out)]) == 0
        assert json.loads(out.read_text())["declared"] == [[old_id, new_id]]
    capsys.readouterr()
    with pytest.warns(UserWarning, match="one list"):
        assert tools["search_gallery"].main([*base, "--query-model", str(models["runs"]["new"]), "--kind",
                                             "ivf", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["index"]["kind"] == "flat"
    np.save(queries, np.ones((2, 5), np.float32))
    assert tools["search_gallery"].main([*base, "--query-model", str(models["runs"]["new"]), "--out",
                                         str(out)]) == 2
    assert "expected float [q, 8]" in error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_:  # argparse: QUERY=GALLERY expected
        tools["search_gallery"].main([*base, "--query-model", "nothing", "--declare", "a", "--out", str(out)])
    assert exit_.value.code == 2 and "QUERY_SPACE=GALLERY_SPACE" in capsys.readouterr().err


def test_extract_gallery_tool_on_tiny_ijbc(tools, tmp_path, models, synthetic_tiny, capsys):
    """Gallery faces of the tiny IJB-C by the old and side models, upgraded by FCT: the whole chain."""
    from facecompat.eval.extract import cache_paths
    from facecompat.eval.ijb import load_ijb_meta
    from facecompat.index.backfill import gallery_items

    runs = models["runs"]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({
        "data_root": str(synthetic_tiny), "cache_dir": str(tmp_path / "cache"), "batch_size": 64,
        "num_workers": 0, "models": {"old": {"path": str(runs["old"])},
                                      "fct": {"transform": str(models["dirs"]["fct"])}}}))
    tool = tools["extract_gallery"]
    base = ["--config", str(catalog), "--device", "cpu", "--gallery-only"]
    assert tool.main([*base, "--model", "old", "--out", str(tmp_path / "g_old"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    store = FeatureStore.open(tmp_path / "g_old")
    items = gallery_items(load_ijb_meta(synthetic_tiny / "IJBC", "IJBC"))
    np.testing.assert_array_equal(store.ids, items)
    assert 0 < store.num_items < summary["faces"] and summary["rows"] == store.num_items
    cached = np.load(cache_paths(tmp_path / "cache", "old", "IJBC")[0])
    np.testing.assert_array_equal(store.features, cached[items])  # the evaluation's features
    assert store.versions == [model_version(models["fp"]["old"])] and store.meta["gallery_only"] is True
    assert summary["extraction"]["cached"] is False and summary["extraction"]["s_per_1M_items"] > 0
    # again: refused over an existing store, then read from the cache
    assert tool.main([*base, "--model", "old", "--out", str(store.path)]) == 2
    assert "--overwrite" in error_line(capsys.readouterr().err)
    assert tool.main([*base, "--model", "old", "--out", str(store.path), "--overwrite"]) == 0
    assert "read from the cache" in capsys.readouterr().out
    # a transformation is not a model
    assert tool.main([*base, "--model", "fct", "--out", str(tmp_path / "g_fct")]) == 2
    assert "tools/transform_gallery.py" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "g_fct").exists()
    # side-information by path, then the upgrade
    assert tool.main([*base, "--model", str(runs["side"]), "--out", str(tmp_path / "g_side")]) == 0
    capsys.readouterr()
    assert tools["transform_gallery"].main([
        "--transform", str(models["dirs"]["fct"]), "--old", str(store.path), "--side",
        str(tmp_path / "g_side"), "--out", str(tmp_path / "g_up"), "--device", "cpu", "--no-progress"]) == 0
    upgraded = FeatureStore.open(tmp_path / "g_up")
    assert upgraded.spaces() == {model_version(models["fp"]["new"])["id"]: items.size}
    assert upgraded.meta["gallery_only"] is True and upgraded.meta["target"] == "IJBC"


@pytest.mark.parametrize("name, argv, culprit", [
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/g", "--json", "{tmp}"], "--json"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/file"], "--out"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/g", "--workers", "-1"], "--workers"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/g", "--batch-size", "0"], "--batch-size"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/store"], "--overwrite"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/g", "--device", "cuda:99"], "--device"),
    ("transform_gallery", ["--transform", "{tmp}/none", "--old", "{tmp}/none", "--out", "{tmp}/g", "--json",
                           "{tmp}"], "--json"),
    ("transform_gallery", ["--transform", "{tmp}/none", "--old", "{tmp}/none", "--out", "{tmp}/file"],
     "--out"),
    ("transform_gallery", ["--transform", "{tmp}/none", "--old", "{tmp}/none", "--out", "{tmp}/store"],
     "--overwrite"),
    ("transform_gallery", ["--transform", "{tmp}/none", "--old", "{tmp}/none", "--out", "{tmp}/g",
                           "--chunk-rows", "-1"], "--chunk-rows"),
    ("transform_gallery", ["--transform", "{tmp}/none", "--old", "{tmp}/none", "--out", "{tmp}/g",
                           "--device", "nope"], "--device"),
    ("search_gallery", ["--gallery", "{tmp}/none", "--queries", "{tmp}/q.npy", "--query-model", "x", "--out",
                        "{tmp}"], "--out"),
    ("search_gallery", ["--gallery", "{tmp}/none", "--queries", "{tmp}/q.npy", "--query-model", "x", "--out",
                        "{tmp}/r.json", "-k", "0"], "-k"),
])
def test_gallery_tools_refuse_bad_flags_and_outputs_before_the_work(tools, tmp_path, capsys, name, argv,
                                                                    culprit):
    """A bad count, device or output (a directory for a file, a file for a store, an existing store
    without --overwrite) stops in one line with exit status 2 before any input is read: the other
    inputs named here do not even exist."""
    (tmp_path / "file").write_text("not a store")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "store.json").write_text("{}")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert exit_status(tools[name].main, [*argv, "--config", str(tmp_path / "none.yaml")]
                       if name == "extract_gallery" else argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and "error: " in lines[0], captured.err
    assert culprit in lines[0]


def test_extract_gallery_names_the_allow_missing_flag(tools, tmp_path, models, synthetic_tiny, capsys):
    """A face whose image is missing: the message names --allow-missing (the flag the user types)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_tiny / "IJBC", data / "IJBC")
    first = next(iter(sorted((data / "IJBC" / "loose_crop").iterdir())))
    first.unlink()
    argv = ["--model", str(models["runs"]["old"]), "--out", str(tmp_path / "g"), "--data-root", str(data),
            "--config", str(tmp_path / "none.yaml"), "--device", "cpu"]
    (tmp_path / "none.yaml").write_text("models: {}\n")
    assert tools["extract_gallery"].main(argv) == 2
    line = error_line(capsys.readouterr().err)
    assert "--allow-missing" in line and "allow_missing" not in line and first.name in line


def test_search_gallery_out_dash_prints_the_results(tools, tmp_path, models, capsys):
    """--out -: the results as JSON on standard output, nothing else there."""
    feats = np.random.default_rng(6).standard_normal((20, NEW_DIM)).astype(np.float32)
    gallery = store_model_features(tmp_path / "g", feats, np.arange(20), models["fp"]["new"])
    queries = tmp_path / "q.npy"
    np.save(queries, feats[[7]])
    assert tools["search_gallery"].main(["--gallery", str(gallery.path), "--queries", str(queries), "-k", "2",
                                         "--cpu", "--query-model", str(models["runs"]["new"]), "--out",
                                         "-"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"][0][0] == 7


def test_transform_gallery_json_file_beside_the_report(tools, tmp_path, models, capsys):
    """--json OUT writes the summary (atomically) and keeps the report on stdout."""
    old, side = fct_stores(tmp_path, models)
    out = tmp_path / "reports" / "t.json"
    assert tools["transform_gallery"].main([
        "--transform", str(models["dirs"]["fct"]), "--old", str(old.path), "--side", str(side.path),
        "--device", "cpu", "--no-progress", "--out", str(tmp_path / "fct"), "--json", str(out)]) == 0
    assert "upgraded gallery" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows_transformed"] == 200
