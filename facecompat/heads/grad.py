"""Gradient scaling between a backbone and what reads its embeddings.

``scale_grad(x, k)`` is the identity forward and multiplies the gradient by ``k`` backward:
the trainer scales each rank's embedding gradient by the world size (a global-batch loss under
DDP's average), and the reversal layer of adversarial feature learning is ``k = -factor``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``factor`` (``x`` itself when it is 1)."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


def grad_reverse(x: Tensor, factor: float = 1.0) -> Tensor:
    """Identity forward; multiplies the gradient by ``-factor`` (a gradient reversal layer)."""
    return scale_grad(x, -factor)
