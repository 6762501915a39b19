"""Synthetic face identities, drawn with OpenCV primitives.

An :class:`Identity` is a stable appearance drawn from a per-identity random stream: head and
jaw shape, skin tone and texture blobs, hair style and colour, eye / eyebrow / nose / mouth
geometry, ears, and optionally glasses, a beard and marks. A :class:`Conditions` is one
capture of it: pose (roll, yaw, pitch by a depth model of an ellipsoid head), scale and
position, expression (smile, open mouth, closing eyes), illumination (directional gain,
brightness, contrast, colour cast), background and clothes, blur, sensor noise, JPEG
re-compression, grey-scale, and an occluder (rectangle, sunglasses, hand, mask).

Identities draw their attributes from small palettes and narrow ranges, so many of them
share hair, skin and face shape, and per-image nuisances are as large as several identity
attributes: the task is learnable but not trivial.

:func:`~facecompat.data.synthetic.render.render_face` draws an identity under conditions and
returns the BGR image with its five landmarks (left eye centre, right eye centre, nose tip, left
and right mouth corner, in image coordinates, "left" = image-left, the order of the ArcFace
template). Everything is deterministic given the inputs; random streams come from
:func:`rng_for` keyed by integers.

Face coordinates ("units"): x right, y down, the eye centres near (-0.5, 0) and (0.5, 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Palettes in RGB (converted to BGR on use); drawn with jitter so that identities share them.
SKIN_RGB = np.array([(250, 220, 195), (238, 196, 165), (222, 174, 138), (198, 140, 102),
                     (160, 106, 74), (112, 74, 52)], np.float32)
HAIR_RGB = np.array([(24, 20, 18), (55, 38, 28), (95, 66, 44), (140, 102, 66), (205, 172, 115),
                     (140, 64, 36), (150, 148, 142)], np.float32)
HAIR_P = np.array([0.3, 0.25, 0.17, 0.1, 0.08, 0.04, 0.06])
IRIS_RGB = np.array([(70, 45, 30), (40, 28, 20), (80, 110, 140), (85, 105, 70)], np.float32)
HAIR_STYLES = ("bald", "short", "medium", "long", "fringe", "curly", "receding")
OCCLUDERS = ("none", "rectangle", "sunglasses", "hand", "mask")


def rng_for(*key: int) -> np.random.Generator:
    """A numpy Generator seeded by a tuple of non-negative ints (stable across runs)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _bgr(rgb: np.ndarray) -> tuple[float, float, float]:
    r, g, b = np.clip(rgb, 0, 255)
    return float(b), float(g), float(r)


