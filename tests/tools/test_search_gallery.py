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


def _certificate(path, tmp, query_version: str, gallery_version: str, compatible: bool) -> None:
    """A certificate of a candidate (queries of ``query_version``) against a deployed gallery
    (``gallery_version``): the figures are certify_cells' on a 40-subject set, the candidate in the
    deployed space (compatible) or in another (incompatible); versions as certify records them."""
    from facecompat.eval import ijb
    from facecompat.eval.certificate import certify_cells
    from tests.helpers.data import subject_features, write_ijb_meta

    meta = ijb.load_ijb_meta(write_ijb_meta(tmp / "IJBC", 40), "IJBC")
    feats = {"deployed": subject_features(meta, 0, noise=0.9),
             "candidate": subject_features(meta, 0 if compatible else 5, noise=0.3)}
    figures = certify_cells(meta, {n: ijb.pool(meta, f) for n, f in feats.items()}, old="deployed",
                            candidates=["candidate"], replicates=50)
    versions = {"deployed": gallery_version, "candidate": query_version}
    cert = {"format": "facecompat-certificate", "version": 1, "versions": versions, **figures}
    path.write_text(json.dumps(cert))
    return cert


def test_a_certificate_declares_compatible_pairs_and_gives_the_threshold(tools, tmp_path, models, capsys):
    rng = np.random.default_rng(6)
    feats = rng.standard_normal((60, NEW_DIM)).astype(np.float32)
    feats[:, NEW_DIM // 2:] = 0.0  # the gallery spans half the dimensions ...
    gallery = store_model_features(tmp_path / "g", feats, np.arange(60) + 1, models["fp"]["new"])
    queries = tmp_path / "q.npy"
    unknown = np.eye(NEW_DIM, dtype=np.float32)[[-1]]  # ... so this face scores 0 against all of it
    np.save(queries, np.concatenate([feats[[3, 41]] + 0.01 * rng.standard_normal((2, NEW_DIM)),
                                     unknown]).astype(np.float32))
    old_id, new_id = model_version(models["fp"]["old"])["id"], gallery.versions[0]["id"]
    base = ["--gallery", str(gallery.path), "--queries", str(queries), "-k", "2", "--cpu",
            "--query-model", str(models["runs"]["old"])]
    good = tmp_path / "good.json"
    cert = _certificate(good, tmp_path / "a", old_id, new_id, compatible=True)
    assert cert["decision"]["candidate"]["decision"] == "compatible"
    out = tmp_path / "r.json"
    assert tools["search_gallery"].main([*base, "--certificate", str(good), "--far", "0.01",
                                         "--out", str(out)]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    threshold = cert["cells"]["candidate|deployed"]["1:1"]["0.01"]["threshold"]
    assert result["declared"] == [[old_id, new_id]]  # by the certificate, no --declare
    assert result["threshold"] == {"far": "0.01", "value": threshold, "cell": "candidate|deployed",
                                   "certificate": str(good)}
    assert result["accepted"] == [[s >= threshold for s in row] for row in result["scores"]]
    assert result["accepted"][0][0] and not result["accepted"][2][0]  # the third query: an unknown face
    assert "2 of 3 queries matched, 1 unknown" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    cert = _certificate(bad, tmp_path / "b", old_id, new_id, compatible=False)
    assert tools["search_gallery"].main([*base, "--certificate", str(bad), "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, f"--certificate {bad}: candidate against the {new_id} gallery is "
                                        f"{cert['decision']['candidate']['decision']}", "not searched")
    assert tools["search_gallery"].main([*base, "--certificate", str(good), "--far", "1e-5",
                                         "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "has no threshold at FAR 1e-05")
    assert tools["search_gallery"].main([*base, "--far", "0.01", "--out", str(out)]) == 2
    error_line(capsys.readouterr().err, "--far 0.01: needs --certificate")
