"""A team's own test faces as an IJB-C-style folder, so that the whole IJB evaluation (5-point
alignment, pooling, 1:1, 1:N, the certificate's subject bootstrap) runs on them unchanged.

Two sources, each written as ``out_dir/`` = ``meta/ijbc_*`` (DESIGN §4's formats), ``loose_crop/``,
``faces.txt`` (crop name -> source), ``identities.txt`` (subject id -> folder) and ``protocol.json``
(inputs, counts). :func:`make_face_folder_protocol`, from ``root/<identity>/<image>``; every choice
follows from the sorted file names and ``seed`` alone (through numpy's Generator, whose version
protocol.json records):

- Subjects: identity folders holding images, numbered 1.. in sorted name order; folders without
  images are skipped (counted, named). Each identity's images are shuffled by a stream seeded with
  sha1(seed, name), so an identity's split does not move when others are added.
- Enrolment: identities of >= 2 images, ordered by sha1(seed, name); the first
  ``round(gallery_share * n)`` (half up, at least 2) are enrolled, alternately in G1 and G2, the
  others in neither gallery (non-mated probes of both). A one-image identity is a non-mated probe.
- Templates: an enrolled identity's gallery template takes its first ``min(gallery_images, n // 2)``
  shuffled images; then come probe templates of ``probe_images`` images (the last may be shorter),
  at most ``probe_templates`` of them; images beyond are unused (counted). Each image is its own
  media; template ids 1.. in subject order, the gallery template first.
- 1:1 pairs ``t1 t2 label``: t1 a gallery template, t2 a probe template (IJB-C's columns). Genuine:
  every probe template of an enrolled identity with its gallery template. Impostors: (gallery
  template, probe template of another identity), ``max(min_impostors, impostors_per_genuine x
  genuine)`` of them drawn without repetition by ``numpy.random.default_rng(seed)``, or all of them
  when there are no more. Sorted by (t1, t2).
- 1:N: the G1/G2 CSVs list the gallery templates' faces, the probe CSV every probe template's.

:func:`make_bin_protocol`, from a verification ``.bin``: each distinct image (identical encoded
bytes: a .bin stores an image once per pair it is in) is one template of one face; the pair file is
the .bin's pairs in order. No 1:N files (a .bin has no identities): the certificate then takes
subjects from the genuine-pair components.

Faces: aligned square images get :data:`ARCFACE_TEMPLATE` scaled to their side as landmarks (the
alignment gives the image back), loose crops the landmark file's points; detector score 1.0 for every
face (a landmark file's score column is ignored). Crops are ``loose_crop/<n>_<sha1[:8]><ext>``, hard
links to the sources where possible, else copies: the content hash in the name makes the face list
differ between sets of different images (the feature cache keys on it). A folder is built in a
temporary folder beside ``out_dir`` and renamed onto it; a second call with the same inputs verifies
and reuses it (or rewrites it identically when its files changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from facecompat.data.align import ARCFACE_TEMPLATE, estimate_similarity
from facecompat.data.image_folder import IMAGE_SUFFIXES, ImageFolderError, read_landmarks
from facecompat.data.pairs_bin import PairsBinError, load_pairs_bin
from facecompat.data.synthetic.ijbc import CSV_HEADER
from facecompat.errors import UserError
from facecompat.fileio import atomic_write, file_sha1

VERSION = 1
META_FILES = ("ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt", "ijbc_template_pair_label.txt")
ONE_TO_N_FILES = ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv")
NO_1N = "none: a verification .bin has no identities; bootstrap subjects are the genuine-pair components"


class ProtocolError(UserError, ValueError):
    """A face folder, landmark file, .bin or output folder that cannot make a protocol; one line."""


@dataclass(frozen=True)
class SplitParams:
    """The face-folder split knobs (module docstring). Counts are >= 1 except the impostor ones."""

    gallery_images: int = 3
    probe_images: int = 1
    probe_templates: int = 10
    gallery_share: float = 0.8
    impostors_per_genuine: int = 100
    min_impostors: int = 100_000

    def __post_init__(self) -> None:
        for name, low in (("gallery_images", 1), ("probe_images", 1), ("probe_templates", 1),
                          ("impostors_per_genuine", 0), ("min_impostors", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ProtocolError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not isinstance(self.gallery_share, (int, float)) or not 0.0 < self.gallery_share <= 1.0:
            raise ProtocolError(f"gallery_share: expected a share in (0, 1], got {self.gallery_share!r}")


@dataclass(frozen=True)
class _Face:
    key: str  # the source: relative path in the folder, or "image <i>" of the .bin
    sha1: str
    ext: str
    landmarks: np.ndarray  # [5, 2] float64
    path: Path | None = None  # file to link or copy, or
    data: bytes | None = None  # the encoded image itself


@dataclass(frozen=True)
class _Template:
    subject: int
    group: str  # "G1", "G2", "probe"; "" without 1:N
    faces: tuple[int, ...]


def _aligned_points(data: bytes, what: str, aligned: bool = True) -> np.ndarray | None:
    """ArcFace's points scaled to a decodable square image (``aligned``), else None for any decodable
    image; ProtocolError naming ``what`` for an image that does not decode or is not square."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ProtocolError(f"{what}: not a decodable image")
    if not aligned:
        return None
    h, w = img.shape[:2]
    if h != w:
        raise ProtocolError(f"{what}: image is {w}x{h}; aligned faces are square (give a landmark file "
                            f"for loose crops)")
    return ARCFACE_TEMPLATE * (w / 112.0)


