"""Shared fixtures: small generated data sets, made once per test session; the CPU/GPU split.

Tests not marked ``gpu`` run on the CPU on every machine, a GPU machine included: CUDA is hidden
from this process and every process it starts (``CUDA_VISIBLE_DEVICES`` is emptied before torch
initialises CUDA), so defaults such as the trainer's device, the 2-rank helpers' ``LOCAL_RANK=1``
and the bit-exact resume checks behave as on a CPU machine. The ``gpu``-marked tests run in a
pass of their own with ``FACECOMPAT_TEST_GPU=1`` (``tools/test.sh`` adds it where a GPU is
present), which keeps CUDA visible and skips them where there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

GPU_PASS = os.environ.get("FACECOMPAT_TEST_GPU") == "1"
if not GPU_PASS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated data root (train/ rec, IJBC/, lfw.bin) with 30 identities of 6-10 images."""
    from facecompat.data.synthetic.sets import SyntheticSpec, generate_synthetic

    root = tmp_path_factory.mktemp("synthetic_tiny")
    spec = SyntheticSpec(num_ids=30, imgs_per_id=(6, 10), ijbc_subjects=12, lfw_pairs=40,
                         impostors_per_genuine=5, seed=3)
    generate_synthetic(root, spec, workers=2, progress=False)
    return root


# The longest file first: with two xdist workers (tools/test.sh, --dist loadfile) it runs beside
# the rest of the suite instead of after it, on a worker left alone with one thread. Full paths:
# basenames repeat across the layers (pipelines/ and tools/ both have a test_quickstart.py).
LONGEST_FIRST = (Path(__file__).resolve().parent / "pipelines" / "test_quickstart.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path not in LONGEST_FIRST)  # stable: order kept otherwise
    if GPU_PASS:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="FACECOMPAT_TEST_GPU=1 but torch sees no CUDA GPU")
            for item in items:
                if "gpu" in item.keywords:
                    item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: runs in the GPU pass (FACECOMPAT_TEST_GPU=1 "
                                   "pytest -m gpu, which tools/test.sh adds where a GPU is present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
