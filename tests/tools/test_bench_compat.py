"""tools/bench_compat.py: a run with its table and JSON report, the default method list, one-line errors.
No timing is asserted (the benchmark itself: tests/train/test_bench_compat.py)."""

from __future__ import annotations

import pytest

from facecompat.compat.registry import list_methods
from tests.helpers.models import single_thread
from tests.helpers.tools import load_tool, tool_help

# One torch thread (a shared CI machine oversubscribes two), restored afterwards.
_one_thread = pytest.fixture(autouse=True)(single_thread)


def test_cli_runs_and_writes_json(tmp_path, capsys):
    tool = load_tool("bench_compat")
    argv = ["--methods", "bct", "--network", "r18-w0.125", "--embedding-size", "32", "--batch-size", "8",
            "--num-classes", "50", "--steps", "1", "--warmup", "0", "--rounds", "1", "--device", "cpu",
            "--workdir", str(tmp_path), "--json", str(tmp_path / "out" / "r.json")]
    assert tool.main(argv) == 0
    assert "bct" in capsys.readouterr().out  # the table is printed too
    import json

    result = json.loads((tmp_path / "out" / "r.json").read_text())
    assert list(result["methods"]) == ["none", "bct"] and result["batch_size"] == 8
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # the temporary bank is removed


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "none,bct,mixbtc"], "--methods: unknown method 'mixbtc' (valid: all, or some of none, "
                                       "advbct, bct, l2, lce, mixbct)"),
    (["--num-records", "5"], "--num-records (5) must be >= --num-classes (10): every class needs a record"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--warmup", "-1"], "--warmup: must be >= 0"),
    (["--network", "r19"], "--network: unknown backbone 'r19'"),
    (["--workdir", "/nonexistent/dir"], "--workdir: /nonexistent/dir: not a writable folder"),
    (["--device", "cuda"], "--device: cuda: CUDA is not available here"),  # tests hide CUDA
])
def test_cli_errors_are_one_line(capsys, argv, needle):
    tool = load_tool("bench_compat")
    with pytest.raises(SystemExit) as exc:
        tool.main(["--num-classes", "10", "--batch-size", "8", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("bench_compat.py: error: "), err
    assert needle in err[0], err


def test_default_methods_are_every_registered_one():

    tool = load_tool("bench_compat")
    assert tool.build_parser().parse_args([]).methods == "all"
    assert tool.selected_methods("all") == ["none", *list_methods()]
    assert set(list_methods()) >= {"bct", "l2", "mixbct", "lce", "advbct"}
    assert tool.selected_methods("bct, l2,") == ["bct", "l2"]


def test_help_names_the_main_arguments(capsys):
    text = tool_help("bench_compat", capsys)
    for arg in ("--methods", "--network", "--steps", "--json"):
        assert arg in text, arg
