"""Similarity estimation (Umeyama) and five-point alignment."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facecompat.data.align import ARCFACE_TEMPLATE, align_face, estimate_similarity


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Brute force: solve the linear system in (a, b, tx, ty) of [a -b tx; b a ty]."""
    n = src.shape[0]
    rows = np.zeros((2 * n, 4))
    rows[0::2] = np.stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)], axis=1)
    rows[1::2] = np.stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)], axis=1)
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, dst.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize("seed", range(20))
def test_recovers_exact_similarity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = rng.uniform(-100, 200, size=(rng.integers(2, 12), 2))
    truth = _similarity(rng.uniform(0.1, 5), rng.uniform(-np.pi, np.pi), *rng.uniform(-50, 50, 2))
    est = estimate_similarity(src, _apply(truth, src))
    np.testing.assert_allclose(est, truth, atol=1e-9)


@pytest.mark.parametrize("seed", range(30))
def test_noisy_points_match_linear_least_squares(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    src = rng.normal(size=(rng.integers(3, 10), 2)) * 30
    if seed % 3 == 0:
        dst = rng.normal(size=src.shape) * 30  # unrelated points, often a reflection is best
    else:
        truth = _similarity(rng.uniform(0.5, 2), rng.uniform(-np.pi, np.pi), *rng.uniform(-20, 20, 2))
        dst = _apply(truth, src) + rng.normal(size=src.shape) * 3
    if seed % 5 == 0:
        dst[:, 0] = -dst[:, 0]  # mirrored target: the optimum stays a proper rotation
    est = estimate_similarity(src, dst)
    np.testing.assert_allclose(est, _lstsq_similarity(src, dst), atol=1e-6)
    assert np.linalg.det(est[:, :2]) > 0


def test_template_maps_to_itself() -> None:
    np.testing.assert_allclose(estimate_similarity(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE),
                               np.eye(2, 3), atol=1e-12)


def test_collinear_points_give_proper_rotation() -> None:
    src = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    truth = _similarity(2.0, 0.3, 5.0, -1.0)
    est = estimate_similarity(src, _apply(truth, src))
    np.testing.assert_allclose(est, truth, atol=1e-9)


@pytest.mark.parametrize("src, dst, msg", [
    (np.zeros((5, 2)), ARCFACE_TEMPLATE, "coincide"),
    (ARCFACE_TEMPLATE, np.ones((5, 2)), "coincide"),
    (np.zeros((5, 3)), ARCFACE_TEMPLATE, "shape"),
    (ARCFACE_TEMPLATE[:4], ARCFACE_TEMPLATE, "differ"),
    (np.full((5, 2), np.nan), ARCFACE_TEMPLATE, "non-finite"),
])
def test_rejects_degenerate_input(src: np.ndarray, dst: np.ndarray, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        estimate_similarity(src, dst)


@pytest.mark.parametrize("which", range(5))
def test_aligned_dot_lands_on_template(which: int) -> None:
    # Landmarks of a face seen rotated, scaled and shifted in a 300x260 image.
    to_image = _similarity(2.1, 0.4, 60.0, 20.0)
    landmarks = _apply(to_image, ARCFACE_TEMPLATE)
    img = np.zeros((260, 300, 3), np.uint8)
    x, y = landmarks[which]
    cv2.circle(img, (round(x * 16), round(y * 16)), 3 * 16, (255, 255, 255), -1, cv2.LINE_AA, shift=4)
    out = align_face(img, landmarks)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    weight = out[..., 0].astype(np.float64)
    ys, xs = np.mgrid[:112, :112]
    centroid = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
    np.testing.assert_allclose(centroid, ARCFACE_TEMPLATE[which], atol=0.5)


def test_align_is_identity_on_a_template_face_and_keeps_border_black() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align_face(img, ARCFACE_TEMPLATE), img)
    # A half-size face at +80 px: output x maps to source x = x / 2 + 80, outside past x = 64.
    shifted = align_face(img, ARCFACE_TEMPLATE * 0.5 + 80)
    assert shifted[:, 65:].max() == 0 and shifted[:, :60].max() > 0


def test_align_face_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        align_face(np.zeros((10, 10), np.uint8), ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="landmarks"):
        align_face(np.zeros((10, 10, 3), np.uint8), ARCFACE_TEMPLATE[:4])
