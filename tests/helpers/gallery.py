"""An upgradable gallery's models, for the tests that need a transformation but not a trained one (the
index upgrades, the gallery tools, backfill and evaluation by catalog): three random-weight run
directories (old, side-information, new) and two untrained transformations that name them (``fct``:
with side-information and uncertainty; ``noside``: neither); feature stores of the old and side models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from facecompat.compat.fct import Transformation, save_transformation
from facecompat.index.store import FeatureStore
from facecompat.index.upgrade import store_model_features
from tests.helpers.models import make_run_dir, model_spec

OLD_DIM, SIDE_DIM, NEW_DIM = 8, 4, 8


def make_gallery_models(tmp: Path) -> dict:
    """``{"runs": {role: run dir}, "fp": {role: fingerprint}, "dirs": {"fct" | "noside": dir}}``."""
    runs = {"old": make_run_dir(tmp / "old", seed=0, embedding_size=OLD_DIM),
            "side": make_run_dir(tmp / "side", seed=1, embedding_size=SIDE_DIM),
            "new": make_run_dir(tmp / "new", seed=2, embedding_size=NEW_DIM)}
    specs = {role: model_spec(path) for role, path in runs.items()}
    records = {role: {"role": role, "name": s.name, "source": s.source, "network": s.network,
                      "embedding_size": s.embedding_size, "weights": str(s.weights), **s.fingerprint()}
               for role, s in specs.items()}
    dirs = {}
    for name, side_dim in (("fct", SIDE_DIM), ("noside", 0)):
        torch.manual_seed(3)
        module = Transformation(OLD_DIM, side_dim, NEW_DIM, hidden=(16,), uncertainty=name == "fct")
        arch = {"old_dim": OLD_DIM, "side_dim": side_dim, "new_dim": NEW_DIM, "hidden": [16],
                "uncertainty": name == "fct"}
        chosen = {r: rec for r, rec in records.items() if side_dim or r != "side"}
        dirs[name] = save_transformation(tmp / name, module, {"architecture": arch, "models": chosen})
    return {"runs": runs, "fp": {r: s.fingerprint() for r, s in specs.items()}, "dirs": dirs}


def gallery_stores(tmp_path: Path, models: dict, num: int = 200) -> tuple[FeatureStore, FeatureStore]:
    """An old-model store (ids not sorted) and a side store of the same items in another order."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(10 * num)[:num].astype(np.int64) * 3 + 7
    old = store_model_features(tmp_path / "old", rng.standard_normal((num, OLD_DIM)), ids,
                               models["fp"]["old"], meta={"items": "test"})
    perm = rng.permutation(num)
    side = store_model_features(tmp_path / "side", rng.standard_normal((num, SIDE_DIM))[perm], ids[perm],
                                models["fp"]["side"])
    return old, side


def write_gallery_catalog(root: Path, data_root: Path, models: dict) -> Path:
    """``root/catalog.yaml``: an evaluation catalog over ``data_root``'s IJB-C naming the old and new runs
    and the ``fct`` transformation between them, features cached in ``root/cache``."""
    path = root / "catalog.yaml"
    path.write_text(yaml.safe_dump({
        "data_root": str(data_root), "cache_dir": str(root / "cache"), "batch_size": 64, "num_workers": 0,
        "models": {"old": {"path": str(models["runs"]["old"])}, "new": {"path": str(models["runs"]["new"])},
                   "fct": {"transform": str(models["dirs"]["fct"])}}}))
    return path
