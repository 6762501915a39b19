"""tools/bench_bank.py: two reader processes over one small bank, memory-mapped and copied; its report
and its one-line errors. No memory figure is asserted beyond being measured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.tools import run_tool, tool_help


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_tool("bench_bank", *args, timeout=300, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="needs Linux smaps_rollup")
def test_bench_bank_reports_both_approaches(tmp_path):
    out = _run("--rows", "2000", "--dim", "8", "--batch", "64", "--dir", str(tmp_path),
               "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    assert "memmap (page cache)" in out.stdout and "full copy per process" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["rows"] == 2000 and result["dim"] == 8
    for mode in ("memmap", "copy"):
        assert len(result[mode]["pss_mb"]) == 2 and all(v > 0 for v in result[mode]["rows_per_s"])
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]  # the bank is removed


@pytest.mark.parametrize("args, needle", [
    (["--rows", "0"], "--rows: must be >= 1"),
    (["--dir", "/nonexistent/dir"], "--dir: /nonexistent/dir: not a writable folder"),
    (["--json", "/"], "--json: / is a directory"),
])
def test_bench_bank_bad_arguments_are_one_line(args, needle):
    out = _run(*args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("bench_bank.py: error: "), lines
    assert needle in lines[0], lines


def test_help_names_the_main_arguments(capsys):
    text = tool_help("bench_bank", capsys)
    for arg in ("--rows", "--dim", "--dir", "--json"):
        assert arg in text, arg
