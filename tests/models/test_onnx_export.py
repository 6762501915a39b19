"""facecompat.models.onnx_export (tools/export_onnx.py: tests/tools/test_export_onnx.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from facecompat.models.onnx_export import OnnxExportError, export_onnx
from tests.helpers.models import calibrated_model, single_thread

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


_calibrated = calibrated_model


def _input_dims(path: Path) -> list:
    graph = onnx.load(str(path)).graph
    return [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["r18-w0.125", "mbf-w0.125"])
def test_export_matches_pytorch_with_dynamic_batch(tmp_path, name):
    model = _calibrated(name, embedding_size=64)
    model.train()  # export must evaluate in eval mode and restore the mode
    out = tmp_path / "sub" / "model.onnx"
    result = export_onnx(model, out)
    assert model.training
    assert set(result) == {"path", "max_abs_diff", "opset"}
    assert result["path"] == str(out) and result["opset"] == 17
    assert 0 <= result["max_abs_diff"] <= 1e-4
    assert _input_dims(out) == ["batch", 3, 112, 112]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    x = torch.rand(5, 3, 112, 112) * 2 - 1
    (emb,) = session.run(["embedding"], {"input": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    assert emb.shape == (5, 64)
    np.testing.assert_allclose(emb, expected, atol=1e-4, rtol=0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temp files left


def test_fixed_batch_and_no_check(tmp_path):
    out = tmp_path / "fixed.onnx"
    result = export_onnx(_calibrated("r18-w0.125"), out, batch_dynamic=False, check=False)
    assert result["max_abs_diff"] is None
    assert _input_dims(out) == [1, 3, 112, 112]


def test_failed_check_raises_and_writes_nothing(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(OnnxExportError, match="differ"):
        export_onnx(_calibrated("mbf-w0.125"), out, atol=-1.0)  # no difference can pass
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.skipif(not os.environ.get("FACECOMPAT_SLOW"), reason="torch.export-based exporter takes "
                    "~10 s even for a tiny model; FACECOMPAT_SLOW=1 runs it")
def test_dynamo_exporter(tmp_path):
    out = tmp_path / "dynamo.onnx"
    result = export_onnx(_calibrated("r18-w0.125"), out, opset=18, exporter="dynamo")
    assert result["max_abs_diff"] <= 1e-4 and result["opset"] == 18
    assert _input_dims(out)[0] == "batch"
