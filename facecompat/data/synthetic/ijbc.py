"""An IJB-C-style evaluation folder of synthetic subjects, in the files real IJB-C ships
(as insightface's ``IJBC/`` package and the NIST protocol CSVs lay them out)::

    loose_crop/<n>.jpg                    unaligned face crops (n = 1, 2, ...), varying sizes
    meta/ijbc_face_tid_mid.txt            "<image> <template_id> <media_id>" per face
    meta/ijbc_name_5pts_score.txt         "<image> x1 y1 ... x5 y5 <detector_score>" per face
    meta/ijbc_template_pair_label.txt     "<t1> <t2> <label>": t1 a gallery template (G1 or G2),
                                          t2 a probe template, as in the real file; every probe
                                          meets its subject's gallery template (genuine), and
                                          sampled impostor pairs
    meta/ijbc_1N_gallery_G1.csv, ..._G2.csv, ijbc_1N_probe_mixed.csv
        header TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT,
        one row per face of each template

Subjects are split 40% / 40% / 20% into gallery G1, gallery G2 and neither. A gallery subject
has one gallery template of still images (in G1 or G2) and one to three probe templates; the
others have probe templates only (non-mated for both galleries). A probe template mixes stills
and videos: the frames of a video share lighting and background and drift in pose and
expression from frame to frame. Landmarks carry detector-like noise, and detector scores fall
with the capture's difficulty. FILENAME follows the real convention (``img/<media>.jpg`` for
stills, ``frames/<media>_<frame>.png`` for video frames), so, as with the real files, faces join
the CSVs through template ids, not through file names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from facecompat.data.synthetic.identity import Conditions, Identity, rng_for
from facecompat.data.synthetic.pool import render_parallel
from facecompat.data.synthetic.render import render_face
from facecompat.data.synthetic.spec import DOMAINS, SyntheticSpec, encode_jpeg

CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"
_PLAN_KEY = 2**32  # a subject index no identity uses: the protocol plan's own random stream


@dataclass(frozen=True)
class Media:
    """One still image (``frames == 1``) or video of a template."""

    media_id: int
    template_id: int
    subject: int
    frames: int
    hard: float


@dataclass
class IJBCPlan:
    """Subjects, templates, media and 1:1 pairs of an IJB-C-style set (ids are 1-based)."""

    template_subject: dict[int, int] = field(default_factory=dict)
    galleries: dict[str, list[int]] = field(default_factory=dict)  # "G1"/"G2" -> template ids
    probes: list[int] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)  # in face order
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))  # t1, t2, label


def plan_ijbc(spec: SyntheticSpec) -> IJBCPlan:
    """Decide the protocol (cheap, no rendering): subject split, templates, media, pairs."""
    rng = rng_for(spec.seed, DOMAINS["ijbc"], _PLAN_KEY)
    n = spec.ijbc_subjects
    order = rng.permutation(np.arange(1, n + 1))
    n_gallery = max(1, round(0.4 * n))
    split = {"G1": sorted(order[:n_gallery].tolist()), "G2": sorted(order[n_gallery:2 * n_gallery].tolist())}
    plan = IJBCPlan()

    def add_template(subject: int, num_media: int, video_p: float, still_hard: float) -> int:
        tid = len(plan.template_subject) + 1
        plan.template_subject[tid] = subject
        for _ in range(num_media):
            video = rng.random() < video_p
            frames = int(rng.integers(2, 5)) if video else 1
            plan.media.append(Media(len(plan.media) + 1, tid, subject, frames, 1.4 if video else still_hard))
        return tid

    for name, subjects in split.items():  # gallery templates: 2-4 stills of fair quality
        plan.galleries[name] = [add_template(s, int(rng.integers(2, 5)), 0.0, 0.9) for s in subjects]
    for subject in range(1, n + 1):  # probe templates: 1-2 media, half of them videos
        for _ in range(int(rng.integers(1, 4))):
            plan.probes.append(add_template(subject, int(rng.integers(1, 3)), 0.5, 1.2))
    plan.pairs = _pairs(plan, spec.impostors_per_genuine, rng)
    return plan


def _pairs(plan: IJBCPlan, impostors_per_genuine: int, rng: np.random.Generator) -> np.ndarray:
    """IJB-C's 1:1 pairs: the first template enrolled (G1 or G2), the second a probe template.

    Genuine: every probe template with its subject's gallery template, where the subject is
    enrolled (probe-probe and gallery-gallery pairs never occur, as in the real file). Impostors:
    ``impostors_per_genuine`` per genuine pair, sampled without repetition among the (gallery,
    probe) combinations of different subjects, or all of them when there are fewer.
    """
    gallery = np.array(sorted(t for tids in plan.galleries.values() for t in tids), dtype=np.int64)
    probes = np.array(sorted(plan.probes), dtype=np.int64)
    gallery_subj = np.array([plan.template_subject[t] for t in gallery.tolist()])
    probe_subj = np.array([plan.template_subject[t] for t in probes.tolist()])
    same = gallery_subj[:, None] == probe_subj[None, :]
    genuine = [(int(gallery[i]), int(probes[j])) for i, j in zip(*np.nonzero(same))]
    want = min(impostors_per_genuine * max(1, len(genuine)), int((~same).sum()))
    impostors: set[tuple[int, int]] = set()
    while len(impostors) < want:  # rejection sampling: never materialises all combinations
        rows = rng.integers(0, len(gallery), 2 * (want - len(impostors)) + 16)
        cols = rng.integers(0, len(probes), rows.size)
        for i, j in zip(rows.tolist(), cols.tolist()):
            if not same[i, j] and len(impostors) < want:
                impostors.add((int(gallery[i]), int(probes[j])))
    pairs = [(a, b, 1) for a, b in genuine] + [(a, b, 0) for a, b in impostors]
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 3)


def _render_media(media: Media, spec: SyntheticSpec) -> list[tuple[bytes, np.ndarray, float, float]]:
    """Frames of one media: (JPEG, noisy landmarks [5, 2], detector score, eye distance px)."""
    ident = Identity.sample(rng_for(spec.seed, DOMAINS["ijbc"], media.subject, 0))
    rng = rng_for(spec.seed, DOMAINS["ijbc"], media.subject, 3, media.media_id)
    canvas = int(rng.integers(160, 251))
    eye_px = canvas * float(rng.uniform(0.15, 0.24))
    cond = Conditions.sample(rng, canvas=canvas, eye_px=eye_px, hard=media.hard * spec.nuisance)
    quality = int(rng.integers(60, 96))
    frames = []
    for k in range(media.frames):
        if k:
            cond = cond.drift(rng, 1.0)
        img, landmarks = render_face(ident, cond)
        difficulty = cond.difficulty()
        noisy = landmarks + rng.normal(0.0, (0.02 + 0.04 * difficulty) * cond.eye_px, landmarks.shape)
        score = float(np.clip(1.0 - 0.55 * difficulty + rng.normal(0.0, 0.05), 0.3, 1.0))
        frames.append((encode_jpeg(img, quality), noisy, score, cond.eye_px))
    return frames


def _csv_row(tid: int, subject: int, media: Media, frame: int, landmarks: np.ndarray, eye_px: float) -> str:
    filename = f"img/{media.media_id}.jpg" if media.frames == 1 else f"frames/{media.media_id}_{frame}.png"
    cx, cy = landmarks.mean(axis=0)
    w = 2.3 * eye_px
    box = f"{cx - w / 2:.0f},{cy - 0.5 * w:.0f},{w:.0f},{1.2 * w:.0f}"
    return f"{tid},{subject},{filename},{media.media_id},{box}"


def write_ijbc(out_dir: str | os.PathLike, spec: SyntheticSpec, workers: int | None = None,
               progress: bool = True) -> dict:
    """Render the IJB-C-style folder into ``out_dir`` (``loose_crop/`` and ``meta/``).

    Returns:
        counts: subjects, templates, media, faces, pairs, genuine, gallery_G1, gallery_G2, probes.
    """
    out_dir = Path(out_dir)
    crops, meta = out_dir / "loose_crop", out_dir / "meta"
    crops.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    plan = plan_ijbc(spec)
    where = {tid: name for name, tids in plan.galleries.items() for tid in tids}
    where.update({tid: "probe" for tid in plan.probes})
    tid_mid, pts, csv = [], [], {"G1": [CSV_HEADER], "G2": [CSV_HEADER], "probe": [CSV_HEADER]}
    total = sum(m.frames for m in plan.media)
    results = render_parallel(partial(_render_media, spec=spec), plan.media, workers, desc="IJBC",
                              total=total, progress=progress)
    for media, frames in zip(plan.media, results):
        tid = media.template_id
        subject = plan.template_subject[tid]
        for k, (jpeg, landmarks, score, eye_px) in enumerate(frames):
            name = f"{len(tid_mid) + 1}.jpg"
            (crops / name).write_bytes(jpeg)
            tid_mid.append(f"{name} {tid} {media.media_id}")
            pts.append(" ".join([name, *(f"{v:.3f}" for v in landmarks.ravel()), f"{score:.5f}"]))
            csv[where[tid]].append(_csv_row(tid, subject, media, k, landmarks, eye_px))
    files = {"ijbc_face_tid_mid.txt": tid_mid, "ijbc_name_5pts_score.txt": pts,
             "ijbc_template_pair_label.txt": [f"{a} {b} {c}" for a, b, c in plan.pairs.tolist()],
             "ijbc_1N_gallery_G1.csv": csv["G1"], "ijbc_1N_gallery_G2.csv": csv["G2"],
             "ijbc_1N_probe_mixed.csv": csv["probe"]}
    for name, lines in files.items():
        (meta / name).write_text("\n".join(lines) + "\n")
    return {"subjects": spec.ijbc_subjects, "templates": len(plan.template_subject), "media": len(plan.media),
            "faces": len(tid_mid), "pairs": len(plan.pairs), "genuine": int(plan.pairs[:, 2].sum()),
            "gallery_G1": len(plan.galleries["G1"]), "gallery_G2": len(plan.galleries["G2"]),
            "probes": len(plan.probes)}
