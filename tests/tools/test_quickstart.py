"""tools/quickstart.py as users run it: every recipe checked and the device refused before any work,
Ctrl-C saying how to resume (the quickstart itself: tests/pipelines/test_quickstart.py)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

from tests.helpers import REPO
from tests.helpers.tools import run_tool, tool_help, tool_path


def test_cli_checks_every_recipe_before_training(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    recipe = configs / "synthetic_mixbct.yaml"
    recipe.write_text(recipe.read_text().replace("keep_ratio", "keep_ratoi"))
    out = run_tool("quickstart", "--work-dir", tmp_path / "w", "--size", "tiny", "--configs", configs)
    assert out.returncode == 2, out.stderr
    assert "keep_ratoi" in out.stderr and "synthetic_mixbct.yaml" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w" / "data").exists() and not (tmp_path / "w" / "runs").exists()


def test_cli_refuses_a_device_it_cannot_use_before_any_work(tmp_path):
    for device, message in (("cuda", "--device: cuda: CUDA is not available here"),
                            ("gpu0", "--device: not a device: 'gpu0'")):
        out = run_tool("quickstart", "--work-dir", tmp_path / "w", "--size", "tiny", "--device", device)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert message in out.stderr
    assert not (tmp_path / "w").exists()


def test_ctrl_c_says_how_to_resume_and_keeps_finished_stages(tmp_path):
    work = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, str(tool_path("quickstart")), "--size", "tiny", "--work-dir",
                             str(work), "--quiet"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (work / "stages.json").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # the data stage is recorded: the old model is training now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "quickstart: interrupted; run the same command again to resume" in err
    assert list(json.loads((work / "stages.json").read_text())["stages"]) == ["data"]


def test_help_names_the_main_arguments(capsys):
    text = tool_help("quickstart", capsys)
    for arg in ("--work-dir", "--size", "--from", "--device"):
        assert arg in text, arg
