"""BCT: the new model trained through the old model's classifier (influence loss, DESIGN §6).

``L = L_new(φ_new) + λ · L_old(W_old, φ_new)``: besides its own ArcFace head, the new embedding of
every sample goes through a frozen copy of the old classifier, with the old head's margin and
scale. Rows of that classifier, one per class of the new training view:

- identities the old model was trained on: the old run's Partial FC class centre, read from the
  checkpoint of the step its ``model.pt`` was written at (the bank's backbone; a later mid-epoch
  checkpoint is never paired with it), whatever world size wrote it;
- identities the old model never saw: the L2-normalised mean of the old features of their images
  (the bank's class means), which is where the old model puts them;
- ``prototype: class_mean`` uses class means for every class (old models without a classifier,
  e.g. insightface zoo backbones);
- class ids without any image (gaps in the dataset's labels, kept by views that do not relabel:
  OPdata, EXclass/EXdata's new part): a zero row. Such a class is never a label, so the row is
  never a positive; normalised it stays zero, so its logit is 0 for every sample (a negative like
  an orthogonal class) and, frozen, it takes no gradient and makes no NaN.

The frozen classifier is sharded over ranks exactly like the new head (the same class ranges and
sample rate ρ), so the influence loss costs one more Partial FC forward and works at any world
size. Its logits are scaled cosines with the old margin (``s·cos``, target ``s·(cos(m1θ+m2)−m3)``),
never raw cosines.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facecompat import checkpoint as ckpt
from facecompat import rng
from facecompat.compat.base import CompatContext, CompatMethod, CompatOutput, param_error
from facecompat.compat.lce import take_class_rows
from facecompat.compat.registry import register_method
from facecompat.config import ConfigError
from facecompat.data.loader import build_dataset
from facecompat.heads.grad import scale_grad
from facecompat.heads.partial_fc import PartialFC

# insightface's MS1M recipe: what a zoo backbone's old head used when no run config says otherwise.
ZOO_MARGINS, ZOO_SCALE = (1.0, 0.5, 0.0), 64.0


def view_classes(view) -> np.ndarray:
    """Dataset class of every view label, int64 ``[num_classes]``."""
    if view.label_map is not None:
        return np.asarray(view.label_map, dtype=np.int64)
    return np.arange(view.num_classes, dtype=np.int64)


def old_labels_of(classes: np.ndarray, old_view) -> np.ndarray:
    """The old head's label of each dataset class in ``classes``, -1 where the old model never
    trained on that class."""
    trained = np.unique(view_classes(old_view)[np.unique(old_view.labels)])
    if old_view.label_map is not None:
        old_map = np.asarray(old_view.label_map, dtype=np.int64)
        pos = np.clip(np.searchsorted(old_map, classes), 0, max(old_map.size - 1, 0))
        labels = np.where(old_map.size and (old_map[pos] == classes), pos, -1)
    else:
        labels = classes.copy()
    seen = np.isin(classes, trained)
    return np.where(seen, labels, -1).astype(np.int64)


def shard_class_means(ctx: CompatContext) -> tuple[Tensor, Tensor]:
    """(float32 ``[num_local, D]`` the bank's class means of this rank's head shard, bool
    ``[num_local]`` which classes have one); a class without a record gets a zero row."""
    head = ctx.head
    classes = view_classes(ctx.view)[np.arange(head.class_start, head.class_start + head.num_local)]
    rows = ctx.bank.class_rows(classes, missing=-1)
    means = take_class_rows(ctx.bank.class_stats().means, rows).astype(np.float32)
    return torch.from_numpy(means), torch.from_numpy(rows >= 0)


def old_classifier_rows(ctx: CompatContext, prototype: str) -> tuple[Tensor, Tensor]:
    """(float32 ``[num_local, D]`` frozen-classifier rows of this rank's shard, bool ``[num_local]``
    which came from the old classifier)."""
    head = ctx.head
    labels = np.arange(head.class_start, head.class_start + head.num_local)
    classes = view_classes(ctx.view)[labels]
    rows, _ = shard_class_means(ctx)  # zero rows for class ids without images
    from_old = torch.zeros(len(labels), dtype=torch.bool)
    if prototype == "class_mean":
        return rows, from_old
    if ctx.old_run_dir is None or ctx.old_config is None:
        raise ConfigError("compat.params.prototype: 'classifier' needs the old model's run directory "
                          "(compat.old.checkpoint); for a bare weights file set prototype: class_mean")
    # the classifier of the step model.pt (backbone and bank) comes from, never a later one
    try:
        path = ckpt.checkpoint_of_weights(ctx.old_run_dir, Path(ctx.old_run_dir) / "model.pt")
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"compat.old.checkpoint: the old classifier: {exc} "
                          "(or set compat.params.prototype: class_mean)") from None

    old_view = build_dataset(ctx.old_config.data)
    old = old_labels_of(classes, old_view)
    seen = old >= 0
    if seen.any():
        old_rows, num_old = ckpt.load_head_rows(path, old[seen])
        if num_old != old_view.num_classes:
            raise ConfigError(f"compat.old.checkpoint: {path} head has {num_old} classes but the old run's "
                              f"data ({ctx.old_config.data.rec}) has {old_view.num_classes}")
        if old_rows.shape[1] != rows.shape[1]:
            raise ConfigError(f"compat.old: classifier of {path} is {old_rows.shape[1]}-d, the new "
                              f"embeddings are {rows.shape[1]}-d")
        rows[torch.from_numpy(seen)] = old_rows
        from_old[torch.from_numpy(seen)] = True
    return rows, from_old


@register_method
class BCT(CompatMethod):
    """Params: ``prototype`` (``classifier``: the old run's class centres where it has them, class
    means elsewhere; ``class_mean``: class means for every class)."""

    name = "bct"
    needs = frozenset({"bank", "class_stats", "old_run"})
    defaults = {"prototype": "classifier"}

    def __init__(self, ctx: CompatContext):
        super().__init__(ctx)
        prototype = self.params["prototype"]
        if prototype not in ("classifier", "class_mean"):
            raise param_error("prototype", prototype, "must be 'classifier' or 'class_mean'")
        if ctx.old_config is not None:
            margins, scale = tuple(ctx.old_config.head.margins), float(ctx.old_config.head.scale)
        else:
            margins, scale = ZOO_MARGINS, ZOO_SCALE
        head = ctx.head
        rows, from_old = old_classifier_rows(ctx, prototype)
        old_head = PartialFC(ctx.embedding_size, head.num_classes, sample_rate=head.sample_rate,
                             margins=margins, scale=scale, seed=ctx.seed + 1, check_labels=False,
                             group=head.group)
        with torch.no_grad():
            old_head.weight.copy_(rows)
        old_head.weight.requires_grad_(False)
        # Not a registered submodule: frozen and rebuilt from the old run at start, so it is neither
        # optimised nor written into checkpoints (only its sampling stream is, below).
        object.__setattr__(self, "old_head", old_head.to(ctx.device))
        self.from_old_classifier = from_old
        self.world_size = ctx.world_size

    def forward(self, emb: Tensor, labels: Tensor, inputs: Mapping[str, Tensor]) -> CompatOutput:
        # A global-batch loss: its embedding gradient is already d(global mean)/d(local), so scale
        # it by the world size before DDP's average, as the trainer does for the new head.
        influence = self.old_head(scale_grad(emb, self.world_size), labels)
        return CompatOutput(emb, labels, {"bct": self.weight * influence})

    def get_extra_state(self) -> dict:
        return {"generator": self.old_head.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        head = self.old_head
        rng.restore_generator(head.generator, state["generator"], seed=head.sample_seed,
                              what="BCT old-head negative-class sampler")