def _read_face(path: Path, rel: str, marks: dict[str, np.ndarray] | None, mark_file: str) -> _Face:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProtocolError(f"{path}: cannot read ({e.strerror or e})") from None
    points = _aligned_points(data, str(path), aligned=marks is None)
    if marks is not None:
        if rel not in marks:
            raise ProtocolError(f"{path}: no landmarks for '{rel}' in {mark_file}")
        points = marks[rel].astype(np.float64)
        try:
            estimate_similarity(points, ARCFACE_TEMPLATE)
        except ValueError as e:
            raise ProtocolError(f"{path}: its landmarks in {mark_file} cannot align: {e}") from None
    return _Face(rel, hashlib.sha1(data).hexdigest(), path.suffix.lower(), points, path=path)


def _list_folder(root: Path) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """([(identity, sorted image paths)] of identity folders holding images, [skipped empty folders])."""
    if not root.is_dir():
        raise ProtocolError(f"{root}: not a directory")
    identities, empty = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            identities.append((folder.name, images))
        else:
            empty.append(folder.name)
    if not identities:
        raise ProtocolError(f"{root}: no <identity>/<image> files found")
    return identities, empty


def _digest(seed: int, name: str) -> bytes:
    return hashlib.sha1(f"{seed}\0{name}".encode()).digest()


