"""Pack a folder of face images, ``root/<identity>/<image>``, into an insightface-layout rec.

Identities are numbered in sorted folder-name order (written to ``identities.txt`` beside
the rec), images in sorted file-name order. Images must already be aligned to the target
size, or come with a landmark file (``relative/path x1 y1 ... x5 y5 [score]`` per line, the
IJB-C ``*_name_5pts_score.txt`` convention) and are then aligned to the ArcFace template.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from facecompat.data.align import align_face
from facecompat.data.faces import FaceRecWriter
from facecompat.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class ImageFolderError(UserError, ValueError):
    """A folder, image or landmark line that cannot be packed; names the file."""


def list_image_folder(root: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """[(identity name, sorted image paths)] for every non-empty identity folder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"{root}: not a directory")
    identities = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            identities.append((folder.name, images))
    if not identities:
        raise ImageFolderError(f"{root}: no <identity>/<image> files found")
    return identities


def read_landmarks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``relative/path x1 y1 ... x5 y5 [score]`` per line → {relative path: [5, 2] float32}."""
    marks: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (11, 12):
            raise ImageFolderError(f"{path}: line {lineno}: expected 'image x1 y1 ... x5 y5 [score]', "
                                   f"got {len(fields)} fields")
        try:
            marks[fields[0]] = np.array(fields[1:11], dtype=np.float32).reshape(5, 2)
        except ValueError:
            raise ImageFolderError(f"{path}: line {lineno}: non-numeric landmark") from None
    return marks


def _encode(path: Path, rel: str, landmarks: dict[str, np.ndarray] | None, size: int, quality: int,
            reencode: bool) -> bytes:
    data = path.read_bytes()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageFolderError(f"{path}: not a decodable image")
    if landmarks is not None:
        if rel not in landmarks:
            raise ImageFolderError(f"{path}: no landmarks for '{rel}' in the landmark file")

        try:
            img = align_face(img, landmarks[rel], size=size)
        except ValueError as e:  # degenerate or non-finite landmarks
            raise ImageFolderError(f"{path}: cannot align with its landmarks: {e}") from None
    elif img.shape[:2] != (size, size):
        raise ImageFolderError(f"{path}: image is {img.shape[1]}x{img.shape[0]}, expected "
                               f"{size}x{size} (pass --align LANDMARKS to align loose crops)")
    elif not reencode and path.suffix.lower() in (".jpg", ".jpeg"):
        return data  # already an aligned JPEG: store its bytes untouched
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def pack_image_folder(root: str | os.PathLike, out_dir: str | os.PathLike,
                      landmarks: str | os.PathLike | None = None, size: int = 112, quality: int = 95,
                      workers: int = 4, reencode: bool = False, progress: bool = True) -> dict:
    """Write ``out_dir/train.rec, train.idx, property, identities.txt``; returns counts.

    Aligned JPEGs are stored byte for byte (unless ``reencode``); other images, and every
    image when ``landmarks`` is given (after alignment), are encoded as JPEG at ``quality``.
    """
    root, out_dir = Path(root), Path(out_dir)
    identities = list_image_folder(root)
    marks = read_landmarks(landmarks) if landmarks is not None else None
    jobs = [(label, path) for label, (_, paths) in enumerate(identities) for path in paths]

    def encode(job: tuple[int, Path]) -> bytes:
        rel = job[1].relative_to(root).as_posix()
        return _encode(job[1], rel, marks, size, quality, reencode)

    with ThreadPoolExecutor(max(1, workers)) as pool, FaceRecWriter(out_dir, image_size=(size, size)) as w:
        encoded: Iterator[bytes] = pool.map(encode, jobs)  # ordered; cv2 releases the GIL
        for (label, _), data in tqdm(zip(jobs, encoded), total=len(jobs), desc="packing", unit="img",
                                     disable=None if progress else True):
            w.add(label, data)
    tmp = out_dir / ".identities.txt.tmp"
    tmp.write_text("".join(f"{label}\t{name}\n" for label, (name, _) in enumerate(identities)))
    os.replace(tmp, out_dir / "identities.txt")
    return {"identities": len(identities), "images": len(jobs), "rec": str(out_dir / "train.rec")}
