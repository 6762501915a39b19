"""Drawing machinery for :mod:`facecompat.data.synthetic.render`: face parts as polygons in face
units, projected through the head pose and drawn anti-aliased with OpenCV.

Face units: x right, y down, the eye centres near (-0.5, 0) and (0.5, 0). A point on the head
surface gets its depth from an ellipsoid fitted to the face outline (plus a per-part lift, e.g.
the nose); flat layers (neck, clothes, hair behind the head) sit at a fixed depth.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from facecompat.data.synthetic.identity import Conditions, Identity

SHIFT = 4  # sub-pixel bits for cv2 drawing
NOSE_LIFT = 0.3  # the nose tip stands this far out of the head ellipsoid
_T9 = np.linspace(0.0, 1.0, 9)
_BEZIER = np.stack([(1 - _T9) ** 2, 2 * _T9 * (1 - _T9), _T9**2], axis=1)  # [9, 3] quadratic basis


def scale(color: tuple, k: float) -> tuple[float, float, float]:
    """``color`` times ``k``, saturated at 255."""
    return tuple(min(255.0, c * k) for c in color)


def mix(a: tuple, b: tuple, t: float) -> tuple[float, float, float]:
    """Linear blend from colour ``a`` (t = 0) to ``b`` (t = 1)."""
    return tuple(x + (y - x) * t for x, y in zip(a, b))


@lru_cache(maxsize=64)
def _arc(start: float, end: float, n: int) -> np.ndarray:
    t = np.linspace(start, end, n)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _ellipse(cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, start: float = 0.0,
             end: float = 2 * np.pi, n: int = 24) -> np.ndarray:
    """[n, 2] points of an ellipse (or an arc of it from ``start`` to ``end``) rotated by ``angle``."""
    arc = _arc(float(start), float(end), n)
    if angle == 0.0:
        return arc * (ax, ay) + (cx, cy)
    c, s = np.cos(angle), np.sin(angle)
    return arc @ np.array([[c * ax, s * ax], [-s * ay, c * ay]]) + (cx, cy)


def _curve(a: tuple, b: tuple, c: tuple) -> np.ndarray:
    """Quadratic Bezier from a to c pulled toward b, 9 points."""
    return _BEZIER @ np.array([a, b, c], dtype=np.float64)


class Sketch:
    """Drawing commands in face units, projected together through the head pose."""

    def __init__(self) -> None:
        self.cmds: list[tuple] = []
        self.pts: list[np.ndarray] = []
        self.lift: list[float] = []
        self.surface: list[bool] = []

    def add(self, kind: str, pts: np.ndarray, color: tuple, width: float = 0.0, lift: float = 0.0,
            surface: bool = True) -> None:
        """``surface``: on the head surface raised by ``lift``; otherwise a flat layer at depth
        ``lift`` (behind the face when negative)."""
        self.cmds.append((kind, len(pts), color, width))
        self.pts.append(pts)
        self.lift.append(lift)
        self.surface.append(surface)

    def draw(self, img: np.ndarray, project: Projector) -> None:
        counts = [cmd[1] for cmd in self.cmds]
        px = project(np.concatenate(self.pts), np.repeat(self.lift, counts), np.repeat(self.surface, counts))
        fixed = np.round(px * (1 << SHIFT)).astype(np.int32)
        start = 0
        for kind, count, color, width in self.cmds:
            poly = fixed[start:start + count]
            start += count
            if kind == "fill":
                cv2.fillPoly(img, [poly], color, cv2.LINE_AA, SHIFT)
            else:
                thick = max(1, int(round(width * project.scale)))
                cv2.polylines(img, [poly], kind == "loop", color, thick, cv2.LINE_AA, SHIFT)


class Projector:
    """Face units -> pixels: ellipsoid depth, yaw and pitch, then roll, scale and shift."""

    def __init__(self, ident: Identity, cond: Conditions):
        self.ident, self.scale = ident, cond.eye_px
        cy, sy, cp, sp = np.cos(cond.yaw), np.sin(cond.yaw), np.cos(cond.pitch), np.sin(cond.pitch)
        self.rot3 = (cy, sy, cp, sp)
        c, s = np.cos(cond.roll), np.sin(cond.roll)
        self.m2 = np.array([[c, -s], [s, c]]) * cond.eye_px
        # The face anchor (0, 0.55), between the eyes and the mouth, goes to the canvas centre.
        z = 0.85 * ident.face_w * np.sqrt(max(0.0, 1 - ((0.55 - ident.face_cy) / ident.face_h) ** 2))
        anchor = np.array([z * sy, 0.55 * cp - z * cy * sp])
        centre = np.array([cond.canvas / 2, cond.canvas / 2]) + np.asarray(cond.offset)
        self.shift = centre - self.m2 @ anchor

    def _pose(self, pts: np.ndarray, lift: np.ndarray, surface: np.ndarray) -> np.ndarray:
        i = self.ident
        x, y = pts[:, 0], pts[:, 1]
        inside = 1 - (x / i.face_w) ** 2 - ((y - i.face_cy) / i.face_h) ** 2
        z = np.where(surface, 0.85 * i.face_w * np.sqrt(np.clip(inside, 0, None)), 0.0) + lift
        cy, sy, cp, sp = self.rot3
        xr, zr = x * cy + z * sy, -x * sy + z * cy
        return np.stack([xr, y * cp - zr * sp], axis=1)

    def __call__(self, pts: np.ndarray, lift: np.ndarray, surface: np.ndarray) -> np.ndarray:
        return self._pose(pts, lift, surface) @ self.m2.T + self.shift


def geometry(ident: Identity, cond: Conditions) -> dict:
    """Landmark-defining positions of this capture: identity geometry, per-image jitter, smile."""
    j = cond.jitter
    my = ident.mouth_y + j[3] - 0.05 * cond.smile
    mw = ident.mouth_w * (1 + 0.15 * cond.smile)
    return {"gap": ident.eye_gap + j[0], "brow": ident.brow_gap + j[1], "nose_y": ident.nose_y + j[2],
            "mouth_y": ident.mouth_y + j[3], "mouth_l": (-mw, my), "mouth_r": (mw, my)}


def draw_body(sk: Sketch, i: Identity, cond: Conditions) -> None:
    """What lies behind the face: clothes, neck, long hair, ears."""
    w, cy, h = i.face_w, i.face_cy, i.face_h
    sk.add("fill", _ellipse(0, cy + h + 1.5, 2.9, 1.2), cond.clothes, surface=False, lift=-0.5)
    neck = np.array([(-0.55 * w, cy + 0.4 * h), (0.55 * w, cy + 0.4 * h), (0.6 * w, cy + h + 0.9),
                     (-0.6 * w, cy + h + 0.9)])
    sk.add("fill", neck, scale(i.skin, 0.8), surface=False, lift=-0.4)
    if i.hair_style == 3:  # long hair falls behind the head
        spread = w + 0.3 * i.hair_volume
        crown = _ellipse(0, cy, w + 0.25 * i.hair_volume, h + 0.15, start=np.pi, end=2 * np.pi)
        back = np.concatenate([crown, [(spread, cy + h + 0.4), (-spread, cy + h + 0.4)]])
        sk.add("fill", back, scale(i.hair_color, 0.85), surface=False, lift=-0.3)
    for sgn in (-1, 1):
        ear = _ellipse(sgn * w * 0.97, 0.25, 0.14 * i.ear_size, 0.3 * i.ear_size, n=16)
        sk.add("fill", ear, scale(i.skin, 0.92), surface=False, lift=-0.2)


def _face_outline(i: Identity) -> np.ndarray:
    pts = _ellipse(0, i.face_cy, i.face_w, i.face_h, n=40)
    t = np.clip((pts[:, 1] - i.face_cy) / i.face_h, 0, 1)
    pts[:, 0] *= 1 - (1 - i.jaw) * t**2
    return pts


def draw_face(sk: Sketch, i: Identity, cond: Conditions, geo: dict) -> None:
    """Face, skin pattern, beard, eyes and brows, nose, mouth, hair, glasses (painter's order)."""
    skin = i.skin
    sk.add("fill", _face_outline(i), skin)
    for x, y, ax, ay, shade in i.blobs:
        sk.add("fill", _ellipse(x, y, ax, ay, n=12), scale(skin, shade))
    for x, y, r in i.marks:
        sk.add("fill", _ellipse(x, y, r, r, n=8), scale(skin, 0.45))
    _draw_beard(sk, i, geo)
    for sgn in (-1, 1):
        _draw_eye(sk, i, cond, geo, sgn)
    _draw_nose(sk, i, geo)
    _draw_mouth(sk, i, cond, geo)
    _draw_hair(sk, i)
    if i.glasses and cond.glasses_on:
        _draw_glasses(sk, i, geo)


def _draw_eye(sk: Sketch, i: Identity, cond: Conditions, geo: dict, sgn: int) -> None:
    cx, tilt = sgn * geo["gap"], sgn * i.eye_tilt
    sk.add("fill", _ellipse(cx, -0.02, i.eye_w * 1.35, i.eye_h * 2.0 + 0.03, tilt, n=16), scale(i.skin, 0.86))
    h = i.eye_h * (1 - cond.eye_close) * (1 - 0.2 * max(cond.smile, 0))
    dark = scale(i.skin, 0.3)
    if h < 0.2 * i.eye_h:
        sk.add("line", _ellipse(cx, 0, i.eye_w, h, tilt, 0, np.pi, n=9), dark, 0.03)
    else:
        sk.add("fill", _ellipse(cx, 0, i.eye_w, h, tilt, n=16), (228, 232, 236))
        gx, gy = cond.gaze
        r = min(i.iris_r, h * 1.05)
        ix, iy = cx + gx * (i.eye_w - r) * 0.6, gy * h * 0.3
        sk.add("fill", _ellipse(ix, iy, r, r, n=12), i.iris)
        sk.add("fill", _ellipse(ix, iy, r * 0.45, r * 0.45, n=8), (20, 20, 20))
        sk.add("line", _ellipse(cx, 0, i.eye_w, h, tilt, np.pi, 2 * np.pi, n=9), dark, 0.03)
    inner, outer = sgn * (geo["gap"] - 0.35 * i.brow_len), sgn * (geo["gap"] + 0.65 * i.brow_len)
    by = -geo["brow"]
    brow = _curve((inner, by), ((inner + outer) / 2, by - i.brow_arch), (outer, by - i.brow_tilt))
    sk.add("line", brow, mix(i.hair_color, i.skin, 0.25), i.brow_thick)


def _draw_nose(sk: Sketch, i: Identity, geo: dict) -> None:
    y, w = geo["nose_y"], i.nose_w
    shade = scale(i.skin, 0.72)
    if i.nose_style == 1:
        sk.add("fill", np.array([(0.04, 0.1), (w * 0.9, y - 0.02), (0.0, y)]), scale(i.skin, 0.85), lift=0.2)
    for sgn in (-1, 1):
        if i.nose_style != 2:
            side = _curve((sgn * 0.07, 0.12), (sgn * 0.1, y - 0.2), (sgn * w, y - 0.03))
            sk.add("line", side, shade, 0.022, lift=0.15)
        sk.add("fill", _ellipse(sgn * w * 0.5, y + 0.03, w * 0.28, 0.03, n=10), scale(i.skin, 0.45), lift=0.2)
    if i.nose_style == 2:
        sk.add("fill", _ellipse(0, y - 0.05, w * 0.55, 0.08, n=12), scale(i.skin, 1.06), lift=NOSE_LIFT)


def _draw_mouth(sk: Sketch, i: Identity, cond: Conditions, geo: dict) -> None:
    (lx, ly), (rx, ry) = geo["mouth_l"], geo["mouth_r"]
    my, t, op = geo["mouth_y"], i.lip_t, cond.mouth_open
    top = _curve((lx, ly), (0, my - 2.2 * t), (rx, ry))
    bottom = _curve((rx, ry), (0, my + 2.6 * t + 0.3 * op + 0.06 * cond.smile), (lx, ly))
    sk.add("fill", np.concatenate([top, bottom]), i.lip_color)
    if op > 0.05:
        inner_top = _curve((lx * 0.9, ly), (0, my - 0.2 * t + 0.05 * cond.smile), (rx * 0.9, ry))
        inner_bot = _curve((rx * 0.9, ry), (0, my + 0.22 * op + 0.05 * cond.smile), (lx * 0.9, ly))
        sk.add("fill", np.concatenate([inner_top, inner_bot]), (35, 30, 45))
        if op > 0.3:
            sk.add("line", inner_top + (0, 0.02), (215, 220, 225), 0.04)
    else:
        mid = _curve((lx, ly), (0, my + 0.08 * cond.smile), (rx, ry))
        sk.add("line", mid, scale(i.lip_color, 0.45), 0.018)


def _draw_beard(sk: Sketch, i: Identity, geo: dict) -> None:
    if i.beard == 0:
        return
    color = mix(i.skin, i.hair_color, 0.3 if i.beard == 1 else 0.9)
    my = geo["mouth_y"]
    if i.beard in (1, 3):
        outline = _face_outline(i)
        sk.add("fill", outline[outline[:, 1] > my - 0.2], color)
    if i.beard in (2, 3):
        mw = i.mouth_w
        upper = _curve((-mw * 1.1, my), (0, my - 0.25), (mw * 1.1, my))
        lower = _curve((mw * 0.8, my - 0.04), (0, my - 0.12), (-mw * 0.8, my - 0.04))
        sk.add("fill", np.concatenate([upper, lower]), color)
    if i.beard == 4:
        sk.add("fill", _ellipse(0, my + 0.32, i.mouth_w * 0.6, 0.22, n=16), color)


def _draw_hair(sk: Sketch, i: Identity) -> None:
    style, w, h, cy, vol = i.hair_style, i.face_w, i.face_h, i.face_cy, i.hair_volume
    if style == 0:
        return
    hairline = -0.45 if style == 4 else (cy - 0.85 * h if style == 6 else i.hairline)
    side_y = 0.35 if style in (2, 3) else -0.15
    ax, ay = w + 0.06 * vol, h + 0.1 * vol
    a0 = np.arcsin(np.clip((side_y - cy) / ay, -1, 1))
    outer = _ellipse(0, cy, ax, ay, start=np.pi - a0, end=2 * np.pi + a0, n=28)
    inner_r, inner_l = (w * 0.97, side_y), (-w * 0.97, side_y)
    if style == 4:  # fringe: a ragged edge across the forehead
        xs = np.linspace(w * 0.95, -w * 0.95, 11)
        line = np.stack([xs, hairline + 0.06 * (np.arange(11) % 2)], axis=1)
        inner = np.concatenate([[inner_r], line, [inner_l]])
    elif style == 6:  # receding: a thin band that leaves the crown bare above the forehead
        edge = _curve((w * 0.9, -0.5), (0, hairline - 0.5), (-w * 0.9, -0.5))
        inner = np.concatenate([[inner_r], edge, [inner_l]])
    else:
        edge = _curve((w * 0.85, -0.4), (0, 2 * hairline + 0.45), (-w * 0.85, -0.4))
        inner = np.concatenate([[inner_r], edge, [inner_l]])
    sk.add("fill", np.concatenate([outer, inner]), i.hair_color)
    if style == 5:  # curls along the outline
        for x, y in outer[::3]:
            sk.add("fill", _ellipse(x, y, 0.13 * vol, 0.13 * vol, n=10), scale(i.hair_color, 1.15))


def _draw_glasses(sk: Sketch, i: Identity, geo: dict) -> None:
    rw, rh = i.eye_w * 1.55, i.eye_w * 1.1
    edges = []
    for sgn in (-1, 1):
        cx = sgn * geo["gap"]
        lens = _ellipse(cx, 0.02, rw, rh, n=20)
        if i.glasses == 2:  # squarish lenses: a superellipse, |x|^4 + |y|^4 = 1
            d = (lens - (cx, 0.02)) / (rw, rh)
            lens = (cx, 0.02) + np.sign(d) * np.sqrt(np.abs(d)) * (rw, rh)
        sk.add("loop", lens, i.glasses_color, 0.035, lift=0.1)
        sk.add("line", np.array([(cx + sgn * rw, 0.0), (sgn * i.face_w, -0.05)]), i.glasses_color, 0.03)
        edges.append((cx - sgn * rw, 0.0))
    sk.add("line", _curve(edges[0], (0, -0.06), edges[1]), i.glasses_color, 0.035, lift=0.15)


def draw_occluder(sk: Sketch, i: Identity, cond: Conditions, geo: dict) -> None:
    """The capture's occluder, if any: rectangle, sunglasses, hand or mask."""
    kind, (x, y, w, h), color = cond.occluder, cond.occluder_box, cond.occluder_color
    if kind == 1:
        sk.add("fill", np.array([(x - w / 2, y - h / 2), (x + w / 2, y - h / 2), (x + w / 2, y + h / 2),
                                 (x - w / 2, y + h / 2)]), color, lift=0.3)
    elif kind == 2:
        for sgn in (-1, 1):
            lens = _ellipse(sgn * geo["gap"], 0.03, i.eye_w * 1.7, i.eye_w * 1.25, n=16)
            sk.add("fill", lens, (25, 25, 30), lift=0.15)
        sk.add("line", np.array([(-0.2, 0.0), (0.2, 0.0)]), (25, 25, 30), 0.05, lift=0.2)
    elif kind == 3:
        hx, hy = x * 0.6, 0.8 + abs(y) * 0.4
        sk.add("fill", _ellipse(hx, hy + 0.3, 0.45, 0.35, n=16), color, lift=0.4)
        for k in range(4):
            sk.add("fill", _ellipse(hx - 0.3 + 0.2 * k, hy - 0.1, 0.08, 0.3, n=10), color, lift=0.4)
    elif kind == 4:
        top, low, w = geo["nose_y"] - 0.1, i.face_cy + i.face_h * 0.8, i.face_w
        mask = np.concatenate([_curve((-w * 0.95, top), (0, top - 0.25), (w * 0.95, top)),
                               _curve((w * 0.7, low), (0, low + 0.25 * i.face_h), (-w * 0.7, low))])
        sk.add("fill", mask, color, lift=0.2)
