"""The compatibility tests' shared builders: a new-model config against an old run, a bank of random
features, a method's context."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facecompat.compat import base
from facecompat.compat.bct import view_classes
from facecompat.config import load_config
from facecompat.features import FeatureBank
from tests.helpers.train import write_config

DIM = 32  # the embedding size of the compatibility tests' old and new models


def new_config(tmp: Path, root: Path, old_run: Path, method: str, protocol: str = "exclass", **sets):
    values = {"data.protocol": protocol, "data.part": "new", "data.val_targets": [],
              "model.embedding_size": DIM, "compat.method": method,
              "compat.old": {"checkpoint": str(old_run)},
              "compat.bank_dir": str(tmp.parent / f"bank-{protocol}"), "train.epochs": 1, **sets}
    return load_config(write_config(tmp, root, method, **values))


def random_bank(directory: Path, view, seed: int = 0) -> FeatureBank:
    rng = np.random.default_rng(seed)
    classes = view_classes(view)[view.labels]
    feats = rng.standard_normal((view.num_images, 2, DIM)).astype(np.float16)
    return FeatureBank.from_arrays(directory, view.record_ids, classes, feats, model={"name": "random"})


def context(view, head, bank=None, **kw) -> base.CompatContext:
    return base.CompatContext(params=kw.pop("params", {}), weight=kw.pop("weight", 1.0), view=view, head=head,
                              embedding_size=DIM, bank=bank, **kw)
