"""L2 feature regression to the old model (DESIGN §6), and its weakened form with a free radius.

``l2 = λ · mean_i relu(‖φ̂_new(x_i) − φ̂_old(x_i)‖ − τ)`` over this rank's samples, where φ̂ is the
L2-normalised embedding and φ_old the bank's feature of the same image with the same flip.
τ = 0 is plain L2 regression (λ = 10 in the compatibility literature); τ = 0.2 is the weakened
variant, which leaves the new feature free inside a ball of radius τ around the old one. The
distance is not squared: its gradient has unit size wherever the constraint is active.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facecompat.compat.base import CompatContext, CompatMethod, CompatOutput, param_error
from facecompat.compat.registry import register_method


def l2_distance_loss(emb: Tensor, old: Tensor, tau: float = 0.0) -> Tensor:
    """``mean_i relu(‖normalize(emb_i) − normalize(old_i)‖ − tau)``; ``emb``, ``old`` ``[b, D]``."""
    dist = (F.normalize(emb, dim=1) - F.normalize(old, dim=1)).norm(dim=1)
    return F.relu(dist - tau).mean()


@register_method
class L2(CompatMethod):
    """Params: ``tau`` (free radius, 0 for plain L2; the weakened variant uses 0.2)."""

    name = "l2"
    needs = frozenset({"bank"})
    defaults = {"tau": 0.0}

    def __init__(self, ctx: CompatContext):
        super().__init__(ctx)
        tau = self.params["tau"]
        if not 0.0 <= tau < 2.0:
            raise param_error("tau", tau, "must be in [0, 2) (distances of unit vectors are at most 2)")
        self.tau = float(tau)
        self.bank = ctx.bank

    def batch_inputs(self, record_ids: np.ndarray, flipped: np.ndarray,
                     labels: np.ndarray) -> dict[str, Tensor]:
        return {"old": torch.from_numpy(self.bank.lookup(record_ids, flipped))}

    def forward(self, emb: Tensor, labels: Tensor, inputs: Mapping[str, Tensor]) -> CompatOutput:
        loss = l2_distance_loss(emb, inputs["old"], self.tau)
        return CompatOutput(emb, labels, {"l2": self.weight * loss})
