"""The plug-in contract between the trainer and a compatibility method.

A method is an ``nn.Module`` registered by name. It declares what it needs from the old model
(:attr:`CompatMethod.needs`); the trainer prepares exactly that before step 0 (the old-feature
bank is extracted once and cached on disk) and hands it over in a :class:`CompatContext`.

Per step the data flow is::

    loader (host): batch_inputs(record_ids, flipped, labels) -> {name: tensor [b, ...]}  (bank lookups)
    trainer:       emb = backbone(images)                                                (float32 [b, D])
    method:        forward(emb, labels, inputs) -> CompatOutput(embeddings, labels, terms)
    trainer:       loss = head(embeddings, labels) + sum(terms)

Bank lookups happen on the host, in the loader, where the record ids already are: no device to
host synchronisation per step, and the bank stays one memory-mapped copy per machine.

Gradient convention (DDP averages backbone gradients over ranks): a term that is a mean over this
rank's samples is returned as it is; a term computed on the all-gathered global batch (a sharded
classifier) must scale the embedding gradient by the world size first, as the trainer does for
the head (:func:`facecompat.train.step.scale_grad`). Terms are weighted (λ) by the method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from facecompat.config import ConfigError

# What a method can ask the trainer for.
NEEDS = frozenset({
    "bank",            # per-sample old features (image and flip), FeatureBank
    "class_stats",     # per-class L2-normalised old means, angular radii (from the bank)
    "credible",        # MixBCT's credible mask (from the bank)
    "old_run",         # the old run's directory and config (its classifier shards, head settings)
})


class CompatOutput(NamedTuple):
    """What a method hands back for one micro-batch.

    Attributes:
        embeddings: ``[b, D]`` float32, what the head sees (the input, or rows replaced).
        labels: ``[b]`` int64, the head's labels for those rows.
        terms: named extra loss terms, each a scalar already multiplied by its weight.
    """

    embeddings: Tensor
    labels: Tensor
    terms: dict[str, Tensor]


@dataclass
class CompatContext:
    """Runtime objects a method is built from (prepared by the trainer).

    Attributes:
        params: the method's hyper-parameters (``compat.params``), validated by the method.
        weight: λ, the weight of the method's loss terms (``compat.weight``).
        view: the new model's training view (``FaceRecords``: record ids, view labels, label map).
        head: the new model's Partial FC head (this rank's shard).
        embedding_size: D of the new (and old) embeddings.
        rank, world_size: this process in the training group.
        device: where the step runs.
        seed: ``train.seed`` (methods derive their own streams from it and the rank).
        bank: the old-feature bank (:class:`facecompat.features.FeatureBank`) when
            ``"bank"``/``"class_stats"``/``"credible"`` is needed.
        old_run_dir: the old model's run directory (``checkpoints/`` with its classifier shards)
            when the old model was given as one; None for a bare weights file (a zoo backbone).
        old_config: that run's resolved :class:`facecompat.config.Config`, or None.
    """

    params: Mapping[str, Any]
    weight: float
    view: Any
    head: Any
    embedding_size: int
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    bank: Any = None
    old_run_dir: Any = None
    old_config: Any = None


class CompatMethod(nn.Module):
    """Base class of compatibility methods.

    Subclasses set :attr:`name`, :attr:`needs` and :attr:`defaults` (every accepted parameter
    with its default; an unknown ``compat.params`` key is a ConfigError naming it), and
    implement :meth:`forward`; :meth:`batch_inputs` when they read the bank per sample.
    Trainable parts (a discriminator) are ordinary submodules: the trainer optimises them and
    averages their gradients over ranks.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, ctx: CompatContext):
        super().__init__()
        self.ctx = ctx
        self.params = resolve_params(self.name, self.defaults, ctx.params)
        self.weight = float(ctx.weight)

    @classmethod
    def credible_ratios(cls, params: Mapping[str, Any]) -> tuple[float, ...]:
        """Keep ratios of the credible masks to prepare before training (rank 0 computes them)."""
        return ()

    def set_progress(self, progress: float) -> None:
        """Called by the trainer before every step with the share of training done, in ``[0, 1)``
        (a Python float, no device work): methods whose weights follow the schedule read it here."""

    def batch_inputs(self, record_ids: np.ndarray, flipped: np.ndarray,
                     labels: np.ndarray) -> dict[str, Tensor]:
        """Host-side per-sample inputs of one micro-batch (called by the loader, CPU tensors).

        Args:
            record_ids: int64 ``[b]`` the images' keys in the rec.
            flipped: bool ``[b]`` whether each image was mirrored.
            labels: int64 ``[b]`` the view's labels.
        """
        return {}

    def forward(self, emb: Tensor, labels: Tensor, inputs: Mapping[str, Tensor]) -> CompatOutput:
        """Args: ``emb`` float32 ``[b, D]`` (with grad), ``labels`` int64 ``[b]``, ``inputs`` from
        :meth:`batch_inputs` on the step's device."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.params.items())) + f", weight={self.weight}"


def resolve_params(method: str, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` overridden by ``given``; unknown keys and wrongly typed values are ConfigErrors."""
    out = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"compat.params.{key}: not a parameter of method {method!r} (known: {known})")
        want = defaults[key]
        if isinstance(want, (bool, str)):
            ok = type(value) is type(want)
        elif isinstance(want, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and isinstance(want, int) and not isinstance(want, bool) and value != int(value):
                ok = False
            if ok:
                value = type(want)(value)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"compat.params.{key}: expected {type(want).__name__}, got {value!r}")
        out[key] = value
    return out


def param_error(key: str, value: Any, reason: str) -> ConfigError:
    """The one-line error for a parameter value outside its range."""
    return ConfigError(f"compat.params.{key}: {reason}, got {value!r}")

