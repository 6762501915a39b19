"""tools/extract_gallery.py: gallery faces of the tiny IJB-C stored by the old and side-information
models and upgraded by tools/transform_gallery.py (the whole chain), its help, and the one-line errors
before the work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from facecompat.index.store import FeatureStore, model_version
from tests.helpers.errors import error_line
from tests.helpers.gallery import make_gallery_models
from tests.helpers.models import single_thread
from tests.helpers.tools import exit_status, load_tool

pytest.importorskip("faiss")

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Three random-weight run directories, two transformations (with and without side-information)
    that name them, their fingerprints."""
    return make_gallery_models(tmp_path_factory.mktemp("gallery_models"))


@pytest.fixture(scope="module")
def tools() -> dict:
    return {name: load_tool(name) for name in ("extract_gallery", "transform_gallery")}


@pytest.mark.parametrize("name", ["extract_gallery"])
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


@pytest.mark.parametrize("name, argv, culprit", [
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/g", "--json", "{tmp}"], "--json"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/file"], "--out"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/g", "--workers", "-1"], "--workers"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/g", "--batch-size", "0"], "--batch-size"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/store"], "--overwrite"),
    ("extract_gallery", ["--model", "old", "--out", "{tmp}/g", "--device", "cuda:99"], "--device"),
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