@dataclass(frozen=True)
class Identity:
    """Stable appearance of one synthetic person (all lengths in face units)."""

    face_w: float
    face_h: float
    face_cy: float
    jaw: float
    skin: tuple
    hair_style: int
    hair_color: tuple
    hairline: float
    hair_volume: float
    eye_gap: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: tuple
    iris_r: float
    brow_gap: float
    brow_thick: float
    brow_arch: float
    brow_tilt: float
    brow_len: float
    nose_y: float
    nose_w: float
    nose_style: int
    mouth_y: float
    mouth_w: float
    lip_t: float
    lip_color: tuple
    ear_size: float
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_color: tuple
    beard: int  # 0 none, 1 stubble, 2 moustache, 3 full, 4 goatee
    marks: tuple  # ((x, y, r), ...) moles
    blobs: tuple  # ((x, y, ax, ay, shade), ...) skin texture pattern

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Identity:
        """Draw an identity; call with ``rng_for(seed, domain, index)`` for a stable one."""
        u = rng.uniform
        tone = u(0, len(SKIN_RGB) - 1)
        lo = int(tone)
        skin_rgb = SKIN_RGB[lo] + (SKIN_RGB[min(lo + 1, len(SKIN_RGB) - 1)] - SKIN_RGB[lo]) * (tone - lo)
        skin = _bgr(skin_rgb + rng.normal(0, 5, 3))
        hair = HAIR_RGB[rng.choice(len(HAIR_RGB), p=HAIR_P)] * u(0.85, 1.15)
        lip_rgb = skin_rgb * np.array([0.92, 0.62, 0.62]) + rng.normal(0, 6, 3)
        face_w, face_h, face_cy = u(1.0, 1.22), u(1.5, 1.75), u(0.3, 0.45)
        marks = tuple((u(-0.8, 0.8), u(-0.5, 1.4), u(0.025, 0.05)) for _ in range(rng.poisson(0.6)))
        blobs = tuple((u(-0.7, 0.7), u(-0.6, 1.4), u(0.1, 0.3), u(0.08, 0.25), u(0.9, 1.06))
                      for _ in range(rng.integers(2, 6)))
        return cls(
            face_w=face_w, face_h=face_h, face_cy=face_cy, jaw=u(0.45, 0.95), skin=skin,
            hair_style=int(rng.choice(len(HAIR_STYLES), p=[0.08, 0.3, 0.2, 0.17, 0.1, 0.08, 0.07])),
            hair_color=_bgr(hair), hairline=u(-0.95, -0.6), hair_volume=u(0.6, 1.6),
            eye_gap=u(0.46, 0.54), eye_w=u(0.16, 0.23), eye_h=u(0.06, 0.1), eye_tilt=u(-0.12, 0.12),
            iris=_bgr(IRIS_RGB[rng.integers(len(IRIS_RGB))]), iris_r=u(0.055, 0.075),
            brow_gap=u(0.2, 0.32), brow_thick=u(0.035, 0.09), brow_arch=u(0.0, 0.08),
            brow_tilt=u(-0.06, 0.06), brow_len=u(0.3, 0.45),
            nose_y=u(0.5, 0.68), nose_w=u(0.13, 0.22), nose_style=int(rng.integers(3)),
            mouth_y=u(1.05, 1.22), mouth_w=u(0.3, 0.44), lip_t=u(0.035, 0.08), lip_color=_bgr(lip_rgb),
            ear_size=u(0.8, 1.2), glasses=int(rng.choice(3, p=[0.85, 0.08, 0.07])),
            glasses_color=_bgr(rng.uniform(10, 120, 3)),
            beard=int(rng.choice(5, p=[0.72, 0.08, 0.07, 0.08, 0.05])), marks=marks, blobs=blobs)


