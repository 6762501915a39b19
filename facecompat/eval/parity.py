"""Deployment parity: the model as it will be served (exported to ONNX, run by onnxruntime) against
the PyTorch features the certificate was computed from.

    torch_feats = extract_features(model, root, faces)            # the evaluation features
    entry = model_parity(model, "bct", root, faces, meta, torch_feats, workdir=out / "onnx")
    entry["max_cosine_deviation"], entry["tar_change"]["0.0001"]  # certificate "parity" (DESIGN §8)
    fct = transform_parity(transform, old_feats, side_feats, out / "onnx")  # FCT's h

**Same faces, same pixels.** :func:`onnx_features` reads the faces through the evaluation's own
pieces (:class:`~facecompat.eval.extract.AlignedFaces`: 5-point alignment; the same loader; the one
uint8 → [-1, 1] normalisation, :func:`~facecompat.data.normalize.normalize_array`), so the graph sees
the bytes the PyTorch backbone saw. The ONNX graph is the backbone only (``export_onnx``); flip
fusion ``f(x) + f(flip(x))`` is the caller's job, done here as
:func:`~facecompat.features.engine.fuse_flip` does it (two runs, flipped along the width, summed in
float32), and a server must do the same. The features are not normalised.

**What is reported.** Per face ``1 − cos`` between PyTorch and ONNX features (largest and 99.9th
percentile) and the largest relative norm difference (a face's norm weighs it in its template); then
1:1 as evaluation runs it (:func:`~facecompat.eval.ijb.pool`, :func:`~facecompat.eval.ijb.verify_1to1`):
``tar_change[far] = TAR(onnx|onnx) − TAR(torch|torch)``, and ``cross_tar_change[far] =
TAR(onnx|torch) − TAR(torch|torch)`` (ONNX queries against the PyTorch gallery: a mixed deployment).
FAR keys are written as the certificate writes them (``format(far, "g")``: ``"0.001"``).

**Cost** (measured on a 2-core CPU shared with another job, onnxruntime 1.32, torch 2.13; PyTorch and
onnxruntime batches interleaved so both saw the same load): inference dominates. A random r18 (512-d,
112x112) exports in ~1.9 s, ~4 s with export_onnx's onnxruntime check (a session on the 100 MB graph),
once per model; 1,000 forwards take ~50 s in onnxruntime (~77 s in PyTorch), so 1,000 faces with flip
(2,000 forwards) ~100 s. Full IJB-C (469k faces) is then ~13 h on two cores: run it with a GPU provider.
On the 84-face test set a 0.125-width r18 takes ~3 s end to end (export + check ~2 s, onnxruntime
~1.2 s, the report 0.02 s). onnxruntime's CPU provider gave bit-identical features with 1 and 2
intra-op threads and at batch sizes 1 and 64 for these graphs: observed here, not promised by it.
"""

from __future__ import annotations

import inspect
import io
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from facecompat.compat.fct import FCTransform, Transformation
from facecompat.data.normalize import normalize_array
from facecompat.errors import UserError
from facecompat.eval import metrics
from facecompat.eval.extract import AlignedFaces, FaceList
from facecompat.eval.ijb import IJBMeta, Pooled, pool, verify_1to1
from facecompat.features.engine import default_num_workers, inference_loader
from facecompat.fileio import atomic_write, file_sha1
from facecompat.models.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
TRANSFORM_INPUTS = ("old", "side")
TRANSFORM_OUTPUTS = ("prediction", "log_var")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_CHUNK_ROWS = 65_536  # rows per float64 chunk of the deviation arithmetic (2 x 256 MB at 512-d)


class ParityError(UserError, RuntimeError):
    """Parity cannot be measured: onnxruntime missing, an unusable ONNX file (named), shapes that differ."""


def _onnxruntime(export: bool = False) -> Any:
    """The onnxruntime module (and, to ``export``, onnx: export_onnx reads the opset with it)."""
    try:
        import onnxruntime
        if export:
            import onnx  # noqa: F401
    except ImportError as err:
        raise ParityError(f"deployment parity exports with onnx and runs the model with onnxruntime "
                          f"({err}): pip install -e .[export] (onnx, onnxruntime, onnxscript)") from None
    return onnxruntime


