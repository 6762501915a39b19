"""tools/bench_train.py: a one-step benchmark of a tiny network reported as JSON, and the one-line
errors (the benchmark itself: tests/train/test_train_parts.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.tools import load_tool, tool_help


def test_bench_train_tool_rejects_an_unknown_network(capsys):
    tool = load_tool("bench_train")
    argv = ["--network", "r18-w0.125", "--embedding-size", "16", "--batch-size", "4", "--num-classes", "10",
            "--steps", "1", "--warmup", "0", "--device", "cpu"]
    assert tool.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["network"] == "r18-w0.125" and result["batch_size"] == 4 and result["samples_per_s"] > 0
    for bad, needle in ((["--network", "r19"], "--network: unknown backbone 'r19'"),
                        (["--warmup", "-1"], "--warmup: must be >= 0"),
                        (["--sample-rate", "0"], "--sample-rate: must be in (0, 1]"),
                        (["--json", "/"], "--json: / is a directory")):
        with pytest.raises(SystemExit) as exc:
            tool.main([*argv, *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("bench_train.py: error: "), err
        assert needle in err[0], err
    with pytest.raises(SystemExit) as exc:
        tool.main(["--device", "gpu0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--device: not a device: 'gpu0'" in err[0]


def test_help_names_the_main_arguments(capsys):
    text = tool_help("bench_train", capsys)
    for arg in ("--network", "--batch-size", "--steps", "--precision"):
        assert arg in text, arg
