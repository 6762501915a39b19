"""What every tool shares: flag types, output paths checked before the work, JSON output, and
the one way a tool ends on a user's error."""

from __future__ import annotations

import argparse
import json

import pytest

from facecompat import cli
from facecompat.errors import UserError


def _parser() -> cli.OneLineParser:
    parser = cli.OneLineParser(prog="tool.py")
    parser.add_argument("--workers", type=cli.non_negative_int)
    cli.add_json_arg(parser)
    cli.add_device_arg(parser)
    return parser


def test_flags_are_checked_at_parse_time_in_one_line(tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["--workers", "0", "--json"])
    assert args.workers == 0 and str(args.json) == "-" and args.device is None
    target = tmp_path / "new" / "out.json"
    assert parser.parse_args(["--json", str(target)]).json == target
    for argv, message in ((["--workers", "-1"], "--workers: must be >= 0, got -1"),
                          (["--json", str(tmp_path)], f"--json: {tmp_path} is a directory"),
                          (["--workers", "two"], "not an integer: 'two'")):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_write_json_to_stdout_or_a_file_atomically(tmp_path, capsys):
    cli.write_json({"a": 1}, argparse.Namespace(json=None).json)
    assert capsys.readouterr().out == ""
    cli.write_json({"a": 1}, cli.output_file("-"))
    assert json.loads(capsys.readouterr().out) == {"a": 1}
    out = tmp_path / "deep" / "r.json"
    cli.write_json({"b": [1, 2]}, out)
    assert json.loads(out.read_text()) == {"b": [1, 2]}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_run_main_turns_user_errors_into_one_line_and_keeps_bugs(capsys):
    class BadInput(UserError, ValueError):
        pass

    def user_error() -> int:
        raise BadInput("--declare bct=old: no such model 'old'")

    assert cli.run_main("tool.py", user_error) == 2
    assert capsys.readouterr().err == "tool.py: error: --declare bct=old: no such model 'old'\n"
    assert cli.run_main("tool.py", lambda: None) == 0

    def bug() -> int:
        raise ValueError("a bug, not the user's input")

    with pytest.raises(ValueError, match="a bug"):
        cli.run_main("tool.py", bug)


def test_far_value_takes_one_rate_in_the_open_unit_interval():
    import argparse

    from facecompat.cli import far_value

    assert far_value("1e-3") == 0.001
    for bad in ("0", "1", "-0.1", "x", "0.1,0.2"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected a FAR in \\(0, 1\\), got {bad!r}"):
            far_value(bad)
