"""tools/eval_ijbc.py on the synthetic IJB-C-style folder: models by name, cross cells, the matrix,
precomputed features, outputs (JSON, ROC PNG, scores) and every bad input -> one line, exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from facecompat.eval import ijb, metrics
from tests.helpers import REPO
from tests.helpers.data import subject_features, write_ijb_meta
from tests.helpers.errors import error_line
from tests.helpers.gallery import OLD_DIM, make_gallery_models, write_gallery_catalog
from tests.helpers.models import make_run_dir
from tests.helpers.tools import exit_status, load_tool, tool_help, tool_path

NETWORK, EMBEDDING_SIZE = "r18-w0.125", 32


@pytest.fixture(scope="module")
def tool():
    return load_tool("eval_ijbc")


def _make_run_dir(path: Path, seed: int) -> Path:
    return make_run_dir(path, seed, NETWORK, EMBEDDING_SIZE)


def _catalog(path: Path, data_root: Path, cache: Path, models: dict[str, Path]) -> Path:
    path.write_text(yaml.safe_dump({
        "data_root": str(data_root), "target": "IJBC", "cache_dir": str(cache), "batch_size": 64,
        "num_workers": 0, "models": {name: {"path": str(p)} for name, p in models.items()}}))
    return path


@pytest.fixture(scope="module")
def setup(synthetic_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ijbc")
    runs = {"old": _make_run_dir(root / "runs" / "old", 0), "new": _make_run_dir(root / "runs" / "new", 1)}
    catalog = _catalog(root / "catalog.yaml", synthetic_tiny, root / "cache", runs)
    return {"root": root, "catalog": catalog, "runs": runs, "data": synthetic_tiny, "cache": root / "cache"}


def _run(tool, argv, capsys) -> tuple[int, str, str]:
    code = tool.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _data(root: Path, tmp_path: Path) -> list:
    """--data-root ROOT with a feature/meta cache of the test's own (not the repo's work_dirs/eval)."""
    return ["--data-root", root, "--cache-dir", tmp_path / "cache"]


def _reference_scores(meta: ijb.IJBMeta, query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """insightface's eval_ijbc.py pooling, loop for loop (score-weighted faces, media mean, template
    sum, L2), crossed as the public cross-model evaluator's ``verification_11(gallery feats, ...,
    query feats, ..., p1, p2)``: the first pair column from the gallery model, the second from the
    query model."""
    def pool(feats):
        feats = feats.astype(np.float64) * meta.det_scores[:, None]
        out = {}
        for t in np.unique(meta.template_ids):
            ind = np.where(meta.template_ids == t)[0]
            medias = [feats[ind[meta.media_ids[ind] == m]].mean(0) for m in np.unique(meta.media_ids[ind])]
            v = np.sum(medias, axis=0)
            out[t] = v / np.linalg.norm(v)
        return out

    q, g = pool(query), pool(gallery)
    return np.array([g[a] @ q[b] for a, b in zip(meta.pair_t1.tolist(), meta.pair_t2.tolist())])


@pytest.fixture(scope="module")
def cross(tool, setup):
    """One cross test by name (--query new --gallery old) with every output; later tests compare to it."""
    out_dir = setup["root"] / "cross"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = tool.main(["--config", str(setup["catalog"]), "--query", "new", "--gallery", "old",
                          "--json", str(out_dir / "r.json"), "--roc", str(out_dir / "roc.png"),
                          "--save-scores", str(out_dir / "scores")])
    assert code == 0, stderr.getvalue()
    return {"dir": out_dir, "json": json.loads((out_dir / "r.json").read_text()), "stdout": stdout.getvalue()}


# ------------------------------------------------------------------------------------ by model name
def test_cross_test_by_name_outputs(tool, setup, cross, capsys):
    out_dir, res, stdout = cross["dir"], cross["json"], cross["stdout"]
    # DESIGN §8 shape: the requested cell at the top, every cell in the matrix
    assert set(res["matrix"]) == {"new|old", "old|new", "new|new", "old|old"}
    assert (res["query"], res["gallery"]) == ("new", "old")
    assert res["1:1"] == res["matrix"]["new|old"]["1:1"] and res["1:N"] == res["matrix"]["new|old"]["1:N"]
    assert list(res["1:1"]["tar_at_far"]) == ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]
    assert all(0.0 <= v <= 1.0 for v in res["1:1"]["tar_at_far"].values())
    assert set(res["1:N"]) == {"G1", "G2"}
    for gal in res["1:N"].values():
        assert set(gal["cmc"]) == {"1", "5", "10"} and set(gal["tpir_at_fpir"]) == {"0.01", "0.1"}
    assert "ecc" not in res and res["models"]["old"]["network"] == NETWORK  # 85 impostors: no FAR resolved
    assert sum(line.split()[:2] == ["new", "old"] for line in stdout.splitlines()) == 2  # 1:1 and 1:N rows
    assert (out_dir / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # features are cached by name; scores on disk equal a loop-for-loop insightface computation
    meta = ijb.load_ijb_meta(setup["data"])
    feats = {n: np.load(setup["cache"] / "features" / n / "IJBC.npy") for n in ("old", "new")}
    assert feats["old"].shape == (meta.num_faces, EMBEDDING_SIZE)
    pairs = np.load(out_dir / "scores" / "pairs.npy")
    assert np.array_equal(pairs[:, 0], meta.pair_t1) and np.array_equal(pairs[:, 2], meta.pair_labels)
    scores = np.load(out_dir / "scores" / "new__old.npy")
    np.testing.assert_allclose(scores, _reference_scores(meta, feats["new"], feats["old"]), atol=1e-5)
    fpr, tpr, _ = metrics.roc_curve(scores, meta.pair_labels)
    assert res["1:1"]["tar_at_far"] == metrics.tar_at_far(fpr, tpr)

    # a second run reuses the cache (no re-extraction) and gives the same numbers
    stamp = os.stat(setup["cache"] / "features" / "old" / "IJBC.npy").st_mtime_ns
    code, _, err = _run(tool, ["--config", setup["catalog"], "--query", "new", "--gallery", "old", "--no-1n",
                               "--json", out_dir / "again.json"], capsys)
    assert code == 0, err
    assert os.stat(setup["cache"] / "features" / "old" / "IJBC.npy").st_mtime_ns == stamp
    again = json.loads((out_dir / "again.json").read_text())
    assert again["1:1"] == res["1:1"] and "1:N" not in again


def test_matrix_by_name_and_path(tool, setup, cross, capsys):
    old_path = setup["runs"]["old"]
    code, stdout, err = _run(tool, ["--config", setup["catalog"], "--matrix", f"{old_path},new",
                                    "--old", str(old_path), "--json", setup["root"] / "m.json"], capsys)
    assert code == 0, err
    res = json.loads((setup["root"] / "m.json").read_text())
    assert len(res["matrix"]) == 4
    assert "ecc" not in res and "q \\ g" in stdout  # 85 impostor pairs resolve no FAR: no verdicts
    assert "no ECC verdicts: 85 impostor pairs resolve none of FAR" in err
    # the path-named model has its own cache folder (stem + path hash); same weights -> same numbers
    assert any(p.name.startswith("old-") for p in (setup["cache"] / "features").iterdir())
    by_name = cross["json"]
    assert res["matrix"][f"{old_path}|new"]["1:1"] == by_name["matrix"]["old|new"]["1:1"]


# --------------------------------------------------------------------------- precomputed features
def test_precomputed_features(tool, setup, capsys, tmp_path):
    meta = ijb.load_ijb_meta(setup["data"])
    good = subject_features(meta)
    np.save(tmp_path / "good.npy", good)
    np.save(tmp_path / "scaled.npy", good * 3.0)  # cosines do not change with scale
    np.save(tmp_path / "noise.npy", np.random.default_rng(5).standard_normal(good.shape).astype(np.float32))
    code, stdout, err = _run(tool, [*_data(setup["data"], tmp_path),
                                    "--query-features", tmp_path / "good.npy",
                                    "--gallery-features", tmp_path / "scaled.npy",
                                    "--json", tmp_path / "r.json", "--no-faiss"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["1:1"]["tar_at_far_strict"]["1e-02"] == 1.0 and res["1:1"]["auc"] == 1.0
    assert res["1:1"] == res["matrix"]["good|good"]["1:1"]
    assert all(g["cmc"]["1"] == 1.0 for g in res["1:N"].values())

    code, _, err = _run(tool, [*_data(setup["data"], tmp_path), "--query-features", tmp_path / "good.npy",
                               "--gallery-features", tmp_path / "noise.npy",
                               "--json", tmp_path / "n.json"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "n.json").read_text())
    assert res["1:1"]["auc"] < 0.8 and res["matrix"]["noise|noise"]["1:1"]["auc"] < 0.8
    assert res["matrix"]["good|good"]["1:1"]["auc"] == 1.0


def test_cross_verdict_by_the_certificate_rules(tool, capsys, tmp_path):
    """A set that resolves FAR 1e-2 (40 subjects, 3,120 impostor pairs): the cross test is judged with an
    interval, the table says the decision; a FAR the set cannot resolve is refused, not judged."""
    root = write_ijb_meta(tmp_path / "IJBC", 40)
    meta = ijb.load_ijb_meta(root, "IJBC")
    np.save(tmp_path / "old.npy", subject_features(meta, 0, noise=0.9))
    np.save(tmp_path / "bct.npy", subject_features(meta, 0, noise=0.3))
    argv = [*_data(root, tmp_path), "--query-features", tmp_path / "bct.npy", "--gallery-features",
            tmp_path / "old.npy", "--replicates", "50"]
    code, stdout, err = _run(tool, [*argv, "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["ecc"] == {"bct": True} and res["decision"] == {"bct": "compatible"}
    assert res["fars"] == ["1e-02", "1e-01"] and "1e-03" in res["unresolved_fars"]
    lo, hi = res["ecc_detail"]["bct"]["1e-02"]["margin_ci"]
    assert 0 < lo <= hi
    verdict = next(line for line in stdout.splitlines() if line.startswith("bct ") and "bct|old" in line)
    assert verdict.rstrip().endswith("compatible")
    # the cell table shows no column at a FAR the set cannot resolve, and says so
    header = next(line for line in stdout.splitlines() if line.startswith("query") and "AUC" in line)
    assert header.split()[2:] == ["1e-2", "1e-1", "AUC"]
    assert "not shown: FAR 1e-06, 1e-05, 0.0001, 0.001 (3120 impostor pairs" in stdout
    code, _, err = _run(tool, [*argv, "--far", "1e-6"], capsys)
    assert code == 2
    error_line(err, "--far 1e-06: this set cannot resolve it (3120 impostor pairs")


def test_precomputed_cross_features_reproduce_verification_11(tool, setup, capsys, tmp_path):
    """--query-features NEW --gallery-features OLD gives, TAR for TAR, the public cross-model
    evaluator's verification_11(old templates, ..., new templates, ..., p1, p2) with its ROC and
    TAR rule (tools/bench_ijbc.py's reference code, loop for loop; the IJB-C-sized run of the same
    check is `tools/bench_ijbc.py --cross`)."""
    bench = load_tool("bench_ijbc")
    meta = ijb.load_ijb_meta(setup["data"])
    old = subject_features(meta, 0, noise=0.6)
    new = bench.make_new_features(old, seed=3, noise=0.8)
    np.save(tmp_path / "new.npy", new)
    np.save(tmp_path / "old.npy", old)
    code, _, err = _run(tool, [*_data(setup["data"], tmp_path), "--query-features", tmp_path / "new.npy",
                               "--gallery-features", tmp_path / "old.npy", "--json", tmp_path / "r.json"],
                        capsys)
    assert code == 0, err
    ours = json.loads((tmp_path / "r.json").read_text())["matrix"]["new|old"]["1:1"]["tar_at_far"]
    t, ref_old = bench.reference_pool(old, meta.template_ids, meta.media_ids, meta.det_scores)
    _, ref_new = bench.reference_pool(new, meta.template_ids, meta.media_ids, meta.det_scores)
    scores = bench.reference_scores(ref_old, t, meta.pair_t1, meta.pair_t2, ref_new)
    assert ours == bench.reference_tar(*bench.reference_roc(scores, meta.pair_labels))
    reversed_ = bench.reference_scores(ref_new, t, meta.pair_t1, meta.pair_t2, ref_old)
    assert np.abs(reversed_ - scores).max() > 0.05  # the direction matters on this data
    assert 0.0 < ours["1e-02"] < 1.0


def test_ijbb_target(tool, setup, capsys, tmp_path):
    src, dst = setup["data"] / "IJBC" / "meta", tmp_path / "IJBB" / "meta"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, dst / f.name.replace("ijbc_", "ijbb_").replace("_G1", "_S1").replace("_G2", "_S2"))
    meta = ijb.load_ijb_meta(tmp_path, "IJBB")
    np.save(tmp_path / "f.npy", subject_features(meta))
    code, stdout, err = _run(tool, [*_data(tmp_path, tmp_path), "--target", "IJBB", "--query-features",
                                    tmp_path / "f.npy", "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["target"] == "IJBB" and set(res["1:N"]) == {"S1", "S2"} and "S1 r1" in stdout


# ------------------------------------------------------------------------------------- bad inputs
def _copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "IJBC", dst / "IJBC")
    return dst


def test_feature_file_errors(tool, setup, capsys, tmp_path):
    meta = ijb.load_ijb_meta(setup["data"])
    good = subject_features(meta)
    np.save(tmp_path / "short.npy", good[:-1])
    np.save(tmp_path / "wide.npy", np.concatenate([good, good], axis=1))
    bad = good.copy()
    bad[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "good.npy", good)
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    base = [*_data(setup["data"], tmp_path), "--query-features"]
    cases = [([tmp_path / "short.npy"], ("short.npy", str(meta.num_faces - 1), str(meta.num_faces))),
             ([tmp_path / "good.npy", "--gallery-features", tmp_path / "wide.npy"],
              ("16-d", "32-d", "wide.npy")),
             ([tmp_path / "nan.npy"], ("nan", "NaN")),
             ([tmp_path / "junk.npy"], ("junk.npy",)),
             ([tmp_path / "absent.npy"], ("absent.npy", "not found"))]
    for extra, names in cases:
        code, _, err = _run(tool, base + extra, capsys)
        assert code == 2, (extra, err)
        error_line(err, *names)


def test_model_and_argument_errors(tool, setup, capsys, tmp_path):
    catalog = setup["catalog"]
    code, _, err = _run(tool, ["--config", catalog, "--query", "bct"], capsys)
    assert code == 2
    error_line(err, "'bct'", "known: new, old")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    code, _, err = _run(tool, ["--config", catalog, "--query", wrong], capsys)
    assert code == 2
    error_line(err, "wrong.pt", "--network")
    code, _, err = _run(tool, ["--config", catalog, "--query", wrong, "--network", "r18-w0.125"], capsys)
    assert code == 2
    error_line(err, "wrong.pt")
    bad_catalog = tmp_path / "bad.yaml"
    bad_catalog.write_text("models:\n  old: {paht: x}\n")
    code, _, err = _run(tool, ["--config", bad_catalog, "--query", "old"], capsys)
    assert code == 2
    error_line(err, "bad.yaml", "models.old.paht")
    with pytest.raises(SystemExit) as exc:
        tool.main(["--config", str(catalog), "--query", "old", "--matrix", "old,new"])
    assert exc.value.code == 2
    assert "exactly one of" in capsys.readouterr().err


def test_bad_outputs_and_counts_fail_before_the_evaluation(tool, setup, capsys, tmp_path):
    """--json DIR, an existing file as --save-scores, a folder as --roc, --workers -1 and an unusable
    --device: one line naming the flag, exit 2, before anything is read or written (no cache)."""
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    base = ["--config", setup["catalog"], "--query", "old", "--cache-dir", tmp_path / "cache"]
    cases = [(["--json", tmp_path / "a_dir"], ("--json", "a_dir", "is a directory")),
             (["--save-scores", tmp_path / "a_file"], ("--save-scores", "a_file", "is a file")),
             (["--roc", tmp_path / "a_dir"], ("--roc", "a_dir")),
             (["--workers", "-1"], ("--workers", "-1")),
             (["--batch-size", "0"], ("--batch-size",)),
             (["--device", "gpu0"], ("--device", "gpu0"))]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], ("--device", "CUDA is not available")))
    for extra, names in cases:
        assert exit_status(tool.main, base + extra) == 2, extra
        error_line(capsys.readouterr().err, *names)
    assert not (tmp_path / "cache").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]
    assert not any((tmp_path / "a_dir").iterdir()) and (tmp_path / "a_file").read_text() == "x"


def test_json_alone_prints_the_results_on_stdout(tool, setup, capsys, tmp_path):
    meta = ijb.load_ijb_meta(setup["data"])
    np.save(tmp_path / "f.npy", subject_features(meta))
    code, stdout, err = _run(tool, [*_data(setup["data"], tmp_path), "--query-features", tmp_path / "f.npy",
                                    "--no-1n", "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)  # the JSON alone: no tables around it
    assert res["query"] == res["gallery"] == "f" and res["1:1"]["auc"] == 1.0


def test_missing_image_names_the_flag_that_skips_it(tool, setup, capsys, tmp_path):
    data = _copy_data(setup["data"], tmp_path / "data")
    meta = ijb.load_ijb_meta(data)
    (data / "IJBC" / "loose_crop" / meta.image_names[0]).unlink()
    catalog = _catalog(tmp_path / "c.yaml", data, tmp_path / "cache", setup["runs"])
    code, _, err = _run(tool, ["--config", catalog, "--query", "old", "--json", tmp_path / "r.json"], capsys)
    assert code == 2
    line = error_line(err, meta.image_names[0], "--allow-missing")
    assert "allow_missing=True" not in line and not (tmp_path / "r.json").exists()


def test_meta_errors_and_allow_missing(tool, setup, capsys, tmp_path):
    data = _copy_data(setup["data"], tmp_path / "data")
    meta_dir = data / "IJBC" / "meta"
    meta = ijb.load_ijb_meta(data)
    np.save(tmp_path / "f.npy", subject_features(meta))
    argv = [*_data(data, tmp_path), "--query-features", tmp_path / "f.npy", "--json", tmp_path / "r.json"]

    # a pair naming a template absent from the media file
    pair_file = meta_dir / "ijbc_template_pair_label.txt"
    original = pair_file.read_text()
    pair_file.write_text(original + "999999 11 0\n")
    code, _, err = _run(tool, argv, capsys)
    assert code == 2
    error_line(err, "ijbc_template_pair_label.txt", "999999")
    code, _, err = _run(tool, [*argv, "--allow-missing"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["skipped"]["pairs_without_faces"] == 1
    assert "1 pairs without faces" in err
    pair_file.write_text(original)

    # a face without landmarks; a missing meta file
    pts = meta_dir / "ijbc_name_5pts_score.txt"
    lines = pts.read_text().splitlines()
    pts.write_text("\n".join([lines[0].split()[0]] + lines[1:]) + "\n")
    code, _, err = _run(tool, argv, capsys)
    assert code == 2
    error_line(err, "ijbc_name_5pts_score.txt:1")
    pts.unlink()
    code, _, err = _run(tool, argv, capsys)
    assert code == 2
    error_line(err, "ijbc_name_5pts_score.txt", "missing")


def test_data_folder_by_content_and_partial_1n(tool, setup, capsys, tmp_path):
    """--data-root: the IJB-C folder under any name; an empty IJBC/ and a half-copied 1:N set are
    one-line errors naming the path looked at / the missing file, never a 1:1-only exit 0."""
    meta = ijb.load_ijb_meta(setup["data"])
    np.save(tmp_path / "f.npy", subject_features(meta))
    mine = tmp_path / "mydata"
    shutil.copytree(setup["data"] / "IJBC" / "meta", mine / "meta")
    argv = ["--cache-dir", tmp_path / "cache", "--query-features", tmp_path / "f.npy",
            "--json", tmp_path / "r.json", "--no-faiss"]
    code, _, err = _run(tool, ["--data-root", mine, *argv], capsys)
    assert code == 0, err
    assert set(json.loads((tmp_path / "r.json").read_text())["1:N"]) == {"G1", "G2"}

    (tmp_path / "empty" / "IJBC").mkdir(parents=True)
    code, _, err = _run(tool, ["--data-root", tmp_path / "empty", *argv], capsys)
    assert code == 2
    line = error_line(err, tmp_path / "empty" / "IJBC" / "meta")
    assert "IJBC/IJBC" not in line

    (mine / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    code, _, err = _run(tool, ["--data-root", mine, *argv], capsys)
    assert code == 2
    error_line(err, "ijbc_1N_gallery_G2.csv", "missing")
    for name in ("ijbc_1N_gallery_G1.csv", "ijbc_1N_probe_mixed.csv"):
        (mine / "meta" / name).unlink()
    code, _, err = _run(tool, ["--data-root", mine, *argv], capsys)  # none at all: 1:1 only
    assert code == 0, err
    assert "1:1 only" in err and "1:N" not in json.loads((tmp_path / "r.json").read_text())


def test_weights_file_is_read_at_its_embedding_size(tool, setup, capsys, tmp_path):
    """A bare 128-d weights file named with --network: 128-d, not the 512 a default would say."""
    from facecompat.eval.catalog import EvalCatalog, resolve_model
    from facecompat.models import get_model

    torch.manual_seed(0)
    weights = tmp_path / "model.pt"
    torch.save(get_model(NETWORK, 128).state_dict(), weights)
    assert resolve_model(str(weights), EvalCatalog(), network=NETWORK).embedding_size == 128
    with pytest.raises(ValueError, match=r"model\.pt: its embedding layer is 128-d, not the 64-d"):
        resolve_model(str(weights), EvalCatalog(), network=NETWORK, embedding_size=64)
    code, _, err = _run(tool, ["--config", setup["catalog"], *_data(setup["data"], tmp_path),
                               "--query", weights, "--network", NETWORK, "--no-1n",
                               "--json", tmp_path / "r.json"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert [m["embedding_size"] for m in res["models"].values()] == [128]
    # a catalog entry that says otherwise: one line naming the file
    catalog = tmp_path / "c.yaml"
    catalog.write_text(yaml.safe_dump({"models": {"zoo": {"path": str(weights), "network": NETWORK,
                                                          "embedding_size": 512}}}))
    code, _, err = _run(tool, ["--config", catalog, *_data(setup["data"], tmp_path), "--query", "zoo"],
                        capsys)
    assert code == 2
    error_line(err, "models.zoo", "model.pt", "128-d", "512-d")


def test_missing_image_with_models(tool, setup, capsys, tmp_path):
    data = _copy_data(setup["data"], tmp_path / "data")
    meta = ijb.load_ijb_meta(data)
    # remove every image of one probe template: that template and its pairs must go
    probe = int(meta.probes.template_ids[0])
    faces = np.flatnonzero(meta.template_ids == probe)
    for i in faces:
        (data / "IJBC" / "loose_crop" / meta.image_names[i]).unlink()
    catalog = _catalog(tmp_path / "c.yaml", data, tmp_path / "cache", setup["runs"])
    argv = ["--config", catalog, "--query", "old", "--json", tmp_path / "r.json"]
    code, _, err = _run(tool, argv, capsys)
    assert code == 2
    error_line(err, meta.image_names[faces[0]], "loose_crop")
    code, _, err = _run(tool, [*argv, "--allow-missing"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    pairs_of_probe = int(((meta.pair_t1 == probe) | (meta.pair_t2 == probe)).sum())
    assert res["skipped"]["images_missing"] == faces.size
    assert res["skipped"]["templates_without_images"] == 1
    assert res["skipped"]["pairs_without_images"] == pairs_of_probe
    assert res["skipped"]["probes_without_images"] == 1
    assert res["1:1"]["num_pairs"] == meta.pair_t1.size - pairs_of_probe
    assert res["1:N"]["G1"]["num_probes"] == meta.probes.template_ids.size - 1


@pytest.fixture(scope="module")
def fct_catalog(synthetic_tiny, tmp_path_factory) -> tuple[Path, dict]:
    """A catalog naming old, new and an (untrained) transformation between them, and their models."""
    root = tmp_path_factory.mktemp("eval_ijbc_fct")
    models = make_gallery_models(root / "models")
    return write_gallery_catalog(root, synthetic_tiny, models), models


def test_a_transformation_named_in_the_catalog(tool, fct_catalog, tmp_path, capsys):
    """``{transform: DIR}`` in the catalog: ``--query new --gallery fct`` evaluates the upgraded
    gallery, a transformation is no query model in the matrix, and one trained on other old weights is
    refused in one line."""
    catalog, models = fct_catalog
    transform = models["dirs"]["fct"]
    out = tmp_path / "r.json"
    assert tool.main(["--config", str(catalog), "--query", "new", "--gallery", "fct", "--no-1n",
                      "--json", str(out)]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert {"new|fct", "fct|new", "new|new", "fct|fct"} <= set(result["matrix"])
    assert result["models"]["fct"]["network"] == "fct"
    out = tmp_path / "m.json"
    assert tool.main(["--config", str(catalog), "--matrix", "old,new,fct", "--no-1n",
                      "--json", str(out)]) == 0, capsys.readouterr().err
    assert "fct|new" in json.loads(out.read_text())["matrix"]  # verdicts: tests/pipelines/test_report.py

    # The old model's weights changed after h was trained: refused, in one line.
    moved = tmp_path / "old_changed"
    make_run_dir(moved, seed=9, embedding_size=OLD_DIM)
    meta = json.loads((Path(transform) / "fct.json").read_text())
    fake = tmp_path / "fct_changed"
    shutil.copytree(transform, fake)
    meta["models"]["old"]["weights"] = str(moved / "model.pt")
    (fake / "fct.json").write_text(json.dumps(meta))
    capsys.readouterr()
    argv = ["--config", str(catalog), "--query", "new", "--gallery", str(fake), "--no-1n"]
    assert tool.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "trained on the old model" in errors[0]


@pytest.mark.timeout(180)
def test_torchrun_two_ranks_equals_one_process(setup, cross, tmp_path):
    """Extraction split over two gloo ranks: same cache contents and same results as one process."""
    catalog = _catalog(tmp_path / "c.yaml", setup["data"], tmp_path / "cache", setup["runs"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(tool_path("eval_ijbc")), "--config", str(catalog), "--query", "old", "--no-1n",
           "--json", str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = np.load(tmp_path / "cache" / "features" / "old" / "IJBC.npy")
    one = np.load(setup["cache"] / "features" / "old" / "IJBC.npy")
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-4)
    res = json.loads((tmp_path / "r.json").read_text())
    single = cross["json"]
    assert res["1:1"]["num_pairs"] == single["matrix"]["old|old"]["1:1"]["num_pairs"]
    for key, value in single["matrix"]["old|old"]["1:1"]["tar_at_far_strict"].items():
        assert res["1:1"]["tar_at_far_strict"][key] == pytest.approx(value, abs=0.02)


def test_help_names_the_main_arguments(capsys):
    text = tool_help("eval_ijbc", capsys)
    for arg in ("--query", "--gallery", "--matrix", "--config", "--query-features"):
        assert arg in text, arg
