"""FCT training data: three run directories (old, side-information, new) with banks of the generated
data's training view holding planted features, new = old @ R (a rotation h can learn exactly), and
the FCT config that names them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from facecompat.compat.fct import FCTConfig, load_fct_config
from facecompat.data.loader import build_dataset
from facecompat.features import FeatureBank, default_bank_dir
from facecompat.features.bank import dataset_classes
from tests.helpers.models import make_run_dir, model_spec

OLD_DIM, SIDE_DIM, NEW_DIM = 16, 8, 16


def planted_features(view, seed: int = 0) -> dict[str, np.ndarray]:
    """Old and side features per (record, side), new = old @ R (a rotation): h can learn it exactly,
    and cos(old, new) is near 0."""
    rng = np.random.default_rng(seed)
    n = view.num_images
    old = rng.standard_normal((n, 2, OLD_DIM)).astype(np.float32)
    old[:, 1] = old[:, 0] + 0.3 * rng.standard_normal((n, OLD_DIM))  # the flip is close to the image
    rot, _ = np.linalg.qr(rng.standard_normal((OLD_DIM, NEW_DIM)))
    side = np.tanh(old[..., :SIDE_DIM]) + 0.1 * rng.standard_normal((n, 2, SIDE_DIM))
    return {"old": old, "side": side.astype(np.float32), "new": (old @ rot).astype(np.float32)}


def make_planted(tmp: Path, data_root: Path) -> tuple[FCTConfig, Path, dict[str, Path], Path]:
    """Three run directories and their banks of the full tiny view under ``tmp``, written where training
    looks, and an FCT config naming them (40 epochs); ``(config, its path, {role: run dir}, tmp)``."""
    runs = {"old": make_run_dir(tmp / "old", seed=0, embedding_size=OLD_DIM),
            "side": make_run_dir(tmp / "side", seed=1, embedding_size=SIDE_DIM),
            "new": make_run_dir(tmp / "new", seed=2, embedding_size=NEW_DIM)}
    cfg_path = tmp / "fct.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "data": {"rec": str(data_root / "train"), "num_workers": 0},
        **{role: {"checkpoint": str(path)} for role, path in runs.items()},
        "transform": {"hidden": [64], "uncertainty": True},
        "train": {"epochs": 40, "batch_size": 32, "lr": 3e-3, "val_ratio": 0.1, "warmup_epochs": 0.5},
        "output": str(tmp / "out"), "bank_root": str(tmp)}))
    cfg = load_fct_config(cfg_path)
    view = build_dataset(cfg.data)
    feats = planted_features(view)
    for role, path in runs.items():
        spec = model_spec(path)
        FeatureBank.from_arrays(default_bank_dir(tmp, spec, view), view.record_ids, dataset_classes(view),
                                feats[role], model={**spec.fingerprint(), "name": spec.name})
    return cfg, cfg_path, runs, tmp