def open_session(path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> Any:
    """An onnxruntime ``InferenceSession`` of ``path`` (``providers`` default: CPU; ``threads``: intra-op
    threads, default onnxruntime's). ParityError names the file when it is absent or unloadable."""
    ort = _onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise ParityError(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=list(providers or DEFAULT_PROVIDERS))
    except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        raise ParityError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None


def _backbone_io(session: Any, path: Path, dim: int | None) -> tuple[type, int | None]:
    """The graph's input dtype and fixed batch size (None: dynamic); ParityError naming ``path`` unless
    it is a backbone export (``input`` [B, 3, 112, 112] -> ``embedding`` [B, dim])."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ParityError(f"{path}: not a backbone export: inputs {sorted(inputs)}, outputs "
                          f"{sorted(outputs)}; expected {INPUT_NAME!r} [B, 3, 112, 112] -> "
                          f"{OUTPUT_NAME!r} [B, D]")
    declared = outputs[OUTPUT_NAME].shape[-1] if outputs[OUTPUT_NAME].shape else None
    if dim is not None and isinstance(declared, int) and declared != dim:
        raise ParityError(f"{path}: the graph outputs {declared}-d embeddings, the PyTorch features "
                          f"are {dim}-d")
    spec = inputs[INPUT_NAME]
    if spec.type not in _NUMPY_TYPES:
        raise ParityError(f"{path}: input {INPUT_NAME!r} is {spec.type}; float or float16 expected")
    batch = spec.shape[0] if spec.shape else None
    if isinstance(batch, int) and batch != 1:
        raise ParityError(f"{path}: fixed batch size {batch}; export with a dynamic batch (or batch 1)")
    return _NUMPY_TYPES[spec.type], batch if isinstance(batch, int) else None


def _run_backbone(session: Any, x: np.ndarray, dtype: type, fixed_batch: int | None) -> np.ndarray:
    x = x.astype(dtype, copy=False)
    if fixed_batch is None:
        return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float32, copy=False)
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + 1]})[0]
                           for i in range(len(x))]).astype(np.float32, copy=False)


def _embed_faces(session: Any, path: Path, root: str | os.PathLike, faces: FaceList, *, batch_size: int,
                 flip: bool, num_workers: int | None, dim: int | None, progress: bool) -> np.ndarray:
    dtype, fixed_batch = _backbone_io(session, path, dim)
    workers = default_num_workers() if num_workers is None else num_workers
    loader = inference_loader(AlignedFaces(root, faces), torch.device("cpu"), workers, batch_size=batch_size)
    out: np.ndarray | None = None
    offset = 0
    for images, _ in tqdm(loader, total=len(loader), desc="onnx", unit="batch", disable=not progress):
        x = normalize_array(images.numpy())  # the evaluation's uint8 -> [-1, 1], same bits
        emb = _run_backbone(session, x, dtype, fixed_batch)
        if flip:  # as fuse_flip: f(x) + f(x flipped along the width), a float32 sum
            emb = emb + _run_backbone(session, np.ascontiguousarray(x[..., ::-1]), dtype, fixed_batch)
        if out is None:
            if emb.ndim != 2 or (dim is not None and emb.shape[1] != dim):
                raise ParityError(f"{path}: the graph gives {list(emb.shape)} for {len(x)} faces; "
                                  f"[{len(x)}, {dim if dim is not None else 'D'}] expected")
            out = np.empty((len(faces), emb.shape[1]), np.float32)
        out[offset:offset + len(emb)] = emb
        offset += len(emb)
    assert offset == len(faces), (offset, len(faces))
    return out if out is not None else np.zeros((0, dim or 0), np.float32)


def onnx_features(onnx_path: str | os.PathLike, root: str | os.PathLike, faces: FaceList, *,
                  batch_size: int = 64, flip: bool = True, providers: Sequence[str] | None = None,
                  threads: int | None = None, num_workers: int | None = None, dim: int | None = None,
                  progress: bool = True) -> np.ndarray:
    """Embed IJB faces with an exported backbone through onnxruntime, as evaluation embeds them.

    Args:
        onnx_path: a backbone export (:func:`~facecompat.models.onnx_export.export_onnx`: ``input``
            float32 [B, 3, 112, 112] RGB in [-1, 1] -> ``embedding`` [B, D], unnormalised).
        root: the IJB folder holding ``loose_crop/``; faces: from
            :func:`~facecompat.eval.extract.read_face_list` (aligned as evaluation aligns them).
        batch_size: faces per run (twice that many forwards with ``flip``).
        flip: feature = f(x) + f(flip(x)), fused here (the graph is the backbone alone); else f(x).
        providers: onnxruntime execution providers (default CPU only); threads: intra-op threads.
        num_workers: loader processes aligning faces (default
            :func:`~facecompat.features.engine.default_num_workers`); 0 aligns in this process.
        dim: the expected embedding size (the PyTorch features'); ParityError naming the file if not.
        progress: a tqdm bar. One process: under torchrun call it on one rank.

    Returns:
        [N, D] float32 in face-list order, not normalised (as ``extract_features`` returns them).
    """
    path = Path(onnx_path)
    return _embed_faces(open_session(path, providers, threads), path, root, faces, batch_size=batch_size,
                        flip=flip, num_workers=num_workers, dim=dim, progress=progress)


def _row_deviation(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``1 − cos(a, b)`` and ``|‖b‖ − ‖a‖| / ‖a‖`` in float64, in chunks (two zero rows: 0)."""
    cos_dev, norm_rel = np.empty(len(a)), np.empty(len(a))
    for s in range(0, len(a), _CHUNK_ROWS):
        x, y = np.asarray(a[s:s + _CHUNK_ROWS], np.float64), np.asarray(b[s:s + _CHUNK_ROWS], np.float64)
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        dot = np.einsum("ij,ij->i", x, y)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where((nx > 0) & (ny > 0), dot / (nx * ny), np.where((nx == 0) & (ny == 0), 1.0, 0.0))
            rel = np.where(nx > 0, np.abs(ny - nx) / nx, np.where(ny == 0, 0.0, np.inf))
        cos_dev[s:s + len(x)], norm_rel[s:s + len(x)] = 1.0 - cos, rel
    return cos_dev, norm_rel


def parity_report(torch_feats: np.ndarray, onnx_feats: np.ndarray, meta: IJBMeta,
                  fars: Sequence[float] = metrics.DEFAULT_FARS, *, torch_pooled: Pooled | None = None,
                  score_weighting: bool = True) -> dict[str, Any]:
    """How far served features are from the evaluated ones, per face and in 1:1 TAR.

    Args:
        torch_feats, onnx_feats: [N, D] face features (face order of ``meta``, flip fused, unnormalised)
            of the same model from PyTorch evaluation and from onnxruntime.
        meta: :func:`~facecompat.eval.ijb.load_ijb_meta` of the faces' folder.
        fars: target FARs. torch_pooled: ``pool(meta, torch_feats)`` when the caller has it.
        score_weighting: detector-score weighting when pooling (evaluation's default).

    Returns:
        ``{"max_cosine_deviation", "p999_cosine_deviation", "max_norm_rel_diff": float,
        "tar_change": {far: TAR(onnx|onnx) − TAR(torch|torch)}, "cross_tar_change": {far: TAR(onnx|torch)
        − TAR(torch|torch)}, "faces": N}``, FAR keys ``format(far, "g")``, TARs as fractions (nearest
        ROC point, insightface's TAR@FAR).
    """
    if torch_feats.ndim != 2 or torch_feats.shape != onnx_feats.shape:
        raise ParityError(f"PyTorch features {tuple(torch_feats.shape)} and ONNX features "
                          f"{tuple(onnx_feats.shape)} differ in shape")
    if len(torch_feats) != meta.num_faces:
        raise ParityError(f"{len(torch_feats)} feature rows, the meta lists {meta.num_faces} faces")
    cos_dev, norm_rel = _row_deviation(torch_feats, onnx_feats)
    pooled_t = torch_pooled if torch_pooled is not None else pool(meta, torch_feats, score_weighting)
    pooled_o = pool(meta, onnx_feats, score_weighting)
    base = verify_1to1(meta, pooled_t, fars=fars)["tar_at_far"]
    served = verify_1to1(meta, pooled_o, fars=fars)["tar_at_far"]
    mixed = verify_1to1(meta, pooled_o, pooled_t, fars=fars)["tar_at_far"]  # ONNX probes, PyTorch gallery
    keys = [(format(far, "g"), metrics.far_key(far)) for far in fars]
    return {"max_cosine_deviation": float(cos_dev.max(initial=0.0)),
            "p999_cosine_deviation": float(np.percentile(cos_dev, 99.9)) if cos_dev.size else 0.0,
            "max_norm_rel_diff": float(norm_rel.max(initial=0.0)),
            "tar_change": {label: served[k] - base[k] for label, k in keys},
            "cross_tar_change": {label: mixed[k] - base[k] for label, k in keys},
            "faces": int(len(torch_feats))}


def _file_name(name: str) -> str:
    """A model name (catalog name or a path) as a file name: other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def model_parity(model: nn.Module, model_name: str, root: str | os.PathLike, faces: FaceList, meta: IJBMeta,
                 torch_feats: np.ndarray, *, workdir: str | os.PathLike,
                 fars: Sequence[float] = metrics.DEFAULT_FARS, batch_size: int = 64, flip: bool = True,
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 num_workers: int | None = None, opset: int = 17, torch_pooled: Pooled | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Export ``model`` to ``workdir/<model_name>.onnx`` (atomically, checked against PyTorch on random
    inputs), embed the faces with onnxruntime and compare with ``torch_feats`` (:func:`parity_report`).

    ``torch_feats`` are the evaluation features of this model on these faces (same ``flip``); under
    autocast they carry its rounding, which then counts as deviation. Other arguments: as
    :func:`onnx_features` and :func:`parity_report`.

    Returns:
        ``{"onnx": path, "sha1", "max_cosine_deviation", "p999_cosine_deviation", "max_norm_rel_diff",
        "tar_change": {far: x}, "cross_tar_change": {far: x}, "faces": N, "provider": the one that ran}``.
    """
    _onnxruntime(export=True)
    if torch_feats.ndim != 2:
        raise ParityError(f"PyTorch features of {model_name} are {tuple(torch_feats.shape)}, [N, D] expected")
    path = Path(workdir) / f"{_file_name(model_name)}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, path, opset=opset)
    session = open_session(path, providers, threads)
    onnx_feats = _embed_faces(session, path, root, faces, batch_size=batch_size, flip=flip,
                              num_workers=num_workers, dim=torch_feats.shape[1], progress=progress)
    report = parity_report(torch_feats, onnx_feats, meta, fars, torch_pooled=torch_pooled)
    return {"onnx": str(path), "sha1": file_sha1(path), **report, "provider": session.get_providers()[0]}


# --- FCT's h -------------------------------------------------------------------------------------


class _Prediction(nn.Module):
    """h with plain tensor outputs: ``(old[, side]) -> prediction [B, D_new] (, log_var [B])``."""

    def __init__(self, module: Transformation):
        super().__init__()
        self.module = module

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None):
        pred, log_var = self.module(old, side)
        return pred if log_var is None else (pred, log_var)


def _transform_io(module: Transformation) -> tuple[list[str], list[str]]:
    return (list(TRANSFORM_INPUTS[:2 if module.side_dim else 1]),
            list(TRANSFORM_OUTPUTS[:2 if module.log_var is not None else 1]))


def export_transform_onnx(module: Transformation, out_path: str | os.PathLike, opset: int = 17,
                          atol: float = 1e-4) -> dict[str, Any]:
    """Export FCT's h (in eval mode) to ONNX with a dynamic batch: inputs ``"old"`` [B, D_old] (and
    ``"side"`` [B, D_side] with side-information), outputs ``"prediction"`` [B, D_new] (h's unit-scale
    output: a server multiplies by ``output_norm`` as :meth:`FCTransform.apply` does) and, with
    uncertainty, ``"log_var"`` [B]. Checked with onnxruntime on seeded inputs at batch 1 and 3 before
    it is written atomically (nothing is written if an output differs by more than ``atol``).

    Returns:
        ``{"path": str, "max_abs_diff": float, "inputs": [...], "outputs": [...]}``.
    """
    ort = _onnxruntime(export=True)
    inputs, outputs = _transform_io(module)
    dims = [module.old_dim, module.side_dim][:len(inputs)]
    device = next(module.parameters()).device
    wrapper, was_training = _Prediction(module), module.training
    module.eval()
    try:
        sample = tuple(torch.zeros((2, d), device=device) for d in dims)
        buffer = io.BytesIO()
        axes = {name: {0: "batch"} for name in inputs + outputs}
        with warnings.catch_warnings():  # the TorchScript exporter, as export_onnx chooses it
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="The feature will be removed.*")
            # torch 2.4 has no ``dynamo`` keyword (its export is TorchScript's); 2.9+ defaults it to True.
            choice = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(wrapper, sample, buffer, input_names=inputs, output_names=outputs,
                              opset_version=opset, dynamic_axes=axes, do_constant_folding=True, **choice)
        session = ort.InferenceSession(buffer.getvalue(), providers=list(DEFAULT_PROVIDERS))
        generator, worst = torch.Generator().manual_seed(0), 0.0
        for batch in (1, 3):
            feeds = [torch.randn((batch, d), generator=generator) for d in dims]
            with torch.no_grad():
                expected = wrapper(*(f.to(device) for f in feeds))
            expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
            got = session.run(outputs, {n: f.numpy() for n, f in zip(inputs, feeds)})
            for g, e in zip(got, expected):
                worst = max(worst, float(np.abs(g - e.float().cpu().numpy()).max()))
    finally:
        module.train(was_training)
    if not worst <= atol:  # also catches NaN
        raise ParityError(f"{out_path}: onnxruntime and PyTorch differ by up to {worst:.3g} > atol {atol:g}; "
                          "nothing written")
    with atomic_write(Path(out_path), "wb") as f:
        f.write(buffer.getvalue())
    return {"path": str(out_path), "max_abs_diff": worst, "inputs": inputs, "outputs": outputs}


