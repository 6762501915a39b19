"""tools/extract_features.py: the old model's bank of a training view built, reported as JSON, and the
one-line errors (a bank of another model, no old model, bad flags and devices)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from tests.helpers.models import make_run_dir, single_thread
from tests.helpers.tools import load_tool, tool_help

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract_runs")
    return make_run_dir(tmp / "old", seed=0), make_run_dir(tmp / "other", seed=1)


def _write_config(tmp: Path, root: Path, old: Path) -> Path:
    tree = {"_base_": str(REPO / "configs" / "base.yaml"),
            "data": {"rec": str(root / "train"), "protocol": "opclass", "part": "old", "num_workers": 0},
            "model": {"network": "r18-w0.125", "embedding_size": 32},
            "compat": {"old": {"checkpoint": str(old)}},
            "train": {"output": str(tmp / "runs")},
            "eval": {"batch_size": 32}}
    path = tmp / "extract.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_extract_features_tool(tmp_path, synthetic_tiny, runs, capsys):
    tool = load_tool("extract_features")
    config = _write_config(tmp_path, synthetic_tiny, runs[0])
    assert tool.main([str(config), "--device", "cpu", "--credible", "0.9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["path"]).parent == tmp_path / "runs" / "banks" and out["dims"] == 32
    assert out["records"] == out["extracted"] == out["view_records"] > 0 and out["images_per_s"] > 0
    assert (Path(out["path"]) / "credible_v2_0.9.npy").is_file()
    # the same bank claimed for another model: one line, exit 2, the bank untouched
    bad = ["--set", f"compat.old.checkpoint={runs[1]}", "--out", out["path"]]
    assert tool.main([str(config), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another model" in err
    assert tool.main([str(config), "--set", "compat.old.checkpoint=null"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "compat.old.checkpoint: not set" in err
    (tmp_path / "file").write_text("x")
    for argv, needle in ((["--workers", "-1"], "argument --workers: must be >= 0"),
                         (["--out", str(tmp_path / "file")], "argument --out: "),
                         (["--json", str(tmp_path)], "argument --json: ")):
        with pytest.raises(SystemExit) as exc:  # refused before any work
            tool.main([str(config), *argv])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.splitlines() == [err], err
        assert err.startswith("extract_features.py: error: ") and needle in err, err
    assert tool.main([str(config), "--device", "gpu0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--device: not a device: 'gpu0'" in err
    shutil.rmtree(out["path"])


def test_help_names_the_main_arguments(capsys):
    text = tool_help("extract_features", capsys)
    for arg in ("config", "--set", "--out", "--credible"):
        assert arg in text, arg
