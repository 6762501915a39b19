"""Synthetic data sets in the real formats: an MS1M-style training rec, an IJB-C-style
folder and an LFW-style verification .bin, rendered by :mod:`facecompat.data.synthetic.render`.

Layout written by :func:`generate_synthetic` under ``out``::

    train/train.rec, train.idx, property   insightface layout, aligned 112x112 JPEGs
    IJBC/loose_crop/*.jpg, IJBC/meta/*     see :mod:`facecompat.data.synthetic.ijbc`
    lfw.bin                                verification pairs, aligned 112x112 JPEGs
    manifest.json                          spec and counts, written last

Every output depends only on the :class:`SyntheticSpec` (not on the worker count). The three
sets use disjoint identity seed spaces (``DOMAINS``), so no test identity is a training one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

from facecompat.data.faces import FaceRecWriter
from facecompat.data.pairs_bin import write_pairs_bin
from facecompat.data.synthetic.ijbc import write_ijbc
from facecompat.data.synthetic.pool import render_parallel
from facecompat.data.synthetic.spec import (
    DOMAINS,
    SyntheticError,
    SyntheticSpec,
    _render_lfw_pair,
    _render_train_identity,
    train_image_count,
)

FORMAT_VERSION = 1
OUTPUTS = ("train", "IJBC", "lfw.bin")


def write_train_set(out_dir: str | os.PathLike, spec: SyntheticSpec, workers: int | None = None,
                    progress: bool = True) -> dict:
    """Write the MS1M-style training set (``train.rec/.idx``, ``property``) into ``out_dir``.

    Returns:
        ``{"classes": ..., "images": ...}``.
    """
    labels = list(range(spec.num_ids))
    total = sum(train_image_count(spec, label) for label in labels)
    fn = partial(_render_train_identity, spec=spec)
    with FaceRecWriter(out_dir) as writer:
        for label, images in zip(labels, render_parallel(fn, labels, workers, desc="train", total=total,
                                                         progress=progress)):
            for image in images:
                writer.add(label, image)
    return {"classes": spec.num_ids, "images": total}


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


__all__ = ["DOMAINS", "FORMAT_VERSION", "OUTPUTS", "SyntheticError", "SyntheticSpec", "generate_synthetic",
           "read_manifest", "write_ijbc", "write_lfw_bin", "write_train_set"]
