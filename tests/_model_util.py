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


def make_run_dir(path, seed: int, network: str = "r18-w0.125", embedding_size: int = 32):
    """A run directory (``model.pt`` with random weights + ``config.yaml``) as the trainer writes one."""
    from facecompat.config import dump_config, load_config

    path.mkdir(parents=True)
    torch.manual_seed(seed)
    torch.save(get_model(network, embedding_size).state_dict(), path / "model.pt")
    dump_config(load_config(None, [f"model.network={network}", f"model.embedding_size={embedding_size}"]),
                path / "config.yaml")
    return path


def load_tool(path, name: str):
    """A tools/*.py script as a module, so its main() runs in the test process (a subprocess pays
    seconds of torch import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
