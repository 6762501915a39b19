"""The quickstart's stages on tiny data: generated, read back, old model trained, skipped when done."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from facecompat.quickstart import SIZES, run_quickstart

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_tiny_runs_and_resumes(tmp_path):
    logs: list[str] = []
    config = REPO / "configs" / "synthetic_data.yaml"
    results = run_quickstart(tmp_path, size="tiny", config=config, workers=2, progress=False, log=logs.append)
    spec = SIZES["tiny"]
    assert results["data"]["train"]["classes"] == spec["num_ids"]
    read = results["read_back"]
    assert read["num_classes"] == spec["num_ids"] and read["lfw_pairs"] == spec["lfw_pairs"]
    # one epoch with drop_last: every step full, no image twice
    assert read["images_read"] == read["steps"] * min(32, results["data"]["train"]["images"])
    assert read["ijbc_faces"] == results["data"]["ijbc"]["faces"]
    state = json.loads((tmp_path / "stages.json").read_text())
    assert set(state["stages"]) == {"data", "read_back", "train_old"}
    old = results["train_old"]
    assert old["steps"] >= 1 and 0.0 <= old["lfw_accuracy"] <= 1.0 and Path(old["model"]).is_file()

    logs.clear()
    again = run_quickstart(tmp_path, size="tiny", config=config, workers=2, progress=False, log=logs.append)
    assert again == results and all("done before" in line for line in logs)


def test_quickstart_cli_reports_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 4\n")
    out = subprocess.run([sys.executable, "tools/quickstart.py", "--work-dir", str(tmp_path / "w"),
                          "--size", "tiny", "--config", str(bad)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "batch_sise" in out.stderr and "batch_size" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
