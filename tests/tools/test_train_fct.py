"""tools/train_fct.py: a transformation trained without side-information on planted banks, its report
and JSON summary, and the one-line errors (the training itself: tests/compat/test_fct.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facecompat.compat.fct import FCTError, FCTransform
from tests.helpers.fct import OLD_DIM, SIDE_DIM, make_planted
from tests.helpers.models import single_thread
from tests.helpers.tools import load_tool, tool_help

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, synthetic_tiny):
    """Three run directories and their banks of the full tiny view, written where training looks."""
    return make_planted(tmp_path_factory.mktemp("fct"), synthetic_tiny)


def test_tool_trains_without_side_information_and_reports(planted, tmp_path, capsys):
    _, cfg_path, _, _ = planted
    tool = load_tool("train_fct")
    out = tmp_path / "noside"
    assert tool.main([str(cfg_path), "--set", "side=null", "--set", "train.epochs=2",
                      "--set", f"output={out}", "--device", "cpu", "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "cos(h, new)" in text and "cost: features" in text
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["training"]["steps"] > 0 and "held_out" in summary["fit"]
    fct = FCTransform.load(out)
    assert not fct.uses_side and fct.module.side_dim == 0
    with pytest.raises(FCTError, match="trained without side-information"):
        fct.apply(np.zeros((2, OLD_DIM), np.float32), np.zeros((2, SIDE_DIM), np.float32))
    for argv, needle in (([str(cfg_path), "--set", "train.lr=-1"], "train.lr"),
                         ([str(tmp_path / "absent.yaml")], "absent.yaml"),
                         ([str(cfg_path), "--device", "gpu0"], "--device: not a device: 'gpu0'")):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:  # refused before any work
        tool.main([str(cfg_path), "--json", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith("train_fct.py: error: argument --json: "), err


def test_help_names_the_main_arguments(capsys):
    text = tool_help("train_fct", capsys)
    for arg in ("config", "--set", "--json"):
        assert arg in text, arg
