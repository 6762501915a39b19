"""facecompat.gpu_check's pure parts: step selection, throughput ratios and the target, the reference
copy absent or broken (the check end to end, tools/gpu_check.sh: tests/tools/test_gpu_check.py)."""

from __future__ import annotations

import os

import pytest

from facecompat import gpu_check
from facecompat.gpu_check import steps_speed
from tests.helpers import REPO


def test_an_absent_reference_is_a_skip_inside_the_step_not_a_failure(tmp_path):
    ctx_reference = tmp_path / "nothing_here"
    with open(os.devnull, "w") as log_file:
        device = gpu_check.resolve_check_device(None, True)
        ctx = gpu_check.CheckContext(repo=REPO, out=tmp_path, device=device,
                                     dry_run=True, sizes=gpu_check.TINY, reference=ctx_reference,
                                     budget_s=60, log_file=log_file)
        result = steps_speed._reference_throughput(ctx, None)
    assert result == {"skipped": f"reference copy absent (--reference {ctx_reference})"}


def test_load_reference_names_a_missing_file(tmp_path):
    (tmp_path / "losses.py").write_text("")
    with pytest.raises(FileNotFoundError, match=r"backbones/iresnet.py is missing"):
        gpu_check.load_reference(tmp_path)


def test_throughput_ratios_and_the_target():
    ours = {"bf16@1.0": {"samples_per_s": 2600.0}, "bf16+channels_last@1.0": {"samples_per_s": 2900.0},
            "fp16@1.0": {"samples_per_s": 2400.0}, "bf16@0.1": {"samples_per_s": 3000.0}}
    reference = {"rho_1.0": {"samples_per_s": 2000.0}, "rho_0.1": {"samples_per_s": 2500.0}}
    found = steps_speed._throughput_ratios(ours, reference)
    assert found["ratios"] == {"rho_1.0": {"bf16": 1.3, "bf16+channels_last": 1.45, "fp16": 1.2},
                               "rho_0.1": {"bf16": 1.2}}
    assert found["best_bf16_ratio_rho_1.0"] == 1.45 and found["target_met"] is True
    slow = steps_speed._throughput_ratios({"bf16@1.0": {"samples_per_s": 2500.0}}, reference)
    assert slow["target_met"] is False
    assert steps_speed._throughput_ratios(ours, {"skipped": "absent"})["target_met"] is None


def test_select_steps_keeps_the_order_and_names_an_unknown_step():
    assert gpu_check.select_steps(["ddp", "versions"], None) == ["versions", "ddp"]
    assert gpu_check.select_steps(None, ["gpu_tests"]) == list(gpu_check.STEP_NAMES[:-1])
    with pytest.raises(gpu_check.GpuCheckError, match="--skip: unknown step 'gpu'"):
        gpu_check.select_steps(None, ["gpu"])
