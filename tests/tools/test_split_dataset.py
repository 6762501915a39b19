"""tools/split_dataset.py: the lists and the table of a split, and the one-line errors (the protocols
themselves: tests/data/test_splits.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.data import SPLIT_CLASS_SIZES, payload_rec
from tests.helpers.tools import exit_status, load_tool, run_tool, tool_help


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    return payload_rec(tmp_path_factory.mktemp("src"), SPLIT_CLASS_SIZES)


def _cli_in_process(args: list[str], capsys) -> tuple[int, str]:
    """Run the tool's main() here (each subprocess pays seconds of torch import)."""
    code = exit_status(load_tool("split_dataset").main, args)
    return code, capsys.readouterr().err


def test_cli_writes_lists_and_table(rec_dir, tmp_path):
    out = tmp_path / "out"
    result = run_tool("split_dataset", str(rec_dir), "--protocol", "opdata", "--seed", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "part" in result.stdout and "relabelled" in result.stdout
    summary = json.loads((out / "split.json").read_text())
    assert summary["protocol"] == "opdata" and summary["seed"] == 1 and summary["format"] == "lists"
    assert (out / "old.lst").is_file() and (out / "new.lst").is_file()


def test_cli_subprocess_bad_input_exits_2(tmp_path):
    result = run_tool("split_dataset", str(tmp_path / "missing.rec"), "--protocol", "opclass", "--out",
                      str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such RecordIO file" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, needle", [
    (["{rec}", "--protocol", "openclass", "--out", "{tmp}/o"], "invalid choice"),
    (["{rec}", "--protocol", "opclass", "--ratio", "1.5", "--out", "{tmp}/o"], "ratio"),
    (["{rec}", "--protocol", "opclass", "--ratio", "abc", "--out", "{tmp}/o"], "ratio"),
    (["{rec}", "--protocol", "opclass", "--out", "{tmp}/busy"], "--force"),
    (["{tmp}/busy/x", "--protocol", "opclass", "--out", "{tmp}/o"], "bad magic"),
    (["{rec}", "--out", "{tmp}/o"], "--protocol"),
    (["{rec}", "--protocol", "opclass", "--out", "{tmp}/busy/x"], "--out: {tmp}/busy/x is a file"),
])
def test_cli_bad_input_exits_2(rec_dir, tmp_path, capsys, args, needle):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("not a rec")
    args = [a.format(rec=rec_dir, tmp=tmp_path) for a in args]
    code, err = _cli_in_process(args, capsys)
    assert code == 2, err
    assert needle.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("split_dataset.py: error: ") and not (tmp_path / "o").exists()


def test_help_names_the_main_arguments(capsys):
    text = tool_help("split_dataset", capsys)
    for arg in ("rec", "--protocol", "--ratio", "--out"):
        assert arg in text, arg
