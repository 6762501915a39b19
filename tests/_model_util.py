"""Small backbones with sane output scales, shared by the model and export tests."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from facecompat.models import get_model


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
