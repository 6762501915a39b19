"""Shared fixtures: small generated data sets, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated data root (train/ rec, IJBC/, lfw.bin) with 30 identities of 6-10 images."""
    from facecompat.data.synthetic_sets import SyntheticSpec, generate_synthetic

    root = tmp_path_factory.mktemp("synthetic_tiny")
    spec = SyntheticSpec(num_ids=30, imgs_per_id=(6, 10), ijbc_subjects=12, lfw_pairs=40,
                         impostors_per_genuine=5, seed=3)
    generate_synthetic(root, spec, workers=2, progress=False)
    return root


# The longest file first: with two xdist workers (tools/test.sh, --dist loadfile) it runs beside
# the rest of the suite instead of after it, on a worker left alone with one thread.
LONGEST_FIRST = ("test_quickstart.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: order kept otherwise
