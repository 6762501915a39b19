"""tools/train.py as users run it: divergence and bad inputs as one line and exit status 2, --output and
--json (training itself, killed and resumed, over several processes: tests/train/test_trainer.py)."""

from __future__ import annotations

import json

import pytest

from facecompat import checkpoint as ckpt
from tests.helpers.tools import load_tool, run_tool, tool_help
from tests.helpers.train import write_config


def train_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """tools/train.py's main() in this process: (exit status, stderr)."""
    module = load_tool("train")
    capsys.readouterr()
    status = module.main(args)
    return status, capsys.readouterr().err


def test_divergence_names_the_step_and_the_last_good_checkpoint(tmp_path, synthetic_tiny, capsys):
    cfg = str(write_config(tmp_path, synthetic_tiny, **{"data.val_targets": [], "train.epochs": 1}))
    assert train_main([cfg], capsys)[0] == 0
    last = ckpt.latest_checkpoint(tmp_path / "runs" / "run")
    # A scale that overflows float32 makes the logits inf and the loss NaN at the first step.
    status, err = train_main([cfg, "--set", "train.epochs=2", "--set", "head.scale=1e38"], capsys)
    assert status == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "NaN/inf" in line and str(last) in line, line
    status, err = train_main([cfg, "--set", "head.scale=1e38", "--set", "train.exp_name=x"], capsys)
    assert status == 2 and "error: step 1: loss is NaN/inf" in err
    assert "no checkpoint was written yet" in err


def test_bad_inputs_are_one_line_errors(tmp_path, synthetic_tiny, capsys):
    cases = {
        "data.rec": (str(tmp_path / "nope"), "nope"),
        "train.resume": (str(tmp_path / "missing_ckpt"), "missing_ckpt"),
        "data.val_targets": (["cfp_fp"], "cfp_fp.bin"),
        "model.network": ("r19", "r19"),
        "data.batch_size": (100_000, "data.batch_size: "),  # checked before the backbone or a bank is built
        "optim.grad_accum": (1000, "optim.grad_accum: 1000 micro-batches per step"),
    }
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    cases["model.init_from"] = (str(tmp_path / "garbage.pt"), "garbage.pt")
    for key, (value, needle) in cases.items():
        cfg = write_config(tmp_path, synthetic_tiny, **{key: value})
        status, err = train_main([str(cfg)], capsys)
        assert status == 2, (key, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (key, err)
    # The command line itself: a missing config file.
    res = run_tool("train", tmp_path / "absent.yaml", timeout=240)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "absent.yaml" in res.stderr


def test_tool_flags_output_and_json(tmp_path, synthetic_tiny, capsys):
    """--output DIR (the run's parent) and --json OUT (the summary, written atomically); a bad
    --output is refused before any work, in one line naming the flag."""
    cfg = str(write_config(tmp_path, synthetic_tiny, **{"data.val_targets": [], "train.epochs": 1}))
    argv = [cfg, "--output", str(tmp_path / "elsewhere"), "--json", str(tmp_path / "s.json")]
    status, err = train_main(argv, capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["model"] == str(tmp_path / "elsewhere" / "run" / "model.pt") and summary["step"] > 0
    (tmp_path / "file").write_text("x")
    for argv, needle in (([cfg, "--output", str(tmp_path / "file")], "--output: "),
                         ([cfg, "--json", str(tmp_path)], "--json: ")):
        with pytest.raises(SystemExit) as exc:
            train_main(argv, capsys)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("train.py: error: "), err
        assert needle in err[0]
    assert not (tmp_path / "runs").exists()


def test_help_names_the_main_arguments(capsys):
    text = tool_help("train", capsys)
    for arg in ("config", "--set", "--output", "--json"):
        assert arg in text, arg
