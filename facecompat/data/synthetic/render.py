"""Drawing an :class:`~facecompat.data.synthetic.identity.Identity` under
:class:`~facecompat.data.synthetic.identity.Conditions`: background, the face parts
(:mod:`facecompat.data.synthetic.drawing`), then the photometric nuisances."""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from facecompat.data.synthetic import drawing as draw
from facecompat.data.synthetic.identity import Conditions, Identity, rng_for

_NOISE_SD = 24.0  # the noise tile holds 128 + 24 * N(0, 1) as uint8


@lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    z = rng_for(7, 7, 7).standard_normal((320, 320, 3), dtype=np.float32)
    return np.clip(np.round(128 + _NOISE_SD * z), 0, 255).astype(np.uint8)


def render_face(ident: Identity, cond: Conditions) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``ident`` under ``cond``.

    Returns:
        ``(image, landmarks)``: [canvas, canvas, 3] uint8 BGR and [5, 2] float32 (x, y) of left
        eye, right eye, nose tip, left and right mouth corner (image-left first).
    """
    size = cond.canvas
    img = _background(cond, size)
    project = draw.Projector(ident, cond)
    sketch = draw.Sketch()
    geo = draw.geometry(ident, cond)
    draw.draw_body(sketch, ident, cond)
    draw.draw_face(sketch, ident, cond, geo)
    draw.draw_occluder(sketch, ident, cond, geo)
    sketch.draw(img, project)
    gap = geo["gap"]
    lmk_units = np.array([[-gap, 0], [gap, 0], [0, geo["nose_y"]], geo["mouth_l"], geo["mouth_r"]])
    landmarks = project(lmk_units, np.array([0.0, 0.0, draw.NOSE_LIFT, 0.0, 0.0]), np.ones(5, bool))
    return _photometric(img, cond), landmarks


def _gradient(size: int, corners: np.ndarray) -> np.ndarray:
    """[size, size, C] bilinear blend of a [2, 2, C] array of corner values (cheap via cv2.resize)."""
    return cv2.resize(corners, (size, size), interpolation=cv2.INTER_LINEAR)


_CORNER_X = np.array([[-1.0, 1.0], [-1.0, 1.0]])  # x then y of the 4 corners, in [-1, 1]
_CORNER_Y = np.array([[-1.0, -1.0], [1.0, 1.0]])


def _ramp(angle: float) -> np.ndarray:
    """[2, 2] values at the canvas corners of a linear ramp along ``angle``, in [-sqrt 2, sqrt 2]."""
    return _CORNER_X * np.cos(angle) + _CORNER_Y * np.sin(angle)


def _background(cond: Conditions, size: int) -> np.ndarray:
    c0, c1, angle = cond.background
    c0, c1 = np.asarray(c0, np.float32), np.asarray(c1, np.float32)
    # Linear ramp along ``angle``: t at the four corners, in [0, 1].
    t = (_ramp(angle) / 2.0 + 0.5).astype(np.float32)[..., None]
    return _gradient(size, np.clip(c0 + t * (c1 - c0), 0, 255).astype(np.uint8))


def _photometric(img: np.ndarray, cond: Conditions) -> np.ndarray:
    """Blur, light, colour cast, contrast and noise (all uint8 OpenCV ops: this is the hot path)."""
    size = img.shape[0]
    if cond.blur > 0.25:
        # Two box passes of width k have variance (k^2 - 1) / 6: a cheap near-Gaussian blur.
        k = max(2, round(np.sqrt(6 * cond.blur**2 + 1)))
        img = cv2.blur(cv2.blur(img, (k, k)), (k, k))
    # Directional light as a per-pixel gain with the colour cast folded in; gain 1 is stored as 128.
    gain = cond.brightness * (1 + cond.light * _ramp(cond.light_angle))[..., None] * np.asarray(cond.cast)
    gain_map = _gradient(size, np.clip(gain * 128, 0, 255).astype(np.uint8))
    img = cv2.multiply(img, gain_map, scale=1 / 128)
    # contrast * img + noise around 128, in one saturating pass
    k = cond.noise / _NOISE_SD
    span = 320 - size + 1
    ox, oy = cond.seed % span, (cond.seed // span) % span
    noise = _noise_tile()[oy:oy + size, ox:ox + size]
    img = cv2.addWeighted(img, cond.contrast, noise, k, 128 * (1 - cond.contrast) - 128 * k)
    if cond.gray:
        img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    if cond.jpeg:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, cond.jpeg])
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return img
