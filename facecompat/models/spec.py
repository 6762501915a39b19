"""A model as evaluation, banks and FCT load it: a run directory or a weights file, resolved.

    network, dim, weights = resolve_model_spec("work_dirs/r50")        # model.pt + config.yaml
    spec = ModelSpec(path_name(path), network, dim, weights, str(path))
    model = load_model(spec, device="cuda")                              # strict, eval mode

A run directory (what ``tools/train.py`` writes) names its backbone and embedding size in its
``config.yaml``; a bare weights file (an insightface zoo ``backbone.pth``) needs its network named.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from facecompat.config import load_config
from facecompat.errors import UserError
from facecompat.fileio import file_sha1
from facecompat.models._registry import (
    ModelNameError,
    WeightsError,
    embedding_size_of,
    get_model,
    load_backbone_weights,
)

RUN_DIR_FILES = ("model.pt", "config.yaml")


class ModelPathError(UserError, FileNotFoundError):
    """A model path that is neither a run directory nor a weights file (names what is missing)."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: what to build and which weights to load.

    ``name`` is the catalog name, or for a path a cache-safe name made of the path's stem and a
    hash of its absolute path (two different runs never share a cache folder).
    """

    name: str
    network: str
    embedding_size: int
    weights: Path
    source: str  # what the user named: the catalog entry or the path

    def fingerprint(self) -> dict:
        """The cache fingerprint keys of this model (weights hash, network, embedding size)."""

        return {"checkpoint_sha1": file_sha1(self.weights), "network": self.network,
                "embedding_size": self.embedding_size}


def resolve_model_spec(path: str | Path, network: str | None = None,
                       embedding_size: int | None = None) -> tuple[str, int, Path]:
    """What to build and load for a model given as a path.

    Args:
        path: a run directory (``model.pt`` + ``config.yaml``) or a weights file.
        network: backbone name; required for a weights file; for a run directory it replaces
            the config's ``model.network``.
        embedding_size: embedding size; for a weights file read from its embedding layer when
            ``None`` (512 if it has none we know); for a run directory it replaces the config's
            ``model.embedding_size``.

    Returns:
        ``(network, embedding_size, weights_path)``.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a run directory lacks a file (names it).
        ValueError: a weights file without ``network``, or an ``embedding_size`` its embedding
            layer disagrees with (WeightsError, also for an unreadable file); a bad ``config.yaml``
            (ConfigError).
    """
    path = Path(path)
    if path.is_dir():
        missing = [name for name in RUN_DIR_FILES if not (path / name).is_file()]
        if missing:
            raise ModelPathError(f"{path}: not a run directory, it lacks {' and '.join(missing)}")
        cfg = load_config(path / "config.yaml")
        return (network or cfg.model.network, embedding_size or cfg.model.embedding_size, path / "model.pt")
    if not path.is_file():
        raise ModelPathError(f"{path}: model not found (expected a run directory or a .pt file)")
    if not network:
        raise ModelNameError(f"{path}: a weights file needs its backbone name (--network, e.g. r50)")
    found = embedding_size_of(path)
    if embedding_size and found and embedding_size != found:
        raise WeightsError(f"{path}: its embedding layer is {found}-d, not the {embedding_size}-d asked for")
    return network, embedding_size or found or 512, path


def path_name(path: Path) -> str:
    """A cache-safe model name for a path: its stem and a hash of its absolute path (two different
    runs never share a cache folder)."""
    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", path.stem if path.is_file() else path.name) or "model"
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> nn.Module:
    """Build ``spec``'s backbone, load its weights strictly, move it to ``device``, eval mode.

    Raises:
        ValueError: an unknown network (names the model); WeightsError when the weights do not fit.
    """
    try:
        model = get_model(spec.network, spec.embedding_size)
    except ValueError as exc:  # unknown backbone name: say which model it was given for
        raise ModelNameError(f"{spec.source}: {exc}") from None
    load_backbone_weights(model, spec.weights)
    return model.to(device).eval()
