"""Five-point face alignment to the ArcFace 112x112 template.

The transform is the least-squares similarity (rotation, uniform scale, translation) from the
detected landmarks to the template, in the closed form of Umeyama (1991), "Least-squares
estimation of transformation parameters between two point patterns", the same estimate as
scikit-image's ``SimilarityTransform.estimate`` (reflections are never returned). The image is
warped with bilinear interpolation and a black border, as insightface's ``norm_crop`` does.
"""

from __future__ import annotations

import cv2
import numpy as np

# (x, y) of left eye, right eye, nose tip, left and right mouth corner in a 112x112 crop;
# "left" is image-left.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def _as_points(a: np.ndarray, what: str) -> np.ndarray:
    pts = np.asarray(a, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 2:
        raise ValueError(f"{what}: expected an [N, 2] array with N >= 2, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"{what}: holds non-finite values")
    return pts


def _det2(m: np.ndarray) -> float:
    return float(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0])


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` points onto ``dst`` points.

    Minimises ``sum_i ||dst_i - (c R src_i + t)||^2`` over a rotation ``R`` (det +1), a scale
    ``c`` and a translation ``t`` (Umeyama 1991, eqs. 40-42, with the sign correction that
    keeps ``R`` a proper rotation when the covariance has a negative determinant).

    Args:
        src: [N, 2] source points (e.g. detected landmarks).
        dst: [N, 2] destination points (e.g. :data:`ARCFACE_TEMPLATE`).

    Returns:
        [2, 3] float64 matrix ``[c R | t]``, usable by ``cv2.warpAffine``.

    Raises:
        ValueError: shapes differ, fewer than 2 points, non-finite values, or all source
            (or destination) points coincide, so that no transform is defined.
    """
    src = _as_points(src, "src")
    dst = _as_points(dst, "dst")
    if src.shape != dst.shape:
        raise ValueError(f"src and dst differ in shape: {src.shape} vs {dst.shape}")
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = float((src_c**2).sum()) / n  # sigma_x^2 (eq. 36)
    if src_var <= 0.0:
        raise ValueError("src: all points coincide; no similarity transform is defined")
    cov = dst_c.T @ src_c / n  # Sigma_xy (eq. 38): dst by src
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    # Tolerance as numpy's matrix_rank: singular values below it count as zero.
    tol = d.max() * 2 * np.finfo(np.float64).eps
    rank = int((d > tol).sum())
    if rank == 0:
        raise ValueError("dst: all points coincide; no similarity transform is defined")
    if rank == 2:
        if _det2(cov) < 0:
            sign[1] = -1.0  # eq. 39
    elif _det2(u) * _det2(vt) < 0:
        sign[1] = -1.0  # eq. 43: rank 1, flip the null direction so that det(R) = +1
    rot = u @ np.diag(sign) @ vt  # eq. 40
    scale = float(d @ sign) / src_var  # eq. 42
    trans = dst_mean - scale * rot @ src_mean  # eq. 41
    return np.concatenate([scale * rot, trans[:, None]], axis=1)


def align_face(img: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp a face to the ArcFace template from its five landmarks.

    Args:
        img: [H, W, 3] uint8 image (any channel order; it is kept).
        landmarks: [5, 2] (x, y) of left eye, right eye, nose tip, left and right mouth
            corner, in ``img`` pixel coordinates.
        size: output side; the template is scaled by ``size / 112``.

    Returns:
        [size, size, 3] uint8 aligned crop (bilinear, border 0).
    """
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"img: expected an [H, W, 3] uint8 array, got {img.dtype} {img.shape}")
    lmk = _as_points(landmarks, "landmarks")
    if lmk.shape != (5, 2):
        raise ValueError(f"landmarks: expected shape (5, 2), got {lmk.shape}")
    matrix = estimate_similarity(lmk, ARCFACE_TEMPLATE * (size / 112.0))
    return cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
