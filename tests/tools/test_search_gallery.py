"""tools/search_gallery.py: new-model queries against a gallery store, version checks and declared
compatible spaces, its help, and the one-line errors before the work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facecompat.index.store import model_version
from facecompat.index.upgrade import store_model_features
from tests.helpers.errors import error_line
from tests.helpers.gallery import NEW_DIM, make_gallery_models
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
    return {"search_gallery": load_tool("search_gallery")}


@pytest.mark.parametrize("name", ["search_gallery"])
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


@pytest.mark.parametrize("name, argv, culprit", [
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
    assert exit_status(tools[name].main, argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and "error: " in lines[0], captured.err
    assert culprit in lines[0]