def transform_parity(transform: FCTransform, old_feats: np.ndarray, side_feats: np.ndarray | None,
                     workdir: str | os.PathLike, *, name: str = "fct", batch_size: int = 65_536,
                     providers: Sequence[str] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Export FCT's h to ``workdir/<name>.onnx`` (:func:`export_transform_onnx`) and compare its served
    output (``prediction × output_norm``) with :meth:`FCTransform.apply` on the given features.

    Args:
        old_feats: [N, D_old] old-model features; side_feats: [N, D_side], or None without side-information.

    Returns:
        ``{"onnx": path, "sha1", "max_cosine_deviation", "max_abs_diff" (of the scaled predictions),
        "rows": N, "side_information": bool, "provider"}``.
    """
    expected, _ = transform.apply(old_feats, side_feats)  # FCTError on missing/extra side or shapes
    path = Path(workdir) / f"{_file_name(name)}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_transform_onnx(transform.module, path)
    session = open_session(path, providers, threads)
    inputs = [i.name for i in session.get_inputs()]
    feeds = [old_feats] if len(inputs) == 1 else [old_feats, side_feats]
    served, scale = np.empty_like(expected), np.float32(transform.output_norm)
    for s in range(0, len(old_feats), batch_size):
        batch = {n: np.ascontiguousarray(f[s:s + batch_size], np.float32) for n, f in zip(inputs, feeds)}
        served[s:s + batch_size] = session.run([TRANSFORM_OUTPUTS[0]], batch)[0] * scale  # as apply() scales
    cos_dev, _ = _row_deviation(expected, served)
    return {"onnx": str(path), "sha1": file_sha1(path),
            "max_cosine_deviation": float(cos_dev.max(initial=0.0)),
            "max_abs_diff": float(np.abs(served - expected).max(initial=0.0)), "rows": int(len(old_feats)),
            "side_information": transform.uses_side, "provider": session.get_providers()[0]}
