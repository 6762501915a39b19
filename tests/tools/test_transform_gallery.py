"""tools/transform_gallery.py: an old-model store upgraded by an (untrained) transformation, its report
with the time per million items and JSON summary, its help, and the one-line errors before the work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facecompat.index.store import FeatureStore
from facecompat.index.upgrade import store_model_features
from tests.helpers.errors import error_line
from tests.helpers.gallery import NEW_DIM, gallery_stores, make_gallery_models
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
    return {"transform_gallery": load_tool("transform_gallery")}


@pytest.mark.parametrize("name", ["transform_gallery"])
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
    old, side = gallery_stores(tmp_path, models)
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


def test_transform_gallery_json_file_beside_the_report(tools, tmp_path, models, capsys):
    """--json OUT writes the summary (atomically) and keeps the report on stdout."""
    old, side = gallery_stores(tmp_path, models)
    out = tmp_path / "reports" / "t.json"
    assert tools["transform_gallery"].main([
        "--transform", str(models["dirs"]["fct"]), "--old", str(old.path), "--side", str(side.path),
        "--device", "cpu", "--no-progress", "--out", str(tmp_path / "fct"), "--json", str(out)]) == 0
    assert "upgraded gallery" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows_transformed"] == 200


@pytest.mark.parametrize("name, argv, culprit", [
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
    assert exit_status(tools[name].main, argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and "error: " in lines[0], captured.err
    assert culprit in lines[0]
