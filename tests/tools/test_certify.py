"""tools/certify.py: the certificate files from precomputed features of a generated IJB-C folder, and
its refusals (one line, exit status 2, before any evaluation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facecompat.eval import ijb
from tests.helpers.data import subject_features, write_ijb_meta
from tests.helpers.errors import error_line
from tests.helpers.tools import exit_status, load_tool, tool_help


@pytest.fixture(scope="module")
def tool():
    return load_tool("certify")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A meta-only IJB-C folder of 40 subjects: 80 genuine and 3,120 impostor pairs (FAR 1e-2 resolved)."""
    return write_ijb_meta(tmp_path_factory.mktemp("certify_data") / "IJBC", 40)


@pytest.fixture(scope="module")
def feats(data_root, tmp_path_factory):
    """old: subject centres + much noise; good: the same centres, little noise; other: another space."""
    meta = ijb.load_ijb_meta(data_root, "IJBC")
    root = tmp_path_factory.mktemp("certify_features")
    arrays = {"old": subject_features(meta, 0, noise=0.8), "good": subject_features(meta, 0, noise=0.1),
              "other": subject_features(meta, 7, noise=0.1)}
    paths = {}
    for name, arr in arrays.items():
        paths[name] = root / f"{name}.npy"
        np.save(paths[name], arr)
    return paths


def _argv(data_root, feats, *extra):
    return ["--old", "old", "--new", "good,other", "--old-features", feats["old"],
            "--new-features", f"{feats['good']},{feats['other']}", "--data-root", data_root,
            "--replicates", "50", *extra]


def test_help_names_the_main_arguments(capsys):
    text = tool_help("certify", capsys)
    for flag in ("--old", "--new", "--independent", "--far", "--replicates", "--out", "--json", "--md"):
        assert flag in text
    assert "bootstrap over" in text and "too close to call" in text


def test_writes_the_certificate(tool, data_root, feats, tmp_path, capsys):
    out = tmp_path / "cert"
    assert exit_status(tool.main, _argv(data_root, feats, "--out", out)) == 0
    stdout = capsys.readouterr().out
    cert = json.loads((out / "certificate.json").read_text())
    assert set(cert) >= {"test_set", "cells", "verdicts", "churn", "parity", "matrix", "thresholds",
                         "decision", "fingerprints"}
    assert set(cert["test_set"]) >= {"subjects", "templates", "genuine_pairs", "impostor_pairs"}
    far = cert["operating_far"]
    assert far in cert["test_set"]["resolved_fars"]
    assert set(cert["cells"]["good|old"]["1:1"][far]) == {"tar", "tar_ci", "threshold", "threshold_ci"}
    assert cert["verdicts"]["other"][far]["ecc"] is False
    assert cert["decision"]["other"]["decision"] == "incompatible"
    assert cert["verdicts"]["good"][far]["margin"] >= 0
    assert set(cert["churn"]["good"][far]) >= {"negative_flip_rate", "negative_flip_rate_new"}
    assert "good" in cert["churn"]["1:N"]
    assert any(k.startswith("data ") for k in cert["fingerprints"])
    title = "# Upgrade certificate: good, other against the old"
    assert (out / "certificate.md").read_text().startswith(title)
    assert (out / "scores_good.png").stat().st_size > 0 and (out / "scores_other.png").stat().st_size > 0
    assert stdout.splitlines()[0].startswith("candidate") and "incompatible" in stdout


def test_json_on_stdout(tool, data_root, feats, capsys):
    assert exit_status(tool.main, _argv(data_root, feats, "--json")) == 0
    cert = json.loads(capsys.readouterr().out)
    assert cert["format"] == "facecompat-certificate" and cert["candidates"] == ["good", "other"]


@pytest.mark.parametrize("extra,names", [
    (["--far", "1e-6"], ["--far 1e-06", "cannot resolve"]),
    (["--new-features", "x.npy"], ["--new-features", "1 files for 2"]),
    (["--independent", "good"], ["--independent", "--independent-features"]),
])
def test_refusals(tool, data_root, feats, capsys, extra, names):
    assert exit_status(tool.main, _argv(data_root, feats, *extra)) == 2
    error_line(capsys.readouterr().err, *names)


def test_parity_needs_models(tool, data_root, feats, capsys):
    assert exit_status(tool.main, _argv(data_root, feats, "--parity")) == 2
    error_line(capsys.readouterr().err, "--parity needs models")


def test_old_as_candidate_and_bad_outputs(tool, data_root, feats, capsys, tmp_path):
    argv = ["--old", "old", "--new", "old", "--old-features", feats["old"], "--new-features", feats["old"],
            "--data-root", data_root]
    assert exit_status(tool.main, argv) == 2
    error_line(capsys.readouterr().err, "--new old", "reference")
    (tmp_path / "md").mkdir()
    assert exit_status(tool.main, _argv(data_root, feats, "--md", tmp_path / "md")) == 2
    error_line(capsys.readouterr().err, "--md")


def test_own_faces_become_the_test_set(tool, tmp_path, capsys, synthetic_tiny):
    """--faces DIR: the folder is written as an IJB-C-style set under --out/protocol (seeded, recorded in
    protocol.json) and certified with the models, features cached under --out/cache."""
    from tests.helpers.data import write_faces
    from tests.helpers.models import make_run_dir

    faces = write_faces(tmp_path / "faces", num_ids=42)
    old = make_run_dir(tmp_path / "old", seed=0, network="r18-w0.0625", embedding_size=16)
    new = make_run_dir(tmp_path / "new", seed=1, network="r18-w0.0625", embedding_size=16)
    out = tmp_path / "cert"
    argv = ["--old", old, "--new", new, "--faces", faces, "--out", out, "--replicates", "20",
            "--workers", "0"]
    assert exit_status(tool.main, argv) == 0, capsys.readouterr().err
    cert = json.loads((out / "certificate.json").read_text())
    protocol = json.loads((out / "protocol" / "protocol.json").read_text())
    assert cert["test_set"]["genuine_pairs"] == protocol["counts"]["genuine_pairs"]
    assert cert["test_set"]["subjects_from"] == "1:N subject ids" and (out / "cache").is_dir()
    assert cert["versions"][str(new)].startswith("r18-w0.0625-")
    capsys.readouterr()
    # a .bin too small to resolve any FAR is refused with the reason; one test set at a time
    code = exit_status(tool.main, ["--old", old, "--new", new, "--bin", synthetic_tiny / "lfw.bin",
                                   "--out", tmp_path / "bin", "--workers", "0"])
    assert code == 2
    error_line(capsys.readouterr().err, "is resolved by", "impostor pairs")
    assert exit_status(tool.main, [*argv, "--data-root", tmp_path]) == 2
    error_line(capsys.readouterr().err, "give one test set")
