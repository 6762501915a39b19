"""Independent augmented views of one face image, for the contrastive (SimCLR) objective.

Each view is a random resized crop (with a horizontal flip) warped back to the image's size,
then, by chance, colour jitter (brightness, contrast, saturation, hue in a random order) and
grayscale. Everything the views of an image draw comes from one generator seeded by ``(seed,
epoch, record id)``, a fixed row of uniforms per view: whichever worker, rank or resumed run
makes the views of an image in an epoch, they are the same pixels. Images stay RGB uint8
``HxWx3`` throughout (OpenCV's saturating arithmetic, rounded after each operation as
torchvision does on uint8 images).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from facecompat.config import AugmentConfig

_SALT = 0x5EED_C0DE  # keeps these streams apart from any other use of (seed, epoch, record id)
_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop, then a centre crop
_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# Uniform draws per view: 4 per crop attempt (area, log ratio, x, y), flip, jitter on/off,
# 4 for the jitter order, 4 jitter factors, grayscale.
_DRAWS = 4 * _CROP_ATTEMPTS + 1 + 1 + 4 + 4 + 1


class ViewParams(NamedTuple):
    """What one view draws.

    Attributes:
        box: the crop ``(x0, y0, width, height)`` in source pixels (floats: sub-pixel crops).
        flip: mirrored horizontally.
        jitter: ``(op, factor)`` pairs applied in order (``op`` one of brightness, contrast,
            saturation, hue), empty when the view gets no jitter.
        gray: converted to grayscale (three equal channels).
    """

    box: tuple[float, float, float, float]
    flip: bool
    jitter: tuple[tuple[str, float], ...]
    gray: bool


def view_draws(seed: int, epoch: int, record_id: int, num_views: int) -> np.ndarray:
    """float64 ``[num_views, _DRAWS]`` uniforms in [0, 1): row ``v`` is all that view ``v`` of
    record ``record_id`` draws in ``epoch`` (one generator per image: constructing one costs more
    than the draws)."""
    rng = np.random.default_rng([_SALT, int(seed) % (1 << 63), int(epoch), int(record_id)])
    return rng.random((num_views, _DRAWS))


def _between(u: float, low: float, high: float) -> float:
    return low + (high - low) * u


def _crop_box(u: np.ndarray, cfg: AugmentConfig, height: int,
              width: int) -> tuple[float, float, float, float]:
    area = float(height * width)
    log_ratio = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    for k in range(_CROP_ATTEMPTS):
        a_area, a_ratio, a_x, a_y = u[4 * k:4 * k + 4]
        target = area * _between(a_area, *cfg.crop_scale)
        ratio = math.exp(_between(a_ratio, *log_ratio))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            return float((width - w) * a_x), float((height - h) * a_y), w, h
    # No crop of the drawn shapes fits: the largest centred one within the ratio range.
    ratio = min(max(width / height, cfg.crop_ratio[0]), cfg.crop_ratio[1])
    w, h = (float(width), width / ratio) if width / height < ratio else (height * ratio, float(height))
    return (width - w) / 2.0, (height - h) / 2.0, w, h


def draw_view(u: np.ndarray, cfg: AugmentConfig, height: int, width: int,
              allow_flip: bool = True) -> ViewParams:
    """One view's crop, flip, jitter and grayscale from its row of :func:`view_draws` (each
    setting reads its own entries, so that changing one never shifts another)."""
    box = _crop_box(u, cfg, height, width)
    i = 4 * _CROP_ATTEMPTS
    flip = allow_flip and bool(u[i] < cfg.flip_prob)
    jitter_on = bool(u[i + 1] < cfg.jitter_prob)
    order = np.argsort(u[i + 2:i + 6], kind="stable")
    spreads = (cfg.brightness, cfg.contrast, cfg.saturation)
    factors = [_between(a, 1.0 - s, 1.0 + s) for a, s in zip(u[i + 6:i + 9], spreads)]
    factors.append(_between(u[i + 9], -cfg.hue, cfg.hue))
    gray = bool(u[i + 10] < cfg.grayscale_prob)
    identity = (1.0, 1.0, 1.0, 0.0)
    jitter = tuple((_JITTER_OPS[k], float(factors[k])) for k in order if factors[k] != identity[k])
    return ViewParams(box, flip, jitter if jitter_on else (), gray)


def _gray3(img: np.ndarray) -> np.ndarray:
    """RGB uint8 → its luma (ITU-R 601, as OpenCV) in three equal channels."""
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def _jitter(img: np.ndarray, op: str, factor: float) -> np.ndarray:
    """One colour operation on RGB uint8, saturated and rounded back to uint8 (as torchvision
    does per operation on uint8 images)."""
    if op == "brightness":
        return cv2.addWeighted(img, factor, img, 0.0, 0.0)
    if op == "contrast":
        mean = float(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean())
        return cv2.addWeighted(img, factor, img, 0.0, mean * (1.0 - factor))
    if op == "saturation":
        return cv2.addWeighted(img, factor, _gray3(img), 1.0 - factor, 0.0)
    # hue: rotate H (OpenCV's uint8 HSV: H in [0, 180), 2 degrees a step) by a share of a turn
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    shift = int(round(factor * 180.0))
    hsv[..., 0] = _HUE_LUTS[shift % 180][hsv[..., 0]]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


_HUE_LUTS = [((np.arange(256) + s) % 180).astype(np.uint8) for s in range(180)]


def apply_view(img: np.ndarray, params: ViewParams) -> np.ndarray:
    """One view of an RGB uint8 ``[H, W, 3]`` image: crop + flip warped to ``H x W`` (bilinear),
    then jitter and grayscale. Returns a new uint8 ``[H, W, 3]`` array."""
    height, width = img.shape[:2]
    x0, y0, w, h = params.box
    sx, sy = w / width, h / height
    # Output pixel centre (u + 0.5) samples source x0 + (u + 0.5) * sx (pixel centres at +0.5);
    # a flip reads the output column u from the mirrored one, width - 1 - u.
    if params.flip:
        row_x = [-sx, 0.0, x0 + (width - 0.5) * sx - 0.5]
    else:
        row_x = [sx, 0.0, x0 + 0.5 * sx - 0.5]
    matrix = np.array([row_x, [0.0, sy, y0 + 0.5 * sy - 0.5]], dtype=np.float64)
    out = cv2.warpAffine(img, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT_101)
    for op, factor in params.jitter:
        out = _jitter(out, op, factor)
    return _gray3(out) if params.gray else out


class ViewMaker:
    """Makes the ``num_views`` views of an image for an epoch.

    Args:
        cfg: the ``contrastive.augment`` section.
        seed: ``data.seed``.
        flip: whether views may be mirrored at all (``data.flip``).
        num_views: views per image (2 for SimCLR).
    """

    def __init__(self, cfg: AugmentConfig, seed: int, flip: bool = True, num_views: int = 2):
        self.cfg, self.seed, self.flip, self.num_views = cfg, int(seed), bool(flip), int(num_views)

    def params(self, record_id: int, epoch: int, height: int, width: int) -> list[ViewParams]:
        """The views' draws for record ``record_id`` in ``epoch``."""
        draws = view_draws(self.seed, epoch, record_id, self.num_views)
        return [draw_view(u, self.cfg, height, width, self.flip) for u in draws]

    def __call__(self, img: np.ndarray, record_id: int, epoch: int) -> list[tuple[np.ndarray, bool]]:
        """``[(view uint8 [H, W, 3], flipped), ...]`` of an RGB uint8 image, one per view."""
        height, width = img.shape[:2]
        return [(apply_view(img, p), p.flip) for p in self.params(record_id, epoch, height, width)]
