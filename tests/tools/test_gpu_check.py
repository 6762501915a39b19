"""tools/gpu_check.sh and tools/gpu_check.py: the dry run end to end (every step at tiny sizes on the
CPU, without DALI or faiss), the arguments, the time budget and a failing step (the pure parts of
facecompat.gpu_check: tests/gpu_check/test_gpu_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from facecompat import gpu_check
from tests.helpers import REPO
from tests.helpers.tools import load_tool, tool_help

# Expected in the dry run on a CPU machine: the CUDA-only steps skipped; the quickstart skipped by
# --skip (about 2 minutes of the CPU: too long for the suite, tests/pipelines/test_quickstart.py runs it).
DRY_RUN = {name: "passed" for name in gpu_check.STEP_NAMES}
DRY_RUN.update(no_host_sync="skipped", gpu_tests="skipped", quickstart_tiny="skipped")


def tool_main(argv: list[str]) -> int:
    """tools/gpu_check.py's main() in this process."""
    return load_tool("gpu_check").main(argv)


def block_gpu_image_absentees(root: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes faiss and DALI fail to import (the GPU image has
    neither)."""
    root.mkdir()
    for path, name in ((root / "faiss.py", "faiss"), (root / "nvidia" / "__init__.py", "nvidia")):
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"raise ModuleNotFoundError('not on the GPU image', name={name!r})\n")
    return root


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(block_gpu_image_absentees(tmp / "block"))}
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--skip", "quickstart_tiny"], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=280)
    return proc, out


def test_dry_run_passes_every_step_that_runs_on_a_cpu(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["dry_run"] and summary["device"] == "cpu"
    assert list(summary["steps"]) == list(gpu_check.STEP_NAMES)
    assert {name: step["status"] for name, step in summary["steps"].items()} == DRY_RUN
    assert summary["counts"] == {"passed": 10, "failed": 0, "skipped": 3}
    steps = summary["steps"]
    assert steps["no_host_sync"]["reason"] == "CUDA only"
    assert steps["quickstart_tiny"]["reason"].startswith("not selected")
    assert all(step["seconds"] is not None for step in steps.values() if step["status"] == "passed")
    # what each step measured, at tiny sizes
    versions = steps["versions"]["result"]
    assert not versions["dali_imports"] and not versions["faiss_imports"]  # as on the GPU image
    assert steps["collectives"]["result"]["backend"] == "gloo"
    assert all(steps["collectives"]["result"]["checks"].values())
    assert all(row["rel_diff"] <= 0.02 for row in steps["precisions"]["result"]["losses"].values())
    nan = steps["fp16_nan_batch"]["result"]
    assert nan["found_inf"] and nan["params_unchanged"] and nan["scale_after"] == nan["scale_before"] / 2
    pfc = steps["partial_fc_gpu_equals_cpu"]["result"]
    assert pfc["compared"] == "cpu torch.float32 vs cpu torch.float64"
    assert pfc["rho_0.1"]["sampled_rows"] < pfc["rho_1.0"]["sampled_rows"]
    resume = steps["train_resume"]["result"]
    assert resume["model_max_abs_diff"] == 0.0 and resume["head_max_abs_diff"] == 0.0
    assert 0 < resume["steps_per_epoch"] < resume["resumed_from_step"] < resume["total_steps"]
    assert resume["movement_after_checkpoint"] > 0 and resume["resume_logged"]
    throughput = steps["step_throughput"]["result"]
    assert set(throughput["ours"]) == {"bf16@1.0", "fp16@1.0", "bf16@0.1", "fp16@0.1"}
    # the reference copy is git-ignored: present on a developer's machine, absent in a clean clone
    expected = "needs CUDA" if (REPO / ".reference" / "arcface_torch").is_dir() else "reference copy absent"
    assert expected in throughput["reference"]["skipped"] and throughput["target_met"] is None
    assert steps["extraction"]["result"]["faces_per_s"] > 0
    assert steps["two_ranks_share_gpu"]["result"]["world_size_2_logged"]


def test_dry_run_prints_progress_and_a_table_and_logs_everything(dry_run):
    proc, out = dry_run
    assert "[gpu_check] step 8/13 train_resume ..." in proc.stdout
    table = proc.stdout[proc.stdout.index(" #  step"):]
    assert len(table.strip().splitlines()) == 2 + len(gpu_check.STEP_NAMES)
    log = (out / "gpu_check.log").read_text()
    assert "[gpu_check] step 13/13 gpu_tests skipped" in log and " #  step" in log
    assert "----- train_mixbct_resumed: exit 0" in log  # a subprocess's output, in the log only
    assert "resumed from" in (out / "logs" / "train_mixbct_resumed.log").read_text()
    assert "train_mixbct_resumed" not in proc.stdout


@pytest.mark.parametrize("argv, flag", [
    (["--only", "nosuchstep"], "--only"),
    (["--skip", "versions,nosuchstep"], "--skip"),
    (["--time-budget", "-1"], "--time-budget"),
    (["--time-budget", "soon"], "--time-budget"),
    (["--device", "cuda"], "--device cuda"),  # tests hide CUDA
    (["--device", "cpu"], "--device cpu"),  # the full sizes need a GPU
])
def test_bad_arguments_are_one_line_errors_with_status_2(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        status = tool_main([*argv, "--out", str(tmp_path / "out")])
        raise SystemExit(status)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "out").exists()


def test_a_spent_time_budget_skips_the_later_steps(tmp_path, capsys):
    out = tmp_path / "out"
    status = tool_main(["--dry-run", "--out", str(out), "--only", "collectives,ddp,extraction",
                        "--time-budget", "1e-9", "--skip", "collectives"])
    assert status == 0
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps["ddp"]["status"] == "passed"  # the first selected step always runs
    assert steps["collectives"]["reason"] == "not selected (--only/--skip)"
    assert steps["extraction"]["status"] == "skipped"
    assert steps["extraction"]["reason"].startswith("time budget spent")
    assert steps["precisions"]["reason"] == "not selected (--only/--skip)"
    assert "time budget spent" in capsys.readouterr().out


def test_a_step_that_raises_is_recorded_failed_and_the_exit_status_is_1(tmp_path):
    reference = tmp_path / "arcface_torch"
    (reference / "backbones").mkdir(parents=True)
    (reference / "backbones" / "iresnet.py").write_text("def iresnet18(*args, **kwargs):\n    pass\n")
    (reference / "losses.py").write_text("class CombinedMarginLoss:\n    pass\n")
    (reference / "partial_fc_v2.py").write_text("import torch\nclass PartialFC_V2(torch.nn.Module:\n")
    out = tmp_path / "out"
    status = tool_main(["--dry-run", "--out", str(out), "--only", "step_throughput,extraction",
                        "--reference", str(reference)])
    assert status == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["counts"]["failed"] == 1
    step = summary["steps"]["step_throughput"]
    assert step["status"] == "failed" and step["reason"].startswith("SyntaxError")
    assert summary["steps"]["extraction"]["status"] == "passed"  # the later steps still run
    assert "partial_fc_v2.py" in (out / "gpu_check.log").read_text()  # the traceback, in the log


def test_help_names_the_main_arguments(capsys):
    text = tool_help("gpu_check", capsys)
    for arg in ("--dry-run", "--only", "--skip", "--time-budget"):
        assert arg in text, arg
