"""Per-face features of the models an evaluation names: extracted once per model and cached, or, for
an FCT transformation, its old (and side-information) model's cached features mapped by h.

    specs = resolve_models(["new", "fct"], catalog)
    feats = model_features(specs, catalog, ijb_dir, "IJBC", faces)      # {name: [faces, D]}

Rows follow the face list (``meta/<target>_name_5pts_score.txt``); faces whose image is missing
(``--allow-missing``) get zero rows. Under torchrun the extraction is split over the ranks and
every rank returns the full arrays.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from facecompat.compat.fct import FCTransform
from facecompat.eval.catalog import EvalCatalog, TransformSpec, resolve_model
from facecompat.eval.extract import FaceList, extract_cached
from facecompat.models.spec import ModelSpec, load_model


def resolve_models(names: Sequence[str], catalog: EvalCatalog, catalog_source: str = "the catalog",
                   network: str | None = None) -> dict[str, ModelSpec | TransformSpec]:
    """Every name resolved (:func:`~facecompat.eval.catalog.resolve_model`); ValueError when their
    embeddings have different sizes (they could not be compared across)."""
    specs = {name: resolve_model(name, catalog, catalog_source, network) for name in names}
    dims = {name: spec.embedding_size for name, spec in specs.items()}
    if len(set(dims.values())) > 1:
        raise ValueError("models of different embedding sizes cannot be compared across: "
                         + ", ".join(f"{n} {d}-d" for n, d in dims.items()))
    return specs


def _full_order(local: np.ndarray, faces: FaceList) -> np.ndarray:
    if not faces.num_missing:
        return local
    full = np.zeros((len(faces) + faces.num_missing, *local.shape[1:]), local.dtype)
    full[faces.rows] = local
    return full


def model_features(specs: dict[str, ModelSpec | TransformSpec], catalog: EvalCatalog, ijb_dir: Path,
                   target: str, faces: FaceList, *, cache_dir: str | os.PathLike | None = None,
                   batch_size: int | None = None, num_workers: int | None = None,
                   device: torch.device | None = None, log: Callable[[str], None] = lambda line: None,
                   uncertainty: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Features of every spec in the full face order (float32 ``[faces, D]``).

    Args:
        uncertainty: if given, filled with FCT's per-face σ² (``[faces]``) for transformations that
            predict it.
    Raises:
        ExtractError / WeightsError / FCTError: bad images, weights, or a transformation whose old or
            side-information model's weights changed since it was trained.
    """
    device = device or torch.device("cpu")
    autocast = None
    if device.type == "cuda":
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cache = Path(cache_dir or catalog.cache_dir)
    done: dict[str, np.ndarray] = {}  # by cache name: a model shared by a transformation runs once

    def embed(spec: ModelSpec) -> np.ndarray:
        if spec.name not in done:
            log(f"features of {spec.name}: {spec.network}, {spec.weights}")
            model = load_model(spec, device)
            done[spec.name] = extract_cached(
                model, spec.name, spec.fingerprint(), ijb_dir, target, cache, faces=faces, flip=catalog.flip,
                mmap=True, batch_size=batch_size or catalog.batch_size,
                num_workers=catalog.num_workers if num_workers is None else num_workers, device=device,
                autocast_dtype=autocast)
            del model
        return done[spec.name]

    out = {}
    for name, spec in specs.items():
        if isinstance(spec, TransformSpec):

            fct = FCTransform.load(spec.directory, device)
            fct.check_models(spec.old.fingerprint(), spec.side.fingerprint() if spec.side else None)
            old = embed(spec.old)
            side = embed(spec.side) if spec.side is not None else None
            log(f"features of {name}: FCT {spec.directory} on {spec.old.name}"
                + (f" + {spec.side.name}" if spec.side else ""))
            local, var = fct.apply(np.asarray(old), None if side is None else np.asarray(side))
            if uncertainty is not None and var is not None:
                uncertainty[name] = _full_order(var, faces)
        else:
            local = embed(spec)
        out[name] = _full_order(np.asarray(local), faces)
    return out


__all__ = ["model_features", "resolve_models"]
