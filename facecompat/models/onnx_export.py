"""Export a backbone to ONNX with a dynamic batch axis and check it against PyTorch.

Exporter choice: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) by default.
It is deprecated but still present in torch 2.13, and for these plain Conv/BatchNorm/PReLU/Gemm
graphs it is the reliable one here: it writes the requested opset (17) directly as one
self-contained file and takes under a second for a small model. The torch.export-based exporter
(``dynamo=True``) implements only opset >= 18 and down-converts with a fallback warning, writes
weights as external data unless told otherwise, and takes ~8-15 s even for a tiny model on a
2-core CPU. ``exporter="auto"`` falls back to it (with a warning) once the TorchScript exporter is
gone; ``exporter="dynamo"`` asks for it explicitly.

The model is serialised in memory, checked with onnxruntime (when ``check``), and only then
written to ``out_path`` atomically, so a failed check leaves no file behind.
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from facecompat.errors import UserError
from facecompat.fileio import atomic_write

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
IMAGE_SHAPE = (3, 112, 112)
CHECK_BATCH_SIZES = (1, 3)

Exporter = Literal["auto", "torchscript", "dynamo"]


class OnnxExportError(UserError, RuntimeError):
    """The exported graph could not be produced or disagrees with PyTorch beyond tolerance."""


def _export_torchscript(model: nn.Module, sample: torch.Tensor, opset: int, batch_dynamic: bool) -> bytes:
    buffer = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if batch_dynamic else None
    with warnings.catch_warnings():
        # Chosen deliberately (module docstring); its deprecation notices are noise for our users.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed.*")
        # torch 2.4 has no ``dynamo`` keyword (its export is TorchScript's); 2.9+ defaults it to True.
        choice = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(model, (sample,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes=axes, do_constant_folding=True, **choice)
    return buffer.getvalue()


def _export_dynamo(model: nn.Module, sample: torch.Tensor, opset: int, batch_dynamic: bool) -> bytes:
    shapes = ({0: torch.export.Dim("batch")},) if batch_dynamic else None
    program = torch.onnx.export(model, (sample,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                opset_version=opset, dynamic_shapes=shapes, dynamo=True, external_data=False,
                                verbose=False)
    return program.model_proto.SerializeToString()  # backbones are far below protobuf's 2 GB limit


def _serialise(model: nn.Module, sample: torch.Tensor, opset: int, batch_dynamic: bool,
               exporter: Exporter) -> bytes:
    if exporter == "dynamo":
        return _export_dynamo(model, sample, opset, batch_dynamic)
    try:
        return _export_torchscript(model, sample, opset, batch_dynamic)
    except Exception as e:
        if exporter == "torchscript":
            raise
        warnings.warn(f"TorchScript ONNX exporter failed ({type(e).__name__}: {e}); "
                      "using the torch.export-based exporter", stacklevel=3)
        return _export_dynamo(model, sample, opset, batch_dynamic)


def _opset_of(model_bytes: bytes) -> int:
    import onnx

    proto = onnx.load_model_from_string(model_bytes)
    return next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))


def _max_abs_diff(model_bytes: bytes, model: nn.Module, batch_sizes: tuple[int, ...]) -> float:
    """Largest |onnxruntime - PyTorch| over seeded inputs in [-1, 1] (the normalised image range)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in batch_sizes:
        images = torch.rand((batch, *IMAGE_SHAPE), generator=generator) * 2 - 1
        with torch.no_grad():
            expected = model(images.to(device)).float().cpu().numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        if got.shape != expected.shape:
            raise OnnxExportError(f"onnxruntime output shape {list(got.shape)} at batch {batch}, "
                                  f"PyTorch gives {list(expected.shape)}")
        worst = max(worst, float(abs(got - expected).max()))
    return worst


def export_onnx(model: nn.Module, out_path: str | os.PathLike, opset: int = 17, batch_dynamic: bool = True,
                check: bool = True, atol: float = 1e-4, exporter: Exporter = "auto") -> dict[str, Any]:
    """Export a backbone (in eval mode) to ONNX: input ``"input"`` [B, 3, 112, 112] float32, output
    ``"embedding"`` [B, D].

    Args:
        model: a backbone from ``get_model`` (any device; its train/eval mode is restored afterwards).
        out_path: the ``.onnx`` file, written atomically (temp file in the same folder + rename).
        opset: ONNX opset version.
        batch_dynamic: make the batch axis symbolic (``"batch"``); otherwise it is fixed at 1.
        check: run onnxruntime (CPU) at batch sizes 1 and 3 (1 only for a fixed batch) on seeded
            random inputs and compare with PyTorch; nothing is written if they disagree.
        atol: largest accepted absolute difference.
        exporter: ``"auto"`` (TorchScript exporter, the dynamo one if that fails), ``"torchscript"``
            or ``"dynamo"``; see the module docstring.

    Returns:
        ``{"path": str, "max_abs_diff": float | None (None without check), "opset": int}``.

    Raises:
        OnnxExportError: the check found a difference above ``atol`` or a wrong output shape.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        sample = torch.zeros((2 if batch_dynamic else 1, *IMAGE_SHAPE), device=device)
        model_bytes = _serialise(model, sample, opset, batch_dynamic, exporter)
        diff = None
        if check:
            diff = _max_abs_diff(model_bytes, model, CHECK_BATCH_SIZES if batch_dynamic else (1,))
            if not diff <= atol:  # also catches NaN
                raise OnnxExportError(f"{out_path}: onnxruntime and PyTorch embeddings differ by up to "
                                      f"{diff:.3g} > atol {atol:g}; nothing written")
    finally:
        model.train(was_training)
    with atomic_write(Path(out_path), "wb") as f:
        f.write(model_bytes)
    return {"path": str(out_path), "max_abs_diff": diff, "opset": _opset_of(model_bytes)}
