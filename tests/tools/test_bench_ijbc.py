"""tools/bench_ijbc.py on a small IJB-C-shaped meta folder (the sizes patched down), and its one-line
errors for bad flags and outputs, before the work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.helpers.tools import load_tool, tool_path

TOOL = tool_path("bench_ijbc")


@pytest.fixture
def bench(monkeypatch):
    module = load_tool("bench_ijbc")
    monkeypatch.setattr(module, "FULL", {"faces": 3_000, "templates": 300, "pairs": 20_000, "genuine": 400,
                                         "subjects": 60})
    monkeypatch.setattr(module, "GALLERY_SIZES", {"G1": 20, "G2": 20})
    return module


def test_small_bench_table_and_json(bench, tmp_path, capsys):
    """Every phase timed, the insightface-style reference agreeing, the JSON file beside the table;
    a second run reuses the meta folder."""
    out = tmp_path / "out" / "bench.json"
    argv = ["--data-dir", str(tmp_path / "data"), "--pairs", "2000", "--reference", "--json", str(out)]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    assert "IJB-C 1:1 bench: 3,000 faces, 300 templates, 2,000 pairs" in captured.out
    assert "reference agrees" in captured.out and "writing an IJB-C-sized meta folder" in captured.err
    res = json.loads(out.read_text())
    assert res["pairs"] == 2000 and res["genuine"] == 40 and res["tar_agree_abs"] < 1e-6
    assert set(res["one_n"]) == {"G1", "G2"} and res["total_s"] > 0
    assert bench.main(["--data-dir", str(tmp_path / "data"), "--pairs", "2000", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tar_at_far"] == res["tar_at_far"] and "writing" not in captured.err


@pytest.mark.parametrize("argv, culprit", [
    (["--pairs", "99"], "--pairs"), (["--pairs", "many"], "--pairs"), (["--json", "{tmp}"], "--json"),
    (["--data-dir", "{tmp}/file"], "--data-dir"), (["--data-dir", "{tmp}/file/sub"], "--data-dir")])
def test_bad_flags_one_line_before_the_work(bench, tmp_path, capsys, argv, culprit):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        bench.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("bench_ijbc.py: error: ")
    assert culprit in lines[0]


def test_help_does_not_import_torch():
    code = (f"import runpy, sys; sys.argv = [{str(TOOL)!r}, '--help']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--reference" in done.stdout and "--json" in done.stdout
