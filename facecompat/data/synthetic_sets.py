"""Synthetic data sets in the real formats: an MS1M-style training rec, an IJB-C-style
folder and an LFW-style verification .bin, rendered by :mod:`facecompat.data.synthetic`.

Layout written by :func:`generate_synthetic` under ``out``::

    train/train.rec, train.idx, property   insightface layout, aligned 112x112 JPEGs
    IJBC/loose_crop/*.jpg, IJBC/meta/*     see :mod:`facecompat.data.synthetic_ijb`
    lfw.bin                                verification pairs, aligned 112x112 JPEGs
    manifest.json                          spec and counts, written last

Every output depends only on the :class:`SyntheticSpec` (not on the worker count). The three
sets use disjoint identity seed spaces (``DOMAINS``), so no test identity is a training one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from facecompat.data.align import align_face
from facecompat.data.pairs_bin import write_pairs_bin
from facecompat.data.synthetic import Conditions, Identity, render_face, render_parallel, rng_for
from facecompat.errors import UserError

FORMAT_VERSION = 1
DOMAINS = {"train": 0, "ijbc": 1, "lfw": 2}  # first key of every identity's random stream
TRAIN_CANVAS = 160
OUTPUTS = ("train", "IJBC", "lfw.bin")


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


def write_train_set(out_dir: str | os.PathLike, spec: SyntheticSpec, workers: int | None = None,
                    progress: bool = True) -> dict:
    """Write the MS1M-style training set (``train.rec/.idx``, ``property``) into ``out_dir``.

    Returns:
        ``{"classes": ..., "images": ...}``.
    """
    from facecompat.data.faces import FaceRecWriter  # torch-side module: keep it out of workers

    labels = list(range(spec.num_ids))
    total = sum(train_image_count(spec, label) for label in labels)
    fn = partial(_render_train_identity, spec=spec)
    with FaceRecWriter(out_dir) as writer:
        for label, images in zip(labels, render_parallel(fn, labels, workers, desc="train", total=total,
                                                         progress=progress)):
            for image in images:
                writer.add(label, image)
    return {"classes": spec.num_ids, "images": total}


def _render_lfw_pair(index: int, spec: SyntheticSpec) -> list[bytes]:
    domain = DOMAINS["lfw"]
    first = Identity.sample(rng_for(spec.seed, domain, 2 * index, 0))
    second = first if index % 2 == 0 else Identity.sample(rng_for(spec.seed, domain, 2 * index + 1, 0))
    return [render_aligned(ident, (spec.seed, domain, index, 2, k), spec.jpeg_quality,
                           hard=0.8 * spec.nuisance)
            for k, ident in enumerate((first, second))]


def write_lfw_bin(path: str | os.PathLike, spec: SyntheticSpec, workers: int | None = None,
                  progress: bool = True) -> dict:
    """Write an LFW-style ``.bin``: pair ``i`` is genuine for even ``i``, impostor for odd ``i``
    (so every contiguous fold is balanced); every pair has its own identities.

    Returns:
        ``{"pairs": ..., "genuine": ...}``.
    """
    pairs = list(range(spec.lfw_pairs))
    images: list[bytes] = []
    fn = partial(_render_lfw_pair, spec=spec)
    for pair in render_parallel(fn, pairs, workers, desc="lfw", total=2 * len(pairs), progress=progress):
        images.extend(pair)
    issame = [i % 2 == 0 for i in pairs]
    write_pairs_bin(path, images, issame)
    return {"pairs": len(pairs), "genuine": sum(issame)}


def read_manifest(out: str | os.PathLike) -> dict | None:
    """The manifest of a complete synthetic folder, or None when there is none."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SyntheticError(f"{path}: unreadable manifest ({e}); pass --force to regenerate") from e


def _check_target(out: Path, spec: SyntheticSpec, force: bool) -> dict | None:
    """The manifest to reuse when ``out`` already holds this spec; raise when it holds something else."""
    if force:
        return None
    manifest = read_manifest(out)
    if manifest is not None:
        if manifest.get("spec") == spec.to_dict() and manifest.get("version") == FORMAT_VERSION:
            return manifest
        old = manifest.get("spec") or {}
        diff = ", ".join(f"{k} {old.get(k)!r} there, {v!r} asked" for k, v in spec.to_dict().items()
                         if old.get(k) != v) or f"format version {manifest.get('version')}"
        raise SyntheticError(f"{out}: holds synthetic data of another spec ({diff}); "
                             "pass --force to replace it")
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present:
        raise SyntheticError(f"{out}: {', '.join(present)} exist(s) without manifest.json (an interrupted "
                             "run, or not our folder); pass --force to replace")
    return None


def generate_synthetic(out: str | os.PathLike, spec: SyntheticSpec, workers: int | None = None, *,
                       force: bool = False, progress: bool = True) -> tuple[dict, bool]:
    """Render the training set, the IJB-C folder and lfw.bin into ``out``.

    Outputs are built in a staging folder inside ``out`` and renamed into place at the end;
    ``manifest.json`` is written last, so its presence marks a complete folder. A folder whose
    manifest already records ``spec`` is left as it is (unless ``force``).

    Args:
        out: output folder (created).
        spec: what to generate.
        workers: render processes (``None``: one per CPU); the output does not depend on it.
        force: replace whatever ``out`` holds of ours (``train``, ``IJBC``, ``lfw.bin``, manifest).
        progress: tqdm bars.

    Returns:
        ``(manifest, generated)``: ``generated`` is False when an existing output was reused.

    Raises:
        SyntheticError: ``out`` holds another spec or outputs without a manifest (and not ``force``).
    """
    from facecompat.data.synthetic_ijb import write_ijbc

    out = Path(out)
    existing = _check_target(out, spec, force)
    if existing is not None:
        return existing, False
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=out))
    try:
        counts = {"train": write_train_set(stage / "train", spec, workers, progress),
                  "ijbc": write_ijbc(stage / "IJBC", spec, workers, progress),
                  "lfw": write_lfw_bin(stage / "lfw.bin", spec, workers, progress)}
        (out / "manifest.json").unlink(missing_ok=True)
        for name in OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(stage / name, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    manifest = {"format": "facecompat-synthetic", "version": FORMAT_VERSION, "spec": spec.to_dict(),
                "identity_domains": DOMAINS, "counts": counts, "outputs": list(OUTPUTS)}
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest, True