@dataclass(frozen=True)
class Conditions:
    """One capture: geometry, expression, illumination and degradations (angles in radians)."""

    canvas: int
    eye_px: float  # pixels per face unit (~ inter-ocular distance)
    offset: tuple  # (dx, dy) of the face anchor from the canvas centre, pixels
    roll: float
    yaw: float
    pitch: float
    smile: float
    mouth_open: float
    eye_close: float
    gaze: tuple
    jitter: tuple  # per-image wobble of (eye_gap, brow_gap, nose_y, mouth_y)
    glasses_on: bool
    light_angle: float
    light: float
    brightness: float
    contrast: float
    cast: tuple
    background: tuple  # two BGR colours and a gradient angle
    clothes: tuple
    blur: float
    noise: float
    jpeg: int  # 0: no re-compression
    gray: bool
    occluder: int
    occluder_box: tuple  # (x, y, w, h) in face units; meaning depends on the occluder
    occluder_color: tuple
    seed: int

    @classmethod
    def sample(cls, rng: np.random.Generator, canvas: int, eye_px: float, hard: float = 1.0) -> Conditions:
        """Draw capture conditions; ``hard`` scales how often and how strongly nuisances appear."""
        d = _Draws(rng)
        u, n, p = d.u, d.n, d.p
        occ = d.choice(_occluder_p(hard))
        return cls(
            canvas=int(canvas), eye_px=float(eye_px), offset=(n(0, 0.03 * canvas), n(0, 0.03 * canvas)),
            roll=_clip(n(0, 0.12 * hard), -0.45, 0.45),
            yaw=_clip(n(0, 0.3 * hard), -0.7, 0.7), pitch=_clip(n(0, 0.15 * hard), -0.4, 0.4),
            smile=_clip(n(0.15, 0.45), -0.3, 1.0), mouth_open=u(0, 0.7) if p(0.25 * hard) else 0.0,
            eye_close=u(0.5, 1.0) if p(0.08 * hard) else u(0, 0.3),
            gaze=(n(0, 0.35), n(0, 0.35)), jitter=tuple(n(0, 0.012) for _ in range(4)),
            glasses_on=not p(0.15),
            light_angle=u(0, 2 * np.pi), light=u(0, 0.55 * hard),
            brightness=float(np.exp(n(0, 0.22 * hard))), contrast=float(np.exp(n(0, 0.18 * hard))),
            cast=tuple(float(np.exp(n(0, 0.07 * hard))) for _ in range(3)),
            background=(d.color(), d.color(), u(0, 2 * np.pi)), clothes=d.color(230),
            blur=u(0.3, 2.2) * hard * canvas / 160 if p(0.4 * hard) else 0.0, noise=abs(n(0, 5 * hard)),
            jpeg=int(u(15, 60)) if p(0.25 * hard) else 0, gray=p(0.05 * hard),
            occluder=occ, occluder_box=(u(-0.9, 0.9), u(-0.3, 1.5), u(0.4, 1.0), u(0.3, 0.8)),
            occluder_color=_bgr(SKIN_RGB[d.choice([1] * len(SKIN_RGB))]) if occ == 3 else d.color(),
            seed=int(u(0, 2**31)))

    def drift(self, rng: np.random.Generator, step: float) -> Conditions:
        """A nearby capture, as the next frame of a video: pose, expression and position move a
        little, illumination and background stay, noise is fresh."""
        d = _Draws(rng, 16)
        n = d.n
        return replace(
            self, offset=(self.offset[0] + n(0, 2.0 * step), self.offset[1] + n(0, 2.0 * step)),
            roll=self.roll + n(0, 0.03 * step), yaw=_clip(self.yaw + n(0, 0.08 * step), -0.8, 0.8),
            pitch=self.pitch + n(0, 0.04 * step), smile=_clip(self.smile + n(0, 0.1 * step), -0.3, 1.0),
            eye_close=_clip(self.eye_close + n(0, 0.15 * step), 0.0, 1.0),
            eye_px=self.eye_px * float(np.exp(n(0, 0.03 * step))), seed=int(d.u(0, 2**31)))

    def difficulty(self) -> float:
        """Rough 0..1 hardness of the capture (pose, blur, noise, occlusion, size, lighting)."""
        d = (0.6 * abs(self.yaw) + 0.5 * abs(self.pitch) + 0.08 * self.blur + 0.01 * self.noise
             + 0.3 * (self.occluder > 0) + 0.15 * (self.jpeg > 0) + 0.25 * self.light
             + 0.25 * max(0.0, 1 - self.eye_px / 30) + 0.3 * max(0.0, self.eye_close - 0.5))
        return float(min(1.0, d))


class _Draws:
    """Hands out variates from one batch drawn up front (one Generator call instead of ~50)."""

    def __init__(self, rng: np.random.Generator, size: int = 64):
        self.uni, self.nor = rng.random(size).tolist(), rng.standard_normal(size).tolist()
        self.i = self.j = 0

    def u(self, lo: float, hi: float) -> float:
        self.i += 1
        return lo + (hi - lo) * self.uni[self.i - 1]

    def n(self, mean: float, sd: float) -> float:
        self.j += 1
        return mean + sd * self.nor[self.j - 1]

    def p(self, prob: float) -> bool:
        return self.u(0.0, 1.0) < prob

    def choice(self, weights: list[float]) -> int:
        x, acc = self.u(0.0, sum(weights)), 0.0
        for k, w in enumerate(weights):
            acc += w
            if x < acc:
                return k
        return len(weights) - 1

    def color(self, hi: float = 255.0) -> tuple[float, float, float]:
        """A random colour, pulled toward its grey level by a random amount (muted on average)."""
        rgb = self.u(0, hi), self.u(0, hi), self.u(0, hi)
        grey, sat = sum(rgb) / 3, self.u(0.15, 1.0)
        return tuple(grey + sat * (c - grey) for c in rgb)


def _clip(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


def _occluder_p(hard: float) -> list[float]:
    p = min(0.6, 0.12 * hard)
    return [1 - p, p * 0.35, p * 0.25, p * 0.25, p * 0.15]
