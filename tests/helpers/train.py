"""A tiny experiment config over the generated data (``synthetic_tiny``), for every test that trains."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.helpers import REPO


def write_config(tmp: Path, root: Path, name: str = "run", **sets: object) -> Path:
    """A tiny experiment over the generated data; ``sets`` are dotted overrides."""
    values = {
        "data.rec": str(root / "train"), "data.val_dir": str(root), "data.val_targets": ["lfw"],
        "data.loader": "torch", "data.num_workers": 0, "data.batch_size": 16,
        "model.network": "r18-w0.125", "model.embedding_size": 64, "model.precision": "fp32",
        "head.scale": 32.0, "optim.lr": 0.05, "train.epochs": 3, "train.log_every": 2,
        "train.checkpoint_every": 3, "train.val_every": 10, "train.deterministic": True,
        "train.output": str(tmp / "runs"),
    }
    values.update({k.replace("__", "."): v for k, v in sets.items()})
    tree: dict = {"_base_": str(REPO / "configs" / "base.yaml")}
    for key, value in values.items():
        section, field = key.split(".")
        tree.setdefault(section, {})[field] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path
