"""Backbones for tests: small ones with trained-like output scales, run directories as the trainer
writes them, their specs; one math thread for a module of tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from facecompat.config import dump_config, load_config
from facecompat.models import get_model
from facecompat.models.spec import ModelSpec, resolve_model_spec


def calibrated_model(name: str, seed: int = 0, **kw) -> nn.Module:
    """A model in eval mode whose BatchNorm statistics come from one random batch, so outputs
    have the unit scale of a trained model (random init with unit running variance grows without
    bound, and an absolute tolerance would be meaningless)."""
    torch.manual_seed(seed)
    model = get_model(name, **kw)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 112, 112) * 2 - 1)
    return model.eval()


def single_thread() -> Iterator[None]:
    """Generator for a module-scoped fixture: one intra-op thread while the module runs.

    These models are tiny (8-64 channels): with two threads on a small shared CPU the OpenMP
    hand-offs cost more than the convolutions and timings swing by 10x; one is steady.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_run_dir(path: Path, seed: int, network: str = "r18-w0.125", embedding_size: int = 32) -> Path:
    """A run directory (``model.pt`` with random weights + ``config.yaml``) as the trainer writes one."""
    path.mkdir(parents=True)
    torch.manual_seed(seed)
    torch.save(get_model(network, embedding_size).state_dict(), path / "model.pt")
    dump_config(load_config(None, [f"model.network={network}", f"model.embedding_size={embedding_size}"]),
                path / "config.yaml")
    return path


def model_spec(run_dir: Path) -> ModelSpec:
    """The spec of a run directory, named after it."""
    return ModelSpec(run_dir.name, *resolve_model_spec(run_dir), str(run_dir))