def _split(identities: Sequence[tuple[str, Sequence[int]]], seed: int, p: SplitParams) -> list[_Template]:
    """Gallery and probe templates of every identity (module docstring), in template-id order."""
    multi = [name for name, faces in identities if len(faces) >= 2]
    if len(multi) < 2:
        raise ProtocolError(f"{len(multi)} identities with 2 or more images; a gallery/probe split needs "
                            f"at least 2 (one enrolled in G1, one in G2)")
    order = sorted(multi, key=lambda name: (_digest(seed, name), name))
    num_enrolled = min(len(multi), max(2, int(np.floor(p.gallery_share * len(multi) + 0.5))))
    group_of = {name: ("G1", "G2")[i % 2] for i, name in enumerate(order[:num_enrolled])}
    templates = []
    for subject, (name, faces) in enumerate(identities, 1):
        stream = np.random.default_rng(int.from_bytes(_digest(seed, name)[:8], "little"))
        faces = [faces[i] for i in stream.permutation(len(faces)).tolist()]
        if name in group_of:
            k = min(p.gallery_images, len(faces) // 2)
            templates.append(_Template(subject, group_of[name], tuple(faces[:k])))
            faces = faces[k:]
        chunks = [faces[i:i + p.probe_images] for i in range(0, len(faces), p.probe_images)]
        templates += [_Template(subject, "probe", tuple(c)) for c in chunks[:p.probe_templates]]
    return templates


def _pairs(templates: Sequence[_Template], seed: int, p: SplitParams) -> tuple[np.ndarray, int]:
    """([M, 3] int64 ``t1 t2 label`` sorted, number of possible impostor pairs): module docstring."""
    gallery = np.array([i + 1 for i, t in enumerate(templates) if t.group != "probe"], np.int64)
    probes = np.array([i + 1 for i, t in enumerate(templates) if t.group == "probe"], np.int64)
    row_of = {templates[t - 1].subject: row for row, t in enumerate(gallery.tolist())}
    genuine = np.array([row_of[templates[t - 1].subject] * probes.size + col
                        for col, t in enumerate(probes.tolist()) if templates[t - 1].subject in row_of],
                       np.int64)  # flat index gallery row * P + probe column
    total = gallery.size * probes.size
    possible = total - genuine.size
    want = min(possible, max(p.min_impostors, p.impostors_per_genuine * genuine.size))
    if want == possible:
        impostors = np.setdiff1d(np.arange(total, dtype=np.int64), genuine)
    else:  # never materialises every combination: draw with room for the genuine ones, drop them
        draw = np.random.default_rng(seed).choice(total, size=want + genuine.size, replace=False)
        impostors = draw[~np.isin(draw, genuine)][:want]
    flat = np.concatenate([genuine, impostors])
    labels = np.r_[np.ones(genuine.size, np.int64), np.zeros(impostors.size, np.int64)]
    pairs = np.stack([gallery[flat // probes.size], probes[flat % probes.size], labels], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))], int(possible)


def _csv_row(tid: int, subject: int, name: str, media: int, points: np.ndarray) -> str:
    (cx, cy), eye = points.mean(axis=0), float(np.linalg.norm(points[1] - points[0]))
    w = 2.3 * eye  # a face box around the landmarks, as the synthetic IJB-C folder writes it
    return f"{tid},{subject},{name},{media},{cx - w / 2:.0f},{cy - w / 2:.0f},{w:.0f},{1.2 * w:.0f}"


def _place(face: _Face, dest: Path, link: bool) -> None:
    if face.data is not None:
        dest.write_bytes(face.data)
        return
    if link:
        try:
            os.link(face.path, dest)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    shutil.copyfile(face.path, dest)


def _write_folder(dest: Path, faces: Sequence[_Face], templates: Sequence[_Template], pairs: np.ndarray,
                  link: bool) -> dict[str, str]:
    """``loose_crop/``, ``meta/`` and ``faces.txt`` of a plan; the sha1 of every meta file."""
    (dest / "loose_crop").mkdir()
    (dest / "meta").mkdir()
    one_to_n = any(t.group for t in templates)
    tid_mid, pts, sources = [], [], []
    csv: dict[str, list[str]] = {"G1": [CSV_HEADER], "G2": [CSV_HEADER], "probe": [CSV_HEADER]}
    for tid, template in enumerate(templates, 1):
        for index in template.faces:
            face, num = faces[index], len(tid_mid) + 1
            name = f"{num}_{face.sha1[:8]}{face.ext}"
            _place(face, dest / "loose_crop" / name, link)
            tid_mid.append(f"{name} {tid} {num}")
            pts.append(" ".join([name, *(f"{v:.4f}" for v in face.landmarks.ravel()), "1.00000"]))
            sources.append(f"{name}\t{face.key}")
            if one_to_n:
                csv[template.group].append(_csv_row(tid, template.subject, name, num, face.landmarks))
    files = dict(zip(META_FILES, (tid_mid, pts, [f"{a} {b} {c}" for a, b, c in pairs.tolist()])))
    if one_to_n:
        files.update(zip(ONE_TO_N_FILES, (csv["G1"], csv["G2"], csv["probe"])))
    for name, lines in files.items():
        (dest / "meta" / name).write_text("\n".join(lines) + "\n")
    (dest / "faces.txt").write_text("".join(f"{line}\n" for line in sources))
    return {name: file_sha1(dest / "meta" / name) for name in files}


def _crop_stats(folder: Path) -> dict[str, int]:
    sizes = [p.stat().st_size for p in folder.iterdir()] if folder.is_dir() else []
    return {"files": len(sizes), "bytes": int(sum(sizes))}


def _reusable(out_dir: Path, inputs: dict, overwrite: bool) -> dict | None:
    """``out_dir``'s record when it holds this protocol intact; None to build; ProtocolError when it
    holds something else (other files, or a protocol of other inputs without ``overwrite``)."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise ProtocolError(f"{out_dir}: exists and is not a folder")
    record_path = out_dir / "protocol.json"
    if not record_path.is_file():
        if any(out_dir.iterdir()):
            raise ProtocolError(f"{out_dir}: holds files but no protocol.json; give a new or empty folder")
        return None
    try:
        record = json.loads(record_path.read_text())
        old = dict(record["inputs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"{record_path}: not a protocol record ({type(e).__name__}: {e})") from None
    differ = [k for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k)]
    if differ:
        if overwrite:
            return None
        raise ProtocolError(f"{out_dir}: holds a protocol of other inputs ({', '.join(differ)} differ); "
                            f"give another folder, or overwrite it (--force)")
    meta, hashes = out_dir / "meta", record.get("meta_sha1")
    intact = isinstance(hashes, dict) and bool(hashes) and all(
        (meta / n).is_file() and file_sha1(meta / n) == h for n, h in hashes.items())
    if intact and _crop_stats(out_dir / "loose_crop") == record.get("loose_crop"):
        return {**record, "reused": True}
    return None  # same inputs, files changed since: rewrite


def _install(out_dir: Path, build: Callable[[Path], None]) -> None:
    """Run ``build`` on a temporary folder beside ``out_dir`` and rename it onto ``out_dir``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes it private
        build(tmp)
        if out_dir.exists() and any(out_dir.iterdir()):  # our own protocol folder, being replaced
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)  # onto an empty folder, or none
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _record(kind: str, inputs: dict, counts: dict, extra: dict) -> dict:
    return {"format": "facecompat-protocol", "version": VERSION, "kind": kind, "inputs": inputs,
            "counts": counts, **extra, "numpy": np.__version__}


def _build(out_dir: Path, record: dict, faces: Sequence[_Face], templates: Sequence[_Template],
           pairs: np.ndarray, link: bool, identities: Sequence[str] = ()) -> dict:
    def build(tmp: Path) -> None:
        record["meta_sha1"] = _write_folder(tmp, faces, templates, pairs, link)
        record["loose_crop"] = _crop_stats(tmp / "loose_crop")
        if identities:  # subject id <TAB> folder name
            (tmp / "identities.txt").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(identities, 1)))
        with atomic_write(tmp / "protocol.json", "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")

    _install(out_dir, build)
    return {**record, "reused": False}


def _inputs(**kw: object) -> dict:
    return json.loads(json.dumps(kw))  # as protocol.json holds them (lists, not tuples)


def make_face_folder_protocol(root: str | os.PathLike, out_dir: str | os.PathLike, *,
                              landmarks: str | os.PathLike | None = None, seed: int = 0,
                              params: SplitParams | None = None, link: bool = True, workers: int = 4,
                              overwrite: bool = False, **knobs: float) -> dict:
    """Write ``root/<identity>/<image>`` as an IJB-C-style folder ``out_dir`` (module docstring).

    Args:
        root: one folder of images per identity: aligned square faces (ArcFace-aligned, usually
            112x112), or any faces when ``landmarks`` is given.
        landmarks: ``identity/image x1 y1 ... x5 y5 [score]`` per line (``tools/im2rec.py --align``'s
            file, paths relative to ``root``); every image needs a line.
        seed: the split's seed (and the impostor draw's).
        params, knobs: the split knobs (:class:`SplitParams`), or some of them by keyword
            (``gallery_share=0.5``) over ``params`` or the defaults.
        link: hard-link the crops to the sources where possible (else copy).
        workers: image-reading threads. overwrite: replace a protocol of other inputs in ``out_dir``.

    Returns:
        protocol.json's record (``inputs``, ``counts``, ``skipped``, ``meta_sha1``, ...) and
        ``reused``: True when ``out_dir`` already held this protocol intact (nothing written).

    Raises:
        ProtocolError: no identity folders, an unreadable or non-square (without landmarks) image,
            an image without landmarks, fewer than 2 identities of 2+ images, bad knobs, or an
            ``out_dir`` holding something else; one line naming the path or value.
    """
    root, out_dir, params = Path(root), Path(out_dir), replace(params or SplitParams(), **knobs)
    if not isinstance(seed, int) or seed < 0:
        raise ProtocolError(f"seed: expected an integer >= 0, got {seed!r}")
    listed, empty = _list_folder(root)
    if out_dir.resolve().is_relative_to(root.resolve()):
        raise ProtocolError(f"{out_dir}: inside the face folder {root}; write the protocol elsewhere")
    marks, mark_sha1 = None, None
    if landmarks is not None:
        try:
            marks, mark_sha1 = read_landmarks(landmarks), file_sha1(landmarks)
        except ImageFolderError as e:
            raise ProtocolError(str(e)) from None
        except OSError as e:
            raise ProtocolError(f"{landmarks}: cannot read the landmark file ({e.strerror or e})") from None
    jobs = [(path, path.relative_to(root).as_posix()) for _, paths in listed for path in paths]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # cv2 decodes without the GIL
        faces = list(pool.map(lambda job: _read_face(*job, marks, str(landmarks)), jobs))
    files_sha1 = hashlib.sha1("".join(f"{f.key}\t{f.sha1}\n" for f in faces).encode()).hexdigest()
    inputs = _inputs(kind="faces", files_sha1=files_sha1, landmarks_sha1=mark_sha1, seed=seed,
                     params=asdict(params))
    found = _reusable(out_dir, inputs, overwrite)
    if found is not None:
        return found
    start = np.cumsum([0] + [len(paths) for _, paths in listed]).tolist()
    templates = _split([(name, range(start[i], start[i + 1])) for i, (name, _) in enumerate(listed)],
                       seed, params)
    pairs, possible = _pairs(templates, seed, params)
    counts = _face_counts(listed, empty, templates, pairs, possible)
    skipped = {"empty_folders": empty, "single_image_identities": [n for n, ps in listed if len(ps) == 1]}
    record = _record("faces", inputs, counts, {
        "source": str(root.resolve()), "num_files": len(faces), "skipped": skipped,
        "landmarks": None if landmarks is None else str(Path(landmarks).resolve())})
    return _build(out_dir, record, faces, templates, pairs, link, [name for name, _ in listed])


def _face_counts(listed: Sequence[tuple[str, list[Path]]], empty: Sequence[str],
                 templates: Sequence[_Template], pairs: np.ndarray, possible: int) -> dict[str, int]:
    groups = {t.subject: t.group for t in templates if t.group != "probe"}
    probes = [groups.get(t.subject, "neither") for t in templates if t.group == "probe"]
    used = sum(len(t.faces) for t in templates)
    genuine = int(pairs[:, 2].sum())
    return {"identities": len(listed), "enrolled_G1": sum(g == "G1" for g in groups.values()),
            "enrolled_G2": sum(g == "G2" for g in groups.values()),
            "not_enrolled": sum(len(p) >= 2 for _, p in listed) - len(groups),
            "single_image": sum(len(p) == 1 for _, p in listed), "empty_folders_skipped": len(empty),
            "templates": len(templates), "gallery_templates": len(groups), "probe_templates": len(probes),
            "mated_probes_G1": probes.count("G1"), "mated_probes_G2": probes.count("G2"),
            "non_mated_probes": probes.count("neither"), "faces": used,
            "unused_images": sum(len(p) for _, p in listed) - used, "genuine_pairs": genuine,
            "impostor_pairs": len(pairs) - genuine, "possible_impostor_pairs": possible}


def make_bin_protocol(bin_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                      overwrite: bool = False) -> dict:
    """Write a verification ``.bin`` (LFW, CFP, AgeDB) as an IJB-C-style folder without 1:N files.

    Each distinct image is one template of one face (aligned landmarks, score 1.0); the pair file is
    ``t1 t2 label`` of the .bin's pairs in order (``t1`` from image ``2i``, ``t2`` from ``2i + 1``).

    Returns:
        protocol.json's record, with ``reused`` as :func:`make_face_folder_protocol`'s.

    Raises:
        ProtocolError: an unreadable or unsafe .bin, an image that does not decode or is not
            square, a .bin without both genuine and impostor pairs, or an ``out_dir`` holding
            something else; one line naming the file.
    """
    bin_path, out_dir = Path(bin_path), Path(out_dir)
    try:
        images, issame = load_pairs_bin(bin_path)
    except PairsBinError as e:
        raise ProtocolError(str(e)) from None
    if not issame.any() or issame.all():
        raise ProtocolError(f"{bin_path}: {int(issame.sum())} genuine and {int((~issame).sum())} impostor "
                            f"pairs; a verification protocol needs both")
    inputs = _inputs(kind="bin", files_sha1=file_sha1(bin_path))
    found = _reusable(out_dir, inputs, overwrite)
    if found is not None:
        return found
    faces: list[_Face] = []
    template_of: dict[str, int] = {}  # image sha1 -> template id
    hashes = [hashlib.sha1(data).hexdigest() for data in images]
    for i, (data, sha1) in enumerate(zip(images, hashes)):
        if sha1 not in template_of:
            points = _aligned_points(data, f"{bin_path}: image {i}")
            ext = ".png" if data.startswith(b"\x89PNG") else ".jpg"
            faces.append(_Face(f"image {i}", sha1, ext, points, data=data))
            template_of[sha1] = len(faces)
    ids = np.array([template_of[sha1] for sha1 in hashes], np.int64).reshape(-1, 2)
    pairs = np.concatenate([ids, issame.astype(np.int64)[:, None]], axis=1)
    templates = [_Template(0, "", (i,)) for i in range(len(faces))]
    genuine = int(issame.sum())
    counts = {"images": len(images), "templates": len(faces), "faces": len(faces), "pairs": len(pairs),
              "genuine_pairs": genuine, "impostor_pairs": len(pairs) - genuine}
    record = _record("bin", inputs, counts, {"source": str(bin_path.resolve()), "1:N": NO_1N})
    return _build(out_dir, record, faces, templates, pairs, link=False)
