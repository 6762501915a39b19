"""tools/bench_fct.py: both timings in one run, per-1M figures consistent with the measured rates."""

from __future__ import annotations

import json

import pytest

from tests.helpers.models import single_thread
from tests.helpers.tools import load_tool, tool_help


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def test_bench_fct_json(capsys):
    tool = load_tool("bench_fct")
    argv = ["--network", "r18-w0.125", "--old-dim", "16", "--side-dim", "8", "--new-dim", "16",
            "--hidden", "32", "--rows", "3000", "--chunk", "1000", "--images", "4", "--batch", "2",
            "--device", "cpu"]
    assert tool.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    t, r = out["transform"], out["reextract"]
    assert t["rows"] == 3000 and r["images"] == 4 and out["device"] == "cpu"
    assert t["s_per_1m"] == pytest.approx(t["seconds"] / 3000 * 1e6, rel=1e-2)
    assert r["s_per_1m"] == pytest.approx(r["seconds"] / 4 * 1e6, rel=1e-2)
    assert out["ratio"] == pytest.approx(r["s_per_1m"] / t["s_per_1m"], rel=0.02)
    assert tool.main(argv) == 0
    assert "re-extraction / transformation" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        tool.main([*argv, "--side-dim", "-1"])
    assert exc.value.code == 2


def test_bench_fct_bad_input_is_one_line(capsys, tmp_path):
    tool = load_tool("bench_fct")
    base = ["--rows", "10", "--chunk", "10", "--images", "2", "--batch", "2", "--device", "cpu"]
    assert tool.main([*base, "--network", "r19"]) == 2  # after parsing: the registry says
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_fct.py: error: --network: unknown backbone 'r19'"), err
    for bad, needle in ((["--side-dim", "-1"], "--side-dim: must be >= 0"),
                        (["--json", str(tmp_path)], "is a directory"),
                        (["--hidden", "32,x"], "--hidden")):
        with pytest.raises(SystemExit) as exc:
            tool.main([*base, *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_help_names_the_main_arguments(capsys):
    text = tool_help("bench_fct", capsys)
    for arg in ("--network", "--rows", "--images", "--json"):
        assert arg in text, arg
