"""MixBCT: credible old features mixed into the new model's batch before its own head (DESIGN §6).

Per rank and micro-batch of b samples, up to ``int(alpha * b)`` rows of the new embeddings are
replaced by the old model's feature of the same image with the same flip (from the bank), chosen
uniformly at random among the batch's *credible* samples: the ``ceil(keep_ratio · n_c)`` images of
each class nearest (Euclidean) to its mean in the reference's denoising space, the unit old image
features with each column scaled to unit L2 norm over the training set (``denoise_credible.py``;
:meth:`FeatureBank.credible`). One ArcFace loss
on the mix then pulls the new model's class centres towards the old features, which makes new
embeddings land where the old model put that identity.

Differences from the public implementation, on purpose:

- the old feature matches the batch image's flip (it is looked up in a bank holding both), instead
  of one feature of a randomly flipped image;
- the choice is drawn from a generator seeded by ``(train.seed, rank)`` (and checkpointed), so a
  run is reproducible and a resumed run continues the same stream;
- when a batch holds fewer credible samples than ``int(alpha * b)``, all of them are mixed instead
  of failing; no host synchronisation is needed to decide which rows are mixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from facecompat import rng
from facecompat.compat.base import CompatContext, CompatMethod, CompatOutput, param_error
from facecompat.compat.bct import shard_class_means
from facecompat.compat.registry import register_method

_STREAM = 0x31C5_B7A1


def choose_mixed(credible: Tensor, num_mix: int, generator: torch.Generator | None = None) -> Tensor:
    """Bool ``[b]`` mask of ``min(num_mix, credible.sum())`` credible rows drawn uniformly.

    Credible rows get a key in [1, 2), the others one in [0, 1); the ``num_mix`` largest keys
    are therefore credible rows first, in uniformly random order, and non-credible rows taken to
    fill up are dropped by the final ``& credible``.
    """
    b = credible.shape[0]
    num_mix = min(int(num_mix), b)
    if num_mix <= 0:
        return torch.zeros_like(credible, dtype=torch.bool)
    keys = torch.rand(b, generator=generator, device=credible.device) + credible.to(torch.float32)
    chosen = torch.zeros(b, dtype=torch.bool, device=credible.device)
    chosen[torch.topk(keys, num_mix, sorted=False).indices] = True
    return chosen & credible.to(torch.bool)


@register_method
class MixBCT(CompatMethod):
    """Params: ``alpha`` (share of each rank's batch replaced, 0.3), ``keep_ratio`` (T, share of
    each class that is credible, 0.9)."""

    name = "mixbct"
    needs = frozenset({"bank", "credible"})
    defaults = {"alpha": 0.3, "keep_ratio": 0.9, "head_init": "random"}

    def __init__(self, ctx: CompatContext):
        super().__init__(ctx)
        alpha, keep = self.params["alpha"], self.params["keep_ratio"]
        if not 0.0 <= alpha <= 1.0:
            raise param_error("alpha", alpha, "must be in [0, 1]")
        if not 0.0 < keep <= 1.0:
            raise param_error("keep_ratio", keep, "must be in (0, 1]")
        if self.params["head_init"] not in ("random", "old_means"):
            raise param_error("head_init", self.params["head_init"], "must be 'random' or 'old_means'")
        self.alpha, self.keep_ratio = float(alpha), float(keep)
        if self.params["head_init"] == "old_means":
            # Class centres start at the old model's class means (a resumed run loads its own).
            # A class id without images (no record in the bank, never a label) keeps its random
            # centre: a zero row would take 1/eps gradients through the head's normalisation.

            rows, known = shard_class_means(ctx)
            weight = ctx.head.weight
            with torch.no_grad():
                weight[known.to(weight.device)] = rows[known].to(weight.device, weight.dtype)
        self.bank = ctx.bank
        self.credible = ctx.bank.credible(self.keep_ratio)  # bool [N], memory-mapped
        self.generator = torch.Generator(device=ctx.device)
        self._stream_seed = _seed(ctx.seed, ctx.rank)
        self.generator.manual_seed(self._stream_seed)

    @classmethod
    def credible_ratios(cls, params: Mapping[str, Any]) -> tuple[float, ...]:
        return (float(params["keep_ratio"]),)

    def batch_inputs(self, record_ids: np.ndarray, flipped: np.ndarray,
                     labels: np.ndarray) -> dict[str, Tensor]:
        rows = self.bank.rows(record_ids)
        return {"old": torch.from_numpy(self.bank.features_at(rows, flipped)),
                "credible": torch.from_numpy(np.asarray(self.credible[rows], dtype=bool))}

    def forward(self, emb: Tensor, labels: Tensor, inputs: Mapping[str, Tensor]) -> CompatOutput:
        num_mix = int(self.alpha * emb.shape[0])
        mixed = choose_mixed(inputs["credible"], num_mix, self.generator)
        out = torch.where(mixed.unsqueeze(1), inputs["old"].to(emb.dtype), emb)
        return CompatOutput(out, labels, {})

    # The sampling stream is part of the state, so that a resumed run draws what it would have.
    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        rng.restore_generator(self.generator, state["generator"], seed=self._stream_seed,
                              what="MixBCT choice of mixed samples")


def _seed(seed: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + _STREAM + 7919 * int(rank)) % (2**63)
