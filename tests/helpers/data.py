"""Generated data for the tests: recs of noise or stand-in JPEGs, a small synthetic set's spec,
near-perfect per-subject IJB-C features, the channels_last layout check."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from facecompat.data.faces import FaceRecWriter
from facecompat.data.synthetic.sets import SyntheticSpec

# A small generated set: the generator's tests and tools/make_synthetic.py's up-to-date check (the tool's
# flags for it: --num-ids 5 --imgs-per-id 2:4 --ijbc-subjects 10 --lfw-pairs 6 --impostors-per-genuine 5
# --seed 3).
SMALL_SYNTHETIC = SyntheticSpec(num_ids=5, imgs_per_id=(2, 4), ijbc_subjects=10, lfw_pairs=6,
                                impostors_per_genuine=5, seed=3)
# The identities of the split tests' rec (12 identities, 63 images).
SPLIT_CLASS_SIZES = [3, 2, 5, 8, 4, 10, 2, 7, 6, 3, 9, 4]


def noise_rec(out_dir: Path, class_sizes: list[int], size: int = 112, seed: int = 0) -> Path:
    """An insightface-layout rec of noise JPEGs (every image unique), ``class_sizes[c]`` per class."""
    rng = np.random.default_rng(seed)
    with FaceRecWriter(out_dir) as w:
        for label, count in enumerate(class_sizes):
            for _ in range(count):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                w.add(label, cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out_dir


def _payload(label: int, j: int) -> bytes:
    return f"\xff\xd8 fake jpeg of class {label} image {j} ".encode() * (1 + j % 3)


def payload_rec(out_dir: Path, class_sizes: list[int]) -> Path:
    """A rec of stand-in payloads (JPEG magic, then text naming class and image), never decoded:
    for the tests that only read labels and record ids."""
    with FaceRecWriter(out_dir) as writer:
        for label, size in enumerate(class_sizes):
            for j in range(size):
                writer.add(label, _payload(label, j))
    return out_dir


def subject_features(meta, rng: np.random.Generator | int = 0, dim: int = 16,
                     noise: float = 0.05) -> np.ndarray:
    """IJB face features ``[num_faces, dim]`` = the face's subject centre + noise: a near-perfect
    model. ``meta`` is an ``IJBMeta``; ``rng`` a generator or a seed."""
    rng = np.random.default_rng(rng)
    subject_of = {}
    for group in (meta.probes, *meta.galleries.values()):
        subject_of.update(zip(group.template_ids.tolist(), group.subject_ids.tolist()))
    subjects = np.array([subject_of[t] for t in meta.template_ids.tolist()])
    centres = rng.standard_normal((subjects.max() + 1, dim))
    return (centres[subjects] + noise * rng.standard_normal((meta.num_faces, dim))).astype(np.float32)


def is_channels_last(images: torch.Tensor) -> bool:
    """Dense in channels_last order, and not also NCHW-contiguous (with 3 channels it cannot be both)."""
    return images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()


IJB_CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"


def write_ijb_meta(folder: Path, num_subjects: int) -> Path:
    """A meta-only IJB-C folder (``folder/meta``, no images: enough for precomputed features): per subject
    one gallery template (G1 for even subjects, G2 for odd) and two probe templates, one face each;
    the pairs are every gallery template against every probe (genuine where the subjects match), so
    there are ``2 n`` genuine and ``2 n (n - 1)`` impostor pairs. Returns ``folder``."""
    meta = folder / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    gallery = [(1000 + s, s) for s in range(num_subjects)]
    probes = [(5000 + 2 * s + k, s) for s in range(num_subjects) for k in range(2)]
    faces = gallery + probes
    lines = {"ijbc_face_tid_mid.txt": [f"{t}.jpg {t} {t}" for t, _ in faces],
             "ijbc_name_5pts_score.txt": [f"{t}.jpg " + " ".join(["40.0"] * 10) + " 0.9" for t, _ in faces],
             "ijbc_template_pair_label.txt": [f"{g} {p} {int(gs == ps)}"
                                              for g, gs in gallery for p, ps in probes]}
    groups = (("G1", [g for g in gallery if g[1] % 2 == 0]), ("G2", [g for g in gallery if g[1] % 2]),
              ("probe_mixed", probes))
    for name, rows in groups:
        key = f"ijbc_1N_gallery_{name}.csv" if name != "probe_mixed" else "ijbc_1N_probe_mixed.csv"
        lines[key] = [IJB_CSV_HEADER] + [f"{t},{s},img/{t}.jpg,{t},10,10,50,60" for t, s in rows]
    for name, rows in lines.items():
        (meta / name).write_text("\n".join(rows) + "\n")
    return folder


# images per identity in write_faces, cycled: one-image identities and capped ones
FACE_FOLDER_SIZES = (1, 2, 3, 4, 6, 9, 14)


def write_faces(root: Path, num_ids: int = 21, shape: tuple[int, int] = (112, 112), seed: int = 0) -> Path:
    """``root/id<k>/<j>.jpg``: random images, FACE_FOLDER_SIZES[k % 7] per identity, an empty folder and a
    stray file (a face folder as tools/make_protocol.py takes it)."""
    rng = np.random.default_rng(seed)
    for k in range(num_ids):
        (root / f"id{k:02d}").mkdir(parents=True)
        for j in range(FACE_FOLDER_SIZES[k % len(FACE_FOLDER_SIZES)]):
            cv2.imwrite(str(root / f"id{k:02d}" / f"{j}.jpg"), rng.integers(0, 255, (*shape, 3), np.uint8))
    (root / "nobody").mkdir()
    (root / "README.txt").write_text("not an identity")
    return root
