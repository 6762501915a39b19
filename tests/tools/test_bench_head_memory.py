"""tools/bench_head_memory.py in its own process: the measured peak of one rank's Partial FC head
against head_memory_bytes, and a one-line error."""

from __future__ import annotations

import json

from tests.helpers.tools import run_tool, tool_help


def test_head_memory_bench_measures_the_formula_peak():
    """tools/bench_head_memory.py in its own process (the peak is the process's): one rank of 2M
    classes over 8 ranks at ρ 0.1 peaks where head_memory_bytes says (1.48 GiB), within 5%."""
    out = run_tool("bench_head_memory", "--json", timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["num_local"] == 250_000 and result["formula_gib"] > 1.4
    assert abs(result["measured_gib"] / result["formula_gib"] - 1.0) < 0.05, result
    bad = run_tool("bench_head_memory", "--sample-rate", "2")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "2" in bad.stderr


def test_help_names_the_main_arguments(capsys):
    text = tool_help("bench_head_memory", capsys)
    for arg in ("--num-classes", "--world-size", "--sample-rate"):
        assert arg in text, arg
