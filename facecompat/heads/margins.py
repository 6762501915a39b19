"""Combined angular margin (ArcFace / CosFace / SphereFace-style), applied to cosine logits.

Target logit ``s * (cos(m1 * theta + m2) - m3)`` with ``theta = acos(cos)``; every other logit is
``s * cos``. ArcFace is ``(1, 0.5, 0)``, CosFace ``(1, 0, 0.4)``, insightface's "combined" loss
``(1, 0.3, 0.2)``.

Two backward modes (the forward values are identical in both):

- ``exact_grad=True``: the true derivative of the formula,
  ``d/dc cos(m1 * acos(c) + m2) = m1 * sin(m1 * theta + m2) / sin(theta)``. It is unbounded as
  ``c -> +-1`` when the margin is angular, so the derivative is evaluated at ``c`` clamped to
  ``[-1 + eps, 1 - eps]`` (``eps`` 1e-6 in float32, 1e-12 in float64); the forward value uses the
  unclamped ``c``. No NaN or inf at ``c = +-1``.
- ``exact_grad=False``: arcface_torch's straight-through ArcFace: the margin is added to ``theta``
  under ``no_grad``, so the gradient is the one of ``s * cos(theta)`` (``s`` per target logit).

Memory: clamp, scale and margin are one autograd node that saves only the ``[B]`` target cosines, so
the ``[B, n]`` logits cost one buffer forward and one gradient buffer backward (the Partial FC logits
are the largest activations of a face-recognition step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Named margin triples (m1, m2, m3); configs may use the triple directly.
MARGIN_PRESETS: dict[str, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.4),
    "combined": (1.0, 0.3, 0.2),
}

# Clamp of the cosine where the exact derivative is evaluated (it diverges at +-1 for angular margins).
_GRAD_EPS = {torch.float64: 1e-12}
_GRAD_EPS_DEFAULT = 1e-6  # float32: 1 - 1e-6 is ~17 ulps below 1, sin(theta) >= 1.4e-3


def get_margins(name: str) -> tuple[float, float, float]:
    """The (m1, m2, m3) triple registered as ``name``; raises listing the valid names."""
    if name not in MARGIN_PRESETS:
        raise KeyError(f"unknown margin {name!r}; valid: {', '.join(sorted(MARGIN_PRESETS))}")
    return MARGIN_PRESETS[name]


class _MarginFn(torch.autograd.Function):
    """``s * clamp(cos)`` with the margin on the target column of each row; see :class:`CombinedMargin`.

    The clamp to [-1, 1] passes the gradient straight through (values outside only come from rounding
    in the matmul of unit vectors, and a zero gradient there would silence the most confident targets).
    """

    @staticmethod
    def forward(ctx, cos: Tensor, labels: Tensor, margin: CombinedMargin) -> Tensor:  # type: ignore[override]
        dtype = torch.promote_types(cos.dtype, torch.float32)  # bf16/fp16 cosines are upcast first
        logits = cos.to(dtype, copy=True).clamp_(-1.0, 1.0)
        has_target = labels >= 0
        # One column per row (column 0 for rows without a target here, written back unchanged) rather
        # than indexing the owned rows: no data-dependent shape, so no host sync.
        cols = labels.clamp_min(0).unsqueeze(1)
        if logits.shape[1] == 0:  # an empty shard (fewer classes than ranks)
            target = logits.new_zeros(labels.shape[0])
        else:
            target = logits.gather(1, cols).squeeze(1)
        ctx.margin, ctx.in_dtype = margin, cos.dtype
        ctx.save_for_backward(target, cols, has_target)
        logits.mul_(margin.scale)
        if logits.shape[1] > 0:
            new_target = torch.where(has_target, margin.target_value(target), target)
            logits.scatter_(1, cols, (new_target * margin.scale).unsqueeze(1))
        return logits

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        margin: CombinedMargin = ctx.margin
        grad_cos = grad * margin.scale
        if margin.exact_grad and grad.shape[1] > 0:
            target, cols, has_target = ctx.saved_tensors
            deriv = torch.where(has_target, margin.target_derivative(target), 1.0)
            grad_cos.scatter_(1, cols, grad_cos.gather(1, cols) * deriv.unsqueeze(1))
        # (straight-through: the target's gradient is s, like every other logit's.)
        return grad_cos.to(ctx.in_dtype), None, None


class CombinedMargin(nn.Module):
    """Scaled cosine logits with the combined margin on the target logits.

    Where ``m1 * theta + m2 > pi`` the target logit would stop decreasing with ``theta`` (and a
    large-angle sample would be rewarded for moving away from its centre). There we use the classic
    insightface ArcFace fallback generalised to any ``(m1, m2)``: with the threshold angle
    ``theta_t = (pi - m2) / m1``, for ``theta > theta_t`` the target is
    ``cos(theta) - (pi - theta_t) * sin(theta_t) - m3``, i.e. a CosFace-style margin equal to the
    first-order penalty of the extra angle ``(pi - theta_t)`` at ``theta_t``. For ``m1 = 1`` this is
    exactly insightface's ``cos(theta) - sin(pi - m2) * m2``, applied where ``cos(theta) <= cos(pi - m2)``.
    The target jumps down at ``theta_t`` and stays monotone in ``cos`` for extra angles
    ``pi - theta_t`` up to ~2.3 rad (every practical margin). Margins with ``m1 * pi + m2 <= pi``
    (CosFace) never reach the fallback. arcface_torch's current straight-through path has no fallback;
    here both gradient modes share the same forward values. Cosines are clamped to [-1, 1] first
    (gradient passed straight through the clamp).

    Args:
        m1, m2, m3: multiplicative angular, additive angular and additive cosine margins (``m1 > 0``).
        scale: the logit scale ``s``.
        exact_grad: true derivative (True) or arcface_torch's straight-through gradient (False).
    """

    def __init__(self, m1: float, m2: float, m3: float, scale: float, exact_grad: bool = True) -> None:
        super().__init__()
        if not m1 > 0:
            raise ValueError(f"margin m1 must be > 0, got {m1}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.m1, self.m2, self.m3, self.scale = float(m1), float(m2), float(m3), float(scale)
        self.exact_grad = bool(exact_grad)
        # No angular margin: the target is cos - m3 exactly (no acos/cos round trip).
        self.angular = not (self.m1 == 1.0 and self.m2 == 0.0)
        theta_t = (math.pi - self.m2) / self.m1
        self.has_fallback = self.angular and theta_t < math.pi
        self.cos_threshold = math.cos(theta_t) if self.has_fallback else -1.0
        self.fallback_penalty = (math.pi - theta_t) * math.sin(theta_t) if self.has_fallback else 0.0

    def extra_repr(self) -> str:
        return (f"m1={self.m1}, m2={self.m2}, m3={self.m3}, scale={self.scale}, "
                f"exact_grad={self.exact_grad}")

    def target_value(self, cos: Tensor) -> Tensor:
        """``cos(m1 * acos(c) + m2) - m3`` with the fallback; ``cos`` in [-1, 1], same shape out."""
        if not self.angular:
            return cos - self.m3
        value = torch.cos(self.m1 * torch.acos(cos) + self.m2)
        if self.has_fallback:
            value = torch.where(cos > self.cos_threshold, value, cos - self.fallback_penalty)
        return value - self.m3

    def target_derivative(self, cos: Tensor) -> Tensor:
        """``d target_value / d c``, evaluated at ``c`` clamped away from +-1 (finite everywhere)."""
        if not self.angular:
            return torch.ones_like(cos)
        eps = _GRAD_EPS.get(cos.dtype, _GRAD_EPS_DEFAULT)
        theta = torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))
        deriv = self.m1 * torch.sin(self.m1 * theta + self.m2) / torch.sin(theta)
        if self.has_fallback:
            deriv = torch.where(cos > self.cos_threshold, deriv, torch.ones_like(deriv))
        return deriv

    def forward(self, cos: Tensor, labels: Tensor) -> Tensor:
        """Margin logits.

        Args:
            cos: ``[B, n]`` cosines (any float dtype; computed in at least float32), clamped to [-1, 1].
            labels: ``[B]`` int64, the target column of each row, or -1 where the row's class is not
                among these ``n`` columns (another rank's shard).
        Returns:
            ``[B, n]`` float32 (float64 for float64 input): ``s * cos`` with ``s * target_value`` at
            ``(i, labels[i])`` for rows with ``labels[i] >= 0``.
        """
        return _MarginFn.apply(cos, labels, self)
