"""facecompat.heads.margins: values against the formula (fallback included) and both gradients."""

from __future__ import annotations

import math

import pytest
import torch

from facecompat.heads import MARGIN_PRESETS, CombinedMargin, get_margins

MARGINS = [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2), (1.2, 0.4, 0.1), (0.9, 0.3, 0.0)]


def reference_target(c: float, m1: float, m2: float, m3: float) -> float:
    """s-free target logit, written from the definition (float64, one value)."""
    theta = math.acos(c)
    theta_t = (math.pi - m2) / m1
    if theta <= theta_t or theta_t >= math.pi:
        return math.cos(m1 * theta + m2) - m3
    return c - (math.pi - theta_t) * math.sin(theta_t) - m3


def _cos_and_labels(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    # Targets cover +-1, the ArcFace fallback region (c <= cos(pi - 0.5) = -0.8776) and ordinary values.
    cos = torch.tensor([[0.3, 1.0, -0.2], [-1.0, 0.1, 0.5], [0.2, -0.95, 0.0], [0.7, 0.6, -0.3],
                        [0.0, 0.9, 0.4], [0.25, -0.5, 0.1]], dtype=dtype)
    labels = torch.tensor([1, 0, 1, 0, -1, 2])  # -1: the row's class is not among these columns
    return cos, labels


@pytest.mark.parametrize("margins", MARGINS)
@pytest.mark.parametrize("exact_grad", [True, False])
def test_values_match_formula(margins: tuple[float, float, float], exact_grad: bool) -> None:
    cos, labels = _cos_and_labels()
    s = 16.0
    out = CombinedMargin(*margins, scale=s, exact_grad=exact_grad)(cos, labels)
    expected = cos * s
    for i, j in enumerate(labels.tolist()):
        if j >= 0:
            expected[i, j] = s * reference_target(float(cos[i, j]), *margins)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_arcface_fallback_is_insightface() -> None:
    """m1 = 1, m3 = 0 is insightface's ArcFace: cos(t + m) where cos t > cos(pi - m),
    else cos t - sin(pi - m) * m."""
    m, s = 0.5, 64.0
    c = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    sin = (1 - c * c).clamp_min(0).sqrt()
    insightface = torch.where(c > math.cos(math.pi - m), c * math.cos(m) - sin * math.sin(m),
                              c - math.sin(math.pi - m) * m)
    out = CombinedMargin(1.0, m, 0.0, scale=s)(c[:, None], torch.zeros(len(c), dtype=torch.int64))
    torch.testing.assert_close(out[:, 0], s * insightface, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("margins", MARGINS)
def test_target_is_monotone_in_cos(margins: tuple[float, float, float]) -> None:
    c = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    out = CombinedMargin(*margins, scale=1.0)(c[:, None], torch.zeros(len(c), dtype=torch.int64))[:, 0]
    assert bool((out.diff() >= -1e-12).all())


@pytest.mark.parametrize("margins", MARGINS)
def test_exact_gradient_gradcheck(margins: tuple[float, float, float]) -> None:
    # Away from +-1 and from the fallback threshold (where the target jumps), float64.
    cos = torch.tensor([[0.3, -0.6, 0.1], [0.8, 0.2, -0.4], [-0.97, 0.5, 0.0], [0.6, 0.1, -0.2]],
                       dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 0, -1])
    margin = CombinedMargin(*margins, scale=8.0, exact_grad=True)
    assert torch.autograd.gradcheck(lambda x: margin(x, labels), (cos,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("margins", MARGINS)
def test_exact_gradient_formula(margins: tuple[float, float, float]) -> None:
    m1, m2, _ = margins
    c = torch.tensor([0.9, 0.5, 0.0, -0.5], dtype=torch.float64, requires_grad=True)
    s = 4.0
    out = CombinedMargin(*margins, scale=s)(c[:, None], torch.zeros(4, dtype=torch.int64))
    (grad,) = torch.autograd.grad(out.sum(), c)
    theta = torch.acos(c.detach())
    torch.testing.assert_close(grad, s * m1 * torch.sin(m1 * theta + m2) / torch.sin(theta))


@pytest.mark.parametrize("margins", MARGINS)
def test_straight_through_gradient(margins: tuple[float, float, float]) -> None:
    """exact_grad=False: every logit, target included, has the gradient of s * cos."""
    cos, labels = _cos_and_labels(torch.float32)
    cos.requires_grad_(True)
    s = 64.0
    out = CombinedMargin(*margins, scale=s, exact_grad=False)(cos, labels)
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), cos)
    torch.testing.assert_close(grad, s * weights, rtol=0, atol=0)
    exact = CombinedMargin(*margins, scale=s, exact_grad=True)(cos, labels)
    torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-5)  # same forward up to rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margins", MARGINS)
def test_no_nan_at_plus_minus_one(margins: tuple[float, float, float], dtype: torch.dtype) -> None:
    c = torch.tensor([[1.0], [-1.0]], dtype=dtype, requires_grad=True)
    s = 64.0
    out = CombinedMargin(*margins, scale=s)(c, torch.tensor([0, 0]))
    (grad,) = torch.autograd.grad(out.sum(), c)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    expected = [s * reference_target(1.0, *margins), s * reference_target(-1.0, *margins)]
    torch.testing.assert_close(out[:, 0], torch.tensor(expected, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_computed_in_float32(dtype: torch.dtype) -> None:
    cos, labels = _cos_and_labels(torch.float32)
    low = cos.to(dtype)
    margin = CombinedMargin(1.0, 0.5, 0.0, scale=64.0)
    out = margin(low, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, margin(low.float(), labels), rtol=0, atol=0)


def test_registry_and_errors() -> None:
    assert get_margins("arcface") == (1.0, 0.5, 0.0) and "cosface" in MARGIN_PRESETS
    with pytest.raises(KeyError, match="unknown margin 'arc'; valid: arcface, combined, cosface"):
        get_margins("arc")
    with pytest.raises(ValueError, match="m1 must be > 0"):
        CombinedMargin(0.0, 0.5, 0.0, scale=64.0)
    assert "m2=0.5" in repr(CombinedMargin(1.0, 0.5, 0.0, scale=64.0))


def test_scale_grad_and_its_reversal_are_identities_forward():
    from facecompat.heads.grad import grad_reverse, scale_grad

    x = torch.randn(4, 3, requires_grad=True)
    assert scale_grad(x, 1) is x
    cases = ((scale_grad, 3.0, 3.0), (grad_reverse, 0.5, -0.5), (grad_reverse, 0.0, -0.0))
    for fn, factor, expected in cases:
        y = fn(x, factor)
        assert torch.equal(y, x)
        x.grad = None
        y.backward(torch.ones_like(y))
        assert torch.equal(x.grad, torch.full_like(x, expected))
