"""tools/export_onnx.py: a weights file or a run directory exported and checked against PyTorch, and
the one-line errors (the export itself: tests/models/test_onnx_export.py)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from tests.helpers.models import calibrated_model, make_run_dir, single_thread
from tests.helpers.tools import load_tool, run_tool, tool_help

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

_calibrated = calibrated_model


def _tool(*args: str) -> subprocess.CompletedProcess:
    return run_tool("export_onnx", *args, env={"OMP_NUM_THREADS": "1"})


def test_tool_end_to_end(tmp_path):
    weights = tmp_path / "model.pt"
    torch.save(_calibrated("r18-w0.125", embedding_size=128).state_dict(), weights)  # insightface form
    out = tmp_path / "model.onnx"
    done = _tool(str(weights), "--network", "r18-w0.125", "--output", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["path"] == str(out) and result["opset"] == 17 and result["max_abs_diff"] <= 1e-4
    # the embedding size is read from the weights' embedding layer
    assert result["network"] == "r18-w0.125" and result["embedding_size"] == 128
    assert out.is_file()

    # the older spelling --weights FILE still works
    wrong = _tool("--network", "r34-w0.125", "--weights", str(weights), "--output", str(tmp_path / "x.onnx"),
                  "--embedding-size", "128")
    assert wrong.returncode == 2
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_onnx.py: error: ") and str(weights) in lines[0]
    assert "missing keys layer1.2." in lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_tool_exports_a_run_directory(tmp_path, capsys):
    """A run directory names its network and embedding size in config.yaml: no --network needed."""
    run = make_run_dir(tmp_path / "run", seed=0, network="r18-w0.125", embedding_size=32)
    torch.save(_calibrated("r18-w0.125", embedding_size=32).state_dict(), run / "model.pt")
    out = tmp_path / "sub" / "run.onnx"
    assert load_tool("export_onnx").main([str(run), "--output", str(out), "--json",
                                          str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (r18-w0.125, D=32" in printed
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["embedding_size"] == 32 and result["network"] == "r18-w0.125" and out.is_file()
    assert result["model"] == str(run)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((2, 3, 112, 112), np.float32)})[0].shape == (2, 32)


def test_tool_bad_input_in_process(tmp_path, capsys):
    tool = load_tool("export_onnx")
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "w.pt").write_bytes(b"x")
    out = str(tmp_path / "o.onnx")
    cases = {
        "absent.pt: model not found": [str(tmp_path / "absent.pt"), "--network", "r18-w0.125",
                                       "--output", out],
        "not_a_run: not a run directory, it lacks model.pt and config.yaml": [str(tmp_path / "not_a_run"),
                                                                             "--output", out],
        "--network: unknown backbone 'r42'": [str(tmp_path / "w.pt"), "--network", "r42", "--output", out],
        "w.pt: a weights file needs its backbone name (--network": [str(tmp_path / "w.pt"), "--output", out],
        "--output: " + str(tmp_path) + " is a directory": [str(tmp_path / "w.pt"), "--network", "r18",
                                                            "--output", str(tmp_path)],
        "give the model once": ["--output", out],
        "--embedding-size: must be >= 1": [str(tmp_path / "w.pt"), "--network", "r18", "--output", out,
                                           "--embedding-size", "0"],
    }
    for reason, argv in cases.items():
        try:
            status = tool.main(argv)
        except SystemExit as exc:  # argparse: refused before any work
            status = exc.code
        assert status == 2, reason
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("export_onnx.py: error: ") and reason in err[0], err
    assert not (tmp_path / "o.onnx").exists()


def test_help_names_the_main_arguments(capsys):
    text = tool_help("export_onnx", capsys)
    for arg in ("MODEL", "--network", "--output"):
        assert arg in text, arg
