"""tools/make_synthetic.py: bad arguments and outputs as one line and exit status 2, a folder the
library generated reported up to date (the generator itself: tests/data/test_synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from facecompat.data.synthetic.sets import generate_synthetic
from tests.helpers.data import SMALL_SYNTHETIC
from tests.helpers.tools import run_tool, tool_help


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SMALL_SYNTHETIC rendered by the library, in this process."""
    root = tmp_path_factory.mktemp("synth")
    assert generate_synthetic(root, SMALL_SYNTHETIC, workers=1, progress=False)[1]
    return root


@pytest.mark.parametrize("args, needle", [
    (["--num-ids", "0"], "--num-ids: must be >= 1"), (["--imgs-per-id", "3:x"], "--imgs-per-id"),
    (["--workers", "0"], "--workers: must be >= 1"), (["--lfw-pairs", "-4"], "--lfw-pairs"),
    (["--imgs-per-id", "9:2"], "--imgs-per-id: must be N or MIN:MAX"),
    (["--ijbc-subjects", "2"], "--ijbc-subjects: must be >= 3"), (["--seed", "-1"], "--seed")])
def test_cli_rejects_bad_arguments(tmp_path: Path, args: list[str], needle: str) -> None:
    result = run_tool("make_synthetic", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_synthetic.py: error: ") and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_cli_rejects_a_file_as_output(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = run_tool("make_synthetic", str(tmp_path / "file"), "--num-ids", "5")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"make_synthetic.py: error: argument out: {tmp_path / 'file'} is a file, expected a folder "
        "(see --help)"]


def test_cli_reports_an_up_to_date_folder(small: Path) -> None:
    result = run_tool("make_synthetic", small, "--num-ids", "5", "--imgs-per-id", "2:4",
                      "--ijbc-subjects", "10", "--lfw-pairs", "6", "--impostors-per-genuine", "5",
                      "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout and "5 identities" in result.stdout


def test_help_names_the_main_arguments(capsys):
    text = tool_help("make_synthetic", capsys)
    for arg in ("out", "--num-ids", "--imgs-per-id"):
        assert arg in text, arg
