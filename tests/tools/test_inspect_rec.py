"""tools/inspect_rec.py as users run it: the dump against the fixtures' manifest, the summary, the
one-line errors."""

from __future__ import annotations

import hashlib
import json

from tests.helpers import SHARED_FIXTURES
from tests.helpers.tools import run_tool, tool_help

FIXTURES = SHARED_FIXTURES / "recordio"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def test_inspect_dump_matches_manifest():
    out = run_tool("inspect_rec", str(FIXTURES / "misc.rec"), "--dump")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    expected = MANIFEST["misc"]["records"]
    assert [r["key"] for r in rows] == [e["key"] for e in expected]
    for row, e in zip(rows, expected):
        assert set(row) == {"key", "flag", "label", "id", "id2", "payload_len", "payload_sha1"}
        fields = ("flag", "label", "id", "id2")
        assert [row[f] for f in fields] == [e[f] for f in fields]
        if "payload_hex" in e:
            payload = bytes.fromhex(e["payload_hex"])
            assert row["payload_len"] == len(payload)
            assert row["payload_sha1"] == hashlib.sha1(payload).hexdigest()


def test_inspect_summary_and_bad_file(tmp_path):
    out = run_tool("inspect_rec", str(FIXTURES / "train.rec"), "--json", "--decode")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["layout"], summary["images"], summary["classes"]) == ("insightface", 9, 3)
    broken = tmp_path / "train.rec"
    broken.write_bytes((FIXTURES / "train.rec").read_bytes()[:5000])
    (tmp_path / "train.idx").write_bytes((FIXTURES / "train.idx").read_bytes())
    out = run_tool("inspect_rec", str(broken))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("inspect_rec.py: error: ") and str(broken) in last and "key 6" in last
    assert "truncated" in last


def test_inspect_bad_arguments_are_one_line(tmp_path):
    for args, needle in (([str(tmp_path / "absent.rec")], "no such RecordIO file"),
                         ([str(FIXTURES / "train.rec"), "--idx", str(tmp_path / "no.idx")], "--idx: "),
                         ([str(FIXTURES / "train.rec"), "--json", str(tmp_path)], "is a directory")):
        out = run_tool("inspect_rec", *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert lines[0].startswith("inspect_rec.py: error: ") and needle in lines[0], lines


def test_inspect_json_to_a_file(tmp_path):
    out = run_tool("inspect_rec", str(FIXTURES / "train.rec"), "--json", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "s.json").read_text())["images"] == 9
    assert "images" in out.stdout  # the table is still printed


def test_help_names_the_main_arguments(capsys):
    text = tool_help("inspect_rec", capsys)
    for arg in ("rec", "--dump", "--json"):
        assert arg in text, arg
