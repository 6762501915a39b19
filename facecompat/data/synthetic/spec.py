"""What to generate (:class:`SyntheticSpec`) and the per-identity render jobs the worker processes run
(torch-free: workers import only this, :mod:`.identity`, :mod:`.render`, :mod:`.drawing` and :mod:`.pool`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from facecompat.data.align import align_face
from facecompat.data.synthetic.identity import Conditions, Identity, rng_for
from facecompat.data.synthetic.render import render_face
from facecompat.errors import UserError

DOMAINS = {"train": 0, "ijbc": 1, "lfw": 2}  # first key of every identity's random stream
TRAIN_CANVAS = 160


class SyntheticError(UserError, ValueError):
    """Bad synthetic-data request: an invalid size, or an output folder in an unexpected state."""


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; the output is a pure function of it.

    Attributes:
        num_ids: training identities.
        imgs_per_id: (min, max) images per training identity, drawn uniformly per identity.
        ijbc_subjects: IJB-C-style subjects (40% in gallery G1, 40% in G2, 20% in neither).
        lfw_pairs: verification pairs in lfw.bin (alternately genuine and impostor).
        impostors_per_genuine: sampled impostor template pairs per genuine pair (IJB-C 1:1).
        seed: root seed of every random stream.
        jpeg_quality: JPEG quality of the aligned training and lfw.bin images.
        nuisance: scales how often and how strongly pose, lighting, blur, noise, occluders and
            the other per-capture nuisances appear (1: the default; below 1, an easier task that
            small models learn in a few hundred steps).
    """

    num_ids: int = 1000
    imgs_per_id: tuple[int, int] = (20, 20)
    ijbc_subjects: int = 200
    lfw_pairs: int = 300
    impostors_per_genuine: int = 30
    seed: int = 0
    jpeg_quality: int = 95
    nuisance: float = 1.0

    def __post_init__(self) -> None:
        try:
            lo, hi = (int(v) for v in self.imgs_per_id)
        except (TypeError, ValueError):
            raise SyntheticError(f"imgs_per_id={self.imgs_per_id!r} must be a (min, max) pair") from None
        object.__setattr__(self, "imgs_per_id", (lo, hi))
        checks = [("num_ids", self.num_ids >= 1, "must be >= 1"),
                  ("imgs_per_id", 1 <= lo <= hi, "must be MIN:MAX with 1 <= MIN <= MAX"),
                  ("ijbc_subjects", self.ijbc_subjects >= 3, "must be >= 3 (G1, G2 and non-mated subjects)"),
                  ("lfw_pairs", self.lfw_pairs >= 2, "must be >= 2 (a genuine and an impostor pair)"),
                  ("impostors_per_genuine", self.impostors_per_genuine >= 1, "must be >= 1"),
                  ("seed", 0 <= self.seed < 2**63, "must be in [0, 2**63)"),
                  ("jpeg_quality", 1 <= self.jpeg_quality <= 100, "must be in [1, 100]")]
        for name, ok, why in checks:
            if not isinstance(getattr(self, name), (int, tuple)) or not ok:
                raise SyntheticError(f"{name}={getattr(self, name)!r} {why}")
        if isinstance(self.nuisance, bool) or not isinstance(self.nuisance, (int, float)) \
                or not 0.0 < self.nuisance <= 2.0:
            raise SyntheticError(f"nuisance={self.nuisance!r} must be in (0, 2] (1: the default captures)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["imgs_per_id"] = list(self.imgs_per_id)
        if self.nuisance == 1.0:  # the spec before the knob existed: its manifests stay valid
            del d["nuisance"]
        return d


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a BGR uint8 image."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


def render_aligned(ident: Identity, key: tuple[int, ...], quality: int, hard: float = 1.0) -> bytes:
    """Render one capture (conditions from ``rng_for(*key)``), align it to 112x112 by its
    landmarks, and JPEG-encode it."""
    rng = rng_for(*key)
    cond = Conditions.sample(rng, canvas=TRAIN_CANVAS, eye_px=float(rng.uniform(24, 36)), hard=hard)
    img, landmarks = render_face(ident, cond)
    return encode_jpeg(align_face(img, landmarks), quality)


def train_image_count(spec: SyntheticSpec, label: int) -> int:
    lo, hi = spec.imgs_per_id
    return int(rng_for(spec.seed, DOMAINS["train"], label, 1).integers(lo, hi + 1))


def _render_train_identity(label: int, spec: SyntheticSpec) -> list[bytes]:
    ident = Identity.sample(rng_for(spec.seed, DOMAINS["train"], label, 0))
    return [render_aligned(ident, (spec.seed, DOMAINS["train"], label, 2, k), spec.jpeg_quality,
                           hard=spec.nuisance) for k in range(train_image_count(spec, label))]


def _render_lfw_pair(index: int, spec: SyntheticSpec) -> list[bytes]:
    domain = DOMAINS["lfw"]
    first = Identity.sample(rng_for(spec.seed, domain, 2 * index, 0))
    second = first if index % 2 == 0 else Identity.sample(rng_for(spec.seed, domain, 2 * index + 1, 0))
    return [render_aligned(ident, (spec.seed, domain, index, 2, k), spec.jpeg_quality,
                           hard=0.8 * spec.nuisance)
            for k, ident in enumerate((first, second))]
