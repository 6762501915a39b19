"""The network h and its loss terms (see :mod:`facecompat.compat.fct`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecompat.compat.fct.config import FCTError


class Transformation(nn.Module):
    """``h([φ̂_old, ψ̂]) -> (prediction [b, D_new], log σ² [b] or None)``; see the module docstring."""

    def __init__(self, old_dim: int, side_dim: int, new_dim: int, hidden: Sequence[int] = (512, 512),
                 uncertainty: bool = True):
        super().__init__()
        self.old_dim, self.side_dim, self.new_dim = int(old_dim), int(side_dim), int(new_dim)
        layers: list[nn.Module] = []
        width = self.old_dim + self.side_dim
        for w in hidden:
            layers += [nn.Linear(width, w), nn.LayerNorm(w), nn.ReLU(inplace=True)]
            width = w
        self.body = nn.Sequential(*layers)
        self.mean = nn.Linear(width, self.new_dim)
        self.log_var = nn.Linear(width, 1) if uncertainty else None

    def forward(self, old: Tensor, side: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = F.normalize(old, dim=1)
        if self.side_dim:
            if side is None:
                raise FCTError(f"this transformation takes {self.side_dim}-d side-information; none given")
            x = torch.cat([x, F.normalize(side, dim=1)], dim=1)
        hidden = self.body(x)
        log_var = None if self.log_var is None else self.log_var(hidden).squeeze(1)
        return self.mean(hidden), log_var


def fct_losses(pred: Tensor, log_var: Tensor | None, target: Tensor, *, cosine_weight: float = 0.0,
               nll_weight: float = 1.0) -> dict[str, Tensor]:
    """Named loss terms (means over the rows); ``target`` is normalised here. See the module docstring."""
    t = F.normalize(target.to(pred.dtype), dim=1)
    err = (pred - t).pow(2).sum(dim=1)
    terms = {"mse": err.mean()}
    if cosine_weight:
        terms["cosine"] = cosine_weight * (1.0 - F.cosine_similarity(pred, t, dim=1)).mean()
    if log_var is not None and nll_weight:
        nll = 0.5 * (err.detach() * torch.exp(-log_var) + pred.shape[1] * log_var)
        terms["nll"] = nll_weight * nll.mean()
    return terms
