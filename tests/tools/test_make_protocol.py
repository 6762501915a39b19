"""tools/make_protocol.py as users run it: a face folder and a verification .bin turned into IJB-C-style
folders that tools/certify.py evaluates unchanged, the table and next command it prints, and its
one-line refusals."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest

from facecompat.data.pairs_bin import write_pairs_bin
from facecompat.eval import ijb
from tests.helpers.data import subject_features, write_faces
from tests.helpers.errors import error_line
from tests.helpers.tools import exit_status, load_tool, tool_help


@pytest.fixture(scope="module")
def tool():
    return load_tool("make_protocol")


def test_help_explains_the_protocol(capsys):
    text = tool_help("make_protocol", capsys)
    for flag in ("--faces", "--landmarks", "--bin", "--out", "--seed", "--gallery-share", "--probe-templates",
                 "--min-impostors", "--json", "--force"):
        assert flag in text
    assert "tools/certify.py" in text and "non-mated" in text


def test_face_folder_then_certify(tool, tmp_path, capsys):
    faces = write_faces(tmp_path / "faces", num_ids=42)
    out = tmp_path / "protocol"
    assert exit_status(tool.main, ["--faces", faces, "--out", out, "--json", tmp_path / "p.json"]) == 0
    stdout = capsys.readouterr().out
    record = json.loads((tmp_path / "p.json").read_text())
    assert record == json.loads((out / "protocol.json").read_text()) | {"reused": False}
    counts = record["counts"]
    table = dict(re.fullmatch(r"(.+?) {2,}(\S+)", line).groups() for line in stdout.splitlines()[1:-1])
    assert table["genuine pairs"] == f"{counts['genuine_pairs']:,}"
    assert table["impostor pairs"] == f"{counts['impostor_pairs']:,}"
    assert {"identities (with images)", "probes mated in neither", "empty folders (skipped)"} <= set(table)
    assert stdout.splitlines()[-1] == f"next: python tools/certify.py --old OLD --new NEW --data-root {out}"
    assert exit_status(tool.main, ["--faces", faces, "--out", out]) == 0
    assert "verified (already there, nothing written)" in capsys.readouterr().out

    # the certificate runs on it unchanged (precomputed features: subject centres plus noise)
    meta = ijb.load_ijb_meta(out, "IJBC")
    for name, noise in (("old", 0.8), ("good", 0.1)):
        np.save(tmp_path / f"{name}.npy", subject_features(meta, 0, noise=noise))
    argv = ["--old", "old", "--new", "good", "--old-features", tmp_path / "old.npy", "--new-features",
            tmp_path / "good.npy", "--data-root", out, "--replicates", "30", "--json", tmp_path / "cert.json"]
    assert exit_status(load_tool("certify").main, argv) == 0
    test_set = json.loads((tmp_path / "cert.json").read_text())["test_set"]
    assert test_set["subjects_from"] == "1:N subject ids" and test_set["subjects"] == counts["identities"]
    assert (test_set["genuine_pairs"], test_set["impostor_pairs"]) == (counts["genuine_pairs"],
                                                                        counts["impostor_pairs"])
    assert test_set["resolved_fars"]


def test_bin_to_folder(tool, synthetic_tiny, tmp_path, capsys):
    out = tmp_path / "lfw"
    assert exit_status(tool.main, ["--bin", synthetic_tiny / "lfw.bin", "--out", out, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)  # --json alone: only the JSON on stdout
    assert record["kind"] == "bin" and record["counts"]["pairs"] == 40
    assert not ijb.load_ijb_meta(out, "IJBC").has_1n
    argv = ["--bin", synthetic_tiny / "lfw.bin", "--out", tmp_path / "b", "--seed", 3]
    assert exit_status(tool.main, argv) == 0
    captured = capsys.readouterr()
    assert "1:N: none" in captured.out and "--seed has no effect with --bin" in captured.err


def test_bin_then_certify(tool, tmp_path, capsys):
    """A .bin large enough to resolve FAR 0.1: subjects from genuine-pair components, no 1:N."""
    rng = np.random.default_rng(0)
    jpegs = [cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), np.uint8))[1].tobytes()
             for _ in range(200)]
    index = [*range(120), *rng.integers(0, 200, (300, 2)).ravel().tolist()]  # 60 genuine, 300 impostor
    write_pairs_bin(tmp_path / "v.bin", [jpegs[i] for i in index], [True] * 60 + [False] * 300)
    out = tmp_path / "v"
    assert exit_status(tool.main, ["--bin", tmp_path / "v.bin", "--out", out]) == 0
    num_faces = ijb.load_ijb_meta(out, "IJBC").num_faces
    for name in ("old", "new"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((num_faces, 8)).astype(np.float32))
    argv = ["--old", "old", "--new", "new", "--old-features", tmp_path / "old.npy", "--new-features",
            tmp_path / "new.npy", "--data-root", out, "--replicates", "20", "--json", tmp_path / "cert.json"]
    assert exit_status(load_tool("certify").main, argv) == 0, capsys.readouterr().err
    test_set = json.loads((tmp_path / "cert.json").read_text())["test_set"]
    assert test_set["subjects_from"] == "genuine-pair components"
    assert (test_set["genuine_pairs"], test_set["impostor_pairs"]) == (60, 300)


@pytest.mark.parametrize("case", ["bad image", "bad bin", "both sources", "landmarks with bin"])
def test_bad_input_exits_2_with_one_line(case, tool, tmp_path, capsys):
    faces = write_faces(tmp_path / "faces", num_ids=3)
    (tmp_path / "x.bin").write_bytes(b"garbage")
    out = tmp_path / "out"
    argv, names = {
        "bad image": (["--faces", faces], ["make_protocol.py: error:", "not a decodable image"]),
        "bad bin": (["--bin", tmp_path / "x.bin"], ["x.bin: not a readable pickle"]),
        "both sources": (["--faces", faces, "--bin", tmp_path / "x.bin"], ["not allowed with"]),
        "landmarks with bin": (["--bin", tmp_path / "x.bin", "--landmarks", tmp_path / "m.txt"],
                               ["--landmarks goes with --faces"]),
    }[case]
    if case == "bad image":
        (faces / "id01" / "9.jpg").write_bytes(b"not a jpeg")
    assert exit_status(tool.main, [*argv, "--out", out]) == 2
    error_line(capsys.readouterr().err, *names, alone=True)
    assert not out.exists()
