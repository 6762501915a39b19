"""tools/bench_data.py runs end to end on a tiny generated rec (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_data.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_makes_a_rec_and_reports_json(tmp_path):
    rec = tmp_path / "bench"
    args = [sys.executable, str(TOOL), str(rec), "--make", "300", "--n", "200", "--batch-size", "50",
            "--rounds", "1", "--json"]
    try:
        import nvidia.dali  # noqa: F401

        args.append("--dali")
    except ImportError:
        pass
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("images_per_s", "reference_images_per_s", "ratio", "decode_only_images_per_s"):
        assert result[key] > 0, key
    assert result["n"] == 200 and result["batch_size"] == 50
    assert 2000 < result["mean_jpeg_bytes"] < 10000  # MS1M-like JPEG sizes
    if "--dali" in args:
        assert result["dali_cpu_images_per_s"] > 0
    assert (rec / "train.rec").is_file() and (rec / "property").read_text().startswith("15,")


def test_bench_table_and_bad_input(tmp_path, capsys):
    tool = load_tool()
    assert tool.main([str(tmp_path / "missing")]) == 2
    assert "no train.rec" in capsys.readouterr().err
    rec = tmp_path / "small"
    assert tool.main([str(rec), "--make-only", "--make", "40"]) == 0
    assert not capsys.readouterr().out
    assert tool.main([str(rec), "--n", "40", "--batch-size", "50"]) == 2
    assert "need at least one batch" in capsys.readouterr().err
    assert tool.main([str(rec), "--n", "40", "--batch-size", "20", "--rounds", "1"]) == 0
    table = capsys.readouterr().out
    assert "ratio facecompat / reference" in table and "img/s" in table


@pytest.fixture(autouse=True)
def _restore_threads():
    """The tool pins OpenCV and torch to one thread; give the rest of the session its own."""
    import cv2
    import torch

    cv_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    yield
    cv2.setNumThreads(cv_threads)
    torch.set_num_threads(torch_threads)
