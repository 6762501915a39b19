"""tools/eval_verification.py: self and cross tests, table, JSON and errors (model specs:
tests/models/test_spec.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.errors import error_line
from tests.helpers.models import make_run_dir
from tests.helpers.tools import load_tool, run_tool, tool_help

NETWORK, EMBEDDING_SIZE = "r18-w0.125", 32


@pytest.fixture(scope="module")
def tool():
    return load_tool("eval_verification")


def _make_run_dir(path: Path, seed: int) -> Path:
    return make_run_dir(path, seed, NETWORK, EMBEDDING_SIZE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval_verification_runs")
    return _make_run_dir(root / "old", 0), _make_run_dir(root / "new", 1)


@pytest.fixture(scope="module")
def lfw(synthetic_tiny, tmp_path_factory) -> Path:
    """20 of synthetic_tiny's lfw.bin pairs (every genuine one, then impostors): half the CPU time."""
    from facecompat.data.pairs_bin import load_pairs_bin, write_pairs_bin

    images, issame = load_pairs_bin(synthetic_tiny / "lfw.bin")
    genuine = [i for i, same in enumerate(issame) if same]
    impostor = [i for i, same in enumerate(issame) if not same]
    keep = sorted(genuine[:10] + impostor[: 20 - len(genuine[:10])])
    assert len(keep) == 20 and 0 < sum(issame[i] for i in keep) < 20
    path = tmp_path_factory.mktemp("eval_verification_bins") / "lfw.bin"
    pair_images = [images[j] for i in keep for j in (2 * i, 2 * i + 1)]
    write_pairs_bin(path, pair_images, [bool(issame[i]) for i in keep])
    return path


def test_self_table_and_json(tool, runs, lfw, tmp_path, capsys):
    old, _ = runs
    out = tmp_path / "res" / "self.json"
    assert tool.main(["--model", str(old), "--bins", str(lfw), "--device", "cpu", "--batch-size", "32",
                      "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "set" in stdout and "accuracy" in stdout and "threshold" in stdout
    assert any(line.split()[:3] == ["lfw", "A", "A"] for line in stdout.splitlines()), stdout
    results = json.loads(out.read_text())
    assert list(results) == ["lfw"] and list(results["lfw"]) == ["A|A"]
    res = results["lfw"]["A|A"]
    assert 0.0 <= res["accuracy"] <= 1.0 and res["num_pairs"] == 20
    assert res["query"] == res["gallery"] == str(old)
    assert not list(out.parent.glob(".*tmp"))  # written atomically, nothing left behind


def test_cross_reports_self_rows_and_same_model_equals_self(tool, runs, lfw, tmp_path, capsys):
    old, new = runs
    out = tmp_path / "cross.json"
    assert tool.main(["--model", str(new), "--gallery-model", str(old / "model.pt"),
                      "--gallery-network", NETWORK, "--gallery-embedding-size", str(EMBEDDING_SIZE),
                      "--bins", str(lfw), "--device", "cpu", "--no-flip", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = [line.split()[:3] for line in stdout.splitlines()]
    assert ["lfw", "A", "A"] in rows and ["lfw", "B", "B"] in rows and ["lfw", "A", "B"] in rows
    cross = json.loads(out.read_text())["lfw"]
    assert list(cross) == ["A|A", "B|B", "A|B"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in cross.values())
    assert cross["A|B"]["query"] == str(new) and cross["A|B"]["gallery"] == str(old / "model.pt")

    # One model on both sides: the cross row is the self test.
    same = tmp_path / "same.json"
    assert tool.main(["--model", str(old), "--gallery-model", str(old), "--bins", str(lfw),
                      "--device", "cpu", "--no-flip", "--json", str(same)]) == 0
    capsys.readouterr()
    rows = json.loads(same.read_text())["lfw"]
    for key in ("accuracy", "accuracy_std", "threshold"):
        assert rows["A|B"][key] == pytest.approx(rows["A|A"][key], abs=1e-9)
        assert rows["B|B"][key] == pytest.approx(rows["A|A"][key], abs=1e-9)
    assert rows["A|A"]["accuracy"] == pytest.approx(cross["B|B"]["accuracy"])  # old as A here, B above


@pytest.mark.parametrize("case", ["missing_bin", "pt_without_network", "wrong_network", "unknown_network",
                                  "not_a_run_dir", "bad_weights", "bad_bin"])
def test_bad_inputs_exit_2_with_one_line(tool, runs, lfw, tmp_path, capsys, case):
    old, _ = runs
    weights = str(old / "model.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    bad_bin = tmp_path / "bad.bin"
    bad_bin.write_text("{}")
    argv, culprit = {
        "missing_bin": (["--model", str(old), "--bins", str(lfw), str(tmp_path / "agedb_30.bin")],
                        "agedb_30.bin"),
        "pt_without_network": (["--model", weights, "--bins", str(lfw)], weights),
        "wrong_network": (["--model", weights, "--network", "r18", "--bins", str(lfw)], weights),
        "unknown_network": (["--model", str(old), "--gallery-model", weights, "--gallery-network", "r7",
                             "--bins", str(lfw)], "r7"),
        "not_a_run_dir": (["--model", str(tmp_path), "--bins", str(lfw)], str(tmp_path)),
        "bad_weights": (["--model", str(junk), "--network", NETWORK, "--bins", str(lfw)], str(junk)),
        "bad_bin": (["--model", str(old), "--bins", str(bad_bin)], str(bad_bin)),
    }[case]
    assert tool.main([*argv, "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error_line(captured.err, culprit, alone=True)


def test_cli_subprocess(runs, lfw, tmp_path):
    old, _ = runs
    out = tmp_path / "cli.json"
    ok = run_tool("eval_verification", "--model", str(old), "--bins", str(lfw), "--device", "cpu",
                  "--no-flip", "--json", str(out))
    assert ok.returncode == 0, ok.stderr
    assert "lfw" in ok.stdout and 0.0 <= json.loads(out.read_text())["lfw"]["A|A"]["accuracy"] <= 1.0
    bad = run_tool("eval_verification", "--model", str(old), "--bins", str(lfw), "--batch-size", "0")
    assert bad.returncode == 2
    error_line(bad.stderr, "--batch-size", alone=True)


def test_json_bare_prints_the_results_instead_of_the_table(tool, runs, lfw, capsys):
    old, _ = runs
    assert tool.main(["--model", str(old), "--bins", str(lfw), "--device", "cpu", "--no-flip", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert list(results["lfw"]) == ["A|A"] and 0.0 <= results["lfw"]["A|A"]["accuracy"] <= 1.0


@pytest.mark.parametrize("extra, culprit", [
    (["--json", "{dir}"], "--json"), (["--device", "cuda:7"], "--device"), (["--device", "tpu"], "--device"),
    (["--batch-size", "-1"], "--batch-size")])
def test_bad_flags_fail_before_the_work(tool, runs, tmp_path, capsys, extra, culprit):
    """A directory for --json, a device that is not there, a bad count: one line, exit status 2, before
    any model or set is read (the set named here does not exist)."""
    old, _ = runs
    argv = ["--model", str(old), "--bins", str(tmp_path / "missing.bin"),
            *[a.replace("{dir}", str(tmp_path)) for a in extra]]
    try:
        code = tool.main(argv)
    except SystemExit as exit_:  # refused by argparse
        code = exit_.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error_line(captured.err, culprit, alone=True)


def test_help_names_the_main_arguments(capsys):
    text = tool_help("eval_verification", capsys)
    for arg in ("--model", "--gallery-model", "--bins"):
        assert arg in text, arg
