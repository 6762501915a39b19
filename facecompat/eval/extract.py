"""Face features of an IJB-C / IJB-B folder: face list, aligned crops, batched (distributed) inference, cache.

    faces = read_face_list("data/IJBC", "IJBC")                  # meta/ijbc_name_5pts_score.txt
    model = load_model_for_eval("r50", "model.pt", device="cuda")
    feats = extract_features(model, "data/IJBC", faces)           # [N, 512] float32, face order

The feature of a face is ``f(img) + f(flip(img))`` (insightface's eval_ijbc.py convention), *not*
normalised and *not* weighted by the detector score: the evaluator applies the weighting, so the
features of one model serve every protocol. Rows follow the order of ``*_name_5pts_score.txt``.

Under torchrun every rank embeds a contiguous shard of the face list and the shards are gathered in
face order; one process runs the same code. The embedding engine does the work
(:func:`facecompat.features.embed_batches`: normalised on the device, no host sync per batch, the
features stay on the device until the shard is done), and the loader aligns faces in as many worker
processes as the machine gives (:func:`facecompat.features.default_num_workers`), so a GPU is not
left waiting.

:func:`extract_cached` stores the features beside a fingerprint (checkpoint hash, network, flip,
alignment, face list hash, count, dim) and re-extracts whenever the fingerprint differs, so a stale
cache is never used.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from facecompat import dist
from facecompat.data.align import align_face
from facecompat.errors import UserError
from facecompat.features.engine import default_num_workers, embed_batches, inference_loader
from facecompat.fileio import atomic_write, file_sha1
from facecompat.models import get_model, load_backbone_weights

log = logging.getLogger(__name__)

ALIGNMENT = "umeyama-arcface112"  # alignment tag stored in the cache fingerprint
TARGETS = {"IJBC": "ijbc", "IJBB": "ijbb"}
_NUM_COLUMNS = 12  # image, 5 x (x, y), detector score


class ExtractError(UserError, ValueError):
    """Face list, image or feature cache that cannot be used (the message names the file)."""


@dataclass
class FaceList:
    """The faces of ``meta/<target>_name_5pts_score.txt`` in file order.

    Attributes:
        names: [N] image names under ``loose_crop/``.
        landmarks: [N, 5, 2] float64 (x, y) of eyes, nose tip, mouth corners in image pixels.
        scores: [N] float32 detector scores.
        rows: [N] int64 0-based index of each face among the file's faces (``arange(N)`` unless
            faces were skipped).
        missing_rows: [M] int64 file face indices skipped because their image was missing
            (only with ``allow_missing=True``).
        source: the list file.
    """

    names: list[str]
    landmarks: np.ndarray
    scores: np.ndarray
    rows: np.ndarray
    missing_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_missing(self) -> int:
        return int(self.missing_rows.size)


def face_list_path(root: str | os.PathLike, target: str = "IJBC") -> Path:
    """``<root>/meta/<ijbc|ijbb>_name_5pts_score.txt`` (root is the ``IJBC/`` or ``IJBB/`` folder)."""
    if target.upper() not in TARGETS:
        raise ExtractError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    return Path(root) / "meta" / f"{TARGETS[target.upper()]}_name_5pts_score.txt"


def _parse_rows(path: Path) -> tuple[list[str], np.ndarray]:
    """Names and [N, 11] float64 numbers of a name/landmark/score file; errors name file and line."""
    try:  # numpy's C parser: ~10x faster than splitting 469k lines in Python
        table = np.loadtxt(path, converters={0: lambda _: 0.0}, comments=None, ndmin=2, encoding="utf-8")
    except ValueError as err:
        table, problem = None, str(err)
    if table is not None and table.shape[1] == _NUM_COLUMNS and np.all(np.isfinite(table)):
        with open(path, encoding="utf-8") as f:
            names = [line.split(None, 1)[0] for line in f if line.strip()]
        if len(names) == len(table):
            return names, table[:, 1:]
    if table is not None:
        problem = f"shape {table.shape}"
    _raise_first_bad_line(path)
    raise ExtractError(f"{path}: cannot parse the face list ({problem})")


def _raise_first_bad_line(path: Path) -> None:
    """Raise :class:`ExtractError` naming the first line without 12 columns or with a bad number."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue  # blank lines (a trailing newline) carry no face
            if len(parts) != _NUM_COLUMNS:
                raise ExtractError(f"{path}:{line_no}: expected {_NUM_COLUMNS} columns (image, 10 landmark "
                                   f"coordinates, score), got {len(parts)}")
            try:
                values = [float(v) for v in parts[1:]]
            except ValueError:
                values = [float("nan")]
            if not np.all(np.isfinite(values)):
                raise ExtractError(f"{path}:{line_no}: non-numeric or non-finite value in "
                                   f"{' '.join(parts[1:])!r}")


def read_face_list(root: str | os.PathLike, target: str = "IJBC", *, allow_missing: bool = False) -> FaceList:
    """Read the faces of an IJB folder, in file order.

    Args:
        root: the ``IJBC/`` (or ``IJBB/``) folder holding ``meta/`` and ``loose_crop/``.
        target: ``"IJBC"`` or ``"IJBB"``.
        allow_missing: skip faces whose image is not in ``loose_crop/`` (recorded in
            ``missing_rows``) instead of raising.

    Raises:
        ExtractError: file absent, a line without 12 columns, a non-numeric value, or (unless
            ``allow_missing``) an image missing from ``loose_crop/``; one line naming file and line.
    """
    path = face_list_path(root, target)
    if not path.is_file():
        raise ExtractError(f"{path}: face list not found")
    names, values = _parse_rows(path)
    crop_dir = Path(root) / "loose_crop"
    # One directory listing instead of N stat calls (469k faces on IJB-C); names may hold sub-folders.
    present = set(os.listdir(crop_dir)) if crop_dir.is_dir() else set()
    missing = [i for i, n in enumerate(names) if n not in present and not (crop_dir / n).is_file()]
    if missing and not allow_missing:
        raise ExtractError(f"{path}:{_line_of(path, missing[0])}: image {names[missing[0]]!r} not found in "
                           f"{crop_dir} ({len(missing)} missing; --allow-missing skips them)")
    kept = np.ones(len(names), dtype=bool)
    kept[missing] = False
    keep = np.flatnonzero(kept)
    if missing:
        log.warning("%s: skipping %d faces whose image is missing from %s", path, len(missing), crop_dir)
        names = [names[i] for i in keep]
    return FaceList(names=names, landmarks=values[keep, :10].reshape(-1, 5, 2),
                    scores=values[keep, 10].astype(np.float32), rows=keep.astype(np.int64),
                    missing_rows=np.asarray(missing, np.int64), source=path)


def _line_of(path: Path, face_index: int) -> int:
    """1-based line number of the ``face_index``-th non-blank line (for error messages only)."""
    with open(path, encoding="utf-8") as f:
        seen = -1
        for line_no, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == face_index:
                return line_no
    return -1


class AlignedFaces(Dataset):
    """Aligned 112x112 RGB crops of a face list.

    ``dataset[i]`` is ``(image, i)``: image [3, 112, 112] uint8 (RGB, CHW), aligned by
    :func:`facecompat.data.align.align_face` from ``loose_crop/<name>`` and the face's landmarks.
    """

    def __init__(self, root: str | os.PathLike, faces: FaceList, size: int = 112):
        self.crop_dir = Path(root) / "loose_crop"
        self.faces = faces
        self.size = size

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.crop_dir / self.faces.names[index]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise ExtractError(f"{path}: image missing or unreadable (face {index})")
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        aligned = align_face(rgb, self.faces.landmarks[index], size=self.size)
        return torch.from_numpy(np.ascontiguousarray(aligned.transpose(2, 0, 1))), index


def _shard(n: int, rank: int, world: int) -> tuple[int, int, int]:
    """Contiguous shard ``[start, stop)`` of ``n`` items for ``rank`` and the padded shard size."""
    per_rank = -(-n // world)
    start = min(n, rank * per_rank)
    return start, min(n, start + per_rank), per_rank


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _embed_shard(model: nn.Module, loader: DataLoader, num: int, device: torch.device, flip: bool,
                 autocast_dtype: torch.dtype | None, progress: bool) -> torch.Tensor:
    """[num, D] float32 features of the loader's faces on ``device`` (D = 0 when the shard is empty)."""
    bar = tqdm(loader, total=len(loader), desc="extract", unit="batch",
               disable=not progress or dist.get_rank() != 0)
    feats = embed_batches(model, (images for images, _ in bar), device=device, flip=flip,
                          autocast_dtype=autocast_dtype, num_rows=num)
    assert feats.shape[0] == num, (feats.shape, num)
    return feats


def extract_features(model: nn.Module, root: str | os.PathLike, faces: FaceList, *, batch_size: int = 256,
                     num_workers: int | None = None, device: str | torch.device | None = None,
                     flip: bool = True, autocast_dtype: torch.dtype | None = None,
                     progress: bool = True) -> np.ndarray:
    """Embed every face of ``faces`` (aligned from ``root/loose_crop``) with ``model``.

    Args:
        model: backbone, ``[B, 3, 112, 112]`` float in [-1, 1] -> ``[B, D]``; already on ``device``.
            Runs in eval mode under ``torch.inference_mode``; its train/eval mode is restored after.
        root: the IJB folder holding ``loose_crop/``.
        faces: from :func:`read_face_list`.
        batch_size: faces per forward (twice that with ``flip``).
        num_workers: DataLoader processes aligning faces; ``None``:
            :func:`~facecompat.features.default_num_workers` (the machine's cores, at most 8 per
            rank); 0 aligns in this process. Batches are pinned when ``device`` is CUDA. The features
            do not depend on it.
        device: where images go (default: the device of the model's parameters).
        flip: feature = f(img) + f(flip(img)); otherwise f(img). Never normalised.
        autocast_dtype: e.g. ``torch.bfloat16`` to run under autocast; features are float32 anyway.
        progress: tqdm bar (rank 0 only).

    Returns:
        [N, D] float32 features in face order. Under torchrun each rank embeds a contiguous shard and
        every rank returns the gathered [N, D] array.

    Raises:
        ValueError: ``num_workers`` < 0.
        ExtractError: an image missing or unreadable (names the file).
    """
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 aligns faces in this process), got {num_workers}")
    workers = default_num_workers() if num_workers is None else num_workers
    device = torch.device(device) if device is not None else _model_device(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop, per_rank = _shard(len(faces), rank, world)
    loader = inference_loader(Subset(AlignedFaces(root, faces), range(start, stop)), device, workers,
                              batch_size=batch_size)
    error: Exception | None = None
    try:
        local = _embed_shard(model, loader, stop - start, device, flip, autocast_dtype, progress)
    except Exception as err:
        if world == 1:
            raise
        error = err
    if world == 1:
        return local.cpu().numpy()  # the one wait for the device, after the last batch
    # Agree on failure first: a rank that raised alone would leave the others waiting in the gather.
    if dist.all_reduce_flag(error is not None):
        if error is not None:
            raise error
        raise ExtractError(f"feature extraction failed on another rank (this is rank {rank})")
    return _gather_in_order(local, len(faces), per_rank)


def _gather_in_order(local: torch.Tensor, num: int, per_rank: int) -> np.ndarray:
    """Every rank's [n_r, D] shard, padded to ``per_rank`` rows, gathered -> [num, D] in face order."""
    dim = dist.all_reduce_max(local.shape[1])  # a rank with an empty shard does not know D
    # NCCL gathers GPU tensors only (the shard stays on its GPU); gloo gathers CPU tensors.
    padded = torch.zeros((per_rank, dim), dtype=torch.float32, device=dist._comm_device(None))
    if local.numel():
        padded[:local.shape[0]] = local
    gathered = dist.all_gather_tensor(padded).cpu()
    # Shards are contiguous and only trailing ranks are short, so the first ``num`` rows are the faces.
    return gathered[:num].numpy()


# --- cache ---------------------------------------------------------------------------------------


def cache_paths(cache_dir: str | os.PathLike, model_name: str, target: str) -> tuple[Path, Path]:
    """``(<cache_dir>/features/<model_name>/<target>.npy, ... .json)``."""
    base = Path(cache_dir) / "features" / model_name / target.upper()
    return base.with_suffix(".npy"), base.with_suffix(".json")


def _cache_problem(npy: Path, meta: Path, expected: Mapping[str, Any] | None) -> str | None:
    """Why the cache cannot be used (None when it can)."""
    if not npy.is_file() or not meta.is_file():
        return f"no cache at {npy}"
    try:
        stored = json.loads(meta.read_text())
        shape = np.load(npy, mmap_mode="r").shape
    except (OSError, ValueError) as err:
        return f"unreadable cache {npy}: {err}"
    if len(shape) != 2 or [stored.get("num_faces"), stored.get("dim")] != list(shape):
        said = f"{stored.get('num_faces')}x{stored.get('dim')}"
        return f"{npy} holds shape {tuple(shape)}, {meta.name} says {said}"
    for key, value in (expected or {}).items():
        if stored.get(key) != value:
            return f"fingerprint {key!r} changed: cached {stored.get(key)!r}, now {value!r}"
    return None


def load_cached(cache_dir: str | os.PathLike, model_name: str, target: str,
                expected_fingerprint: Mapping[str, Any] | None = None) -> np.ndarray:
    """[N, D] float32 cached features; raises :class:`ExtractError` if absent, inconsistent, or when a
    key of ``expected_fingerprint`` differs from the stored fingerprint."""
    npy, meta = cache_paths(cache_dir, model_name, target)
    problem = _cache_problem(npy, meta, expected_fingerprint)
    if problem is not None:
        raise ExtractError(problem)
    return np.load(npy)


def save_cached(features: np.ndarray, fingerprint: Mapping[str, Any], cache_dir: str | os.PathLike,
                model_name: str, target: str) -> Path:
    """Write features and ``fingerprint`` (+ ``num_faces``, ``dim``) atomically; returns the .npy path."""
    npy, meta = cache_paths(cache_dir, model_name, target)
    features = np.ascontiguousarray(features, dtype=np.float32)
    meta_obj = {**fingerprint, "num_faces": int(features.shape[0]), "dim": int(features.shape[1])}
    # The .json goes last: an interrupted write leaves a shape mismatch or no .json, never a false match.
    with atomic_write(npy, "wb") as f:
        np.save(f, features)
    with atomic_write(meta, "w") as f:
        json.dump(meta_obj, f, indent=1, sort_keys=True)
    return npy


def build_fingerprint(fingerprint: Mapping[str, Any], faces: FaceList, flip: bool) -> dict[str, Any]:
    """The caller's keys (``checkpoint_sha1``, ``network``) plus flip, alignment, face list hash, count."""
    if faces.source is None:
        raise ExtractError("face list has no source file to fingerprint")
    return {**fingerprint, "flip": bool(flip), "alignment": ALIGNMENT,
            "face_list_sha1": file_sha1(faces.source), "num_faces": len(faces)}


def extract_cached(model: nn.Module, model_name: str, fingerprint: Mapping[str, Any], root: str | os.PathLike,
                   target: str, cache_dir: str | os.PathLike, *, faces: FaceList | None = None,
                   flip: bool = True, mmap: bool = False, **extract_kw: Any) -> np.ndarray:
    """Features from ``<cache_dir>/features/<model_name>/<target>.npy`` when its fingerprint matches,
    otherwise extracted with :func:`extract_features` and (rank 0) written there atomically.

    Args:
        fingerprint: at least ``{"checkpoint_sha1": file_sha1(ckpt), "network": "r50"}``; flip,
            alignment, face list hash and face count are added here.
        faces: the face list (default: :func:`read_face_list` of ``root``/``target``).
        mmap: return a cache hit memory-mapped read-only (no copy of a 1 GB file into RAM).
        extract_kw: passed to :func:`extract_features`.

    Under torchrun rank 0 decides, every rank extracts or reads; ``cache_dir`` must be shared.
    Returns [N, D] float32 on every rank.
    """
    faces = faces if faces is not None else read_face_list(root, target)
    expected = build_fingerprint(fingerprint, faces, flip)
    npy, meta = cache_paths(cache_dir, model_name, target)
    problem = _cache_problem(npy, meta, expected) if dist.get_rank() == 0 else None
    problem = dist.broadcast_object(problem)
    if problem is None:
        log.info("reusing cached features %s", npy)
        return np.load(npy, mmap_mode="r" if mmap else None)
    if npy.exists() or meta.exists():
        log.warning("re-extracting %s features for %s: %s", model_name, target, problem)
    features = extract_features(model, root, faces, flip=flip, **extract_kw)
    if dist.get_rank() == 0:
        save_cached(features, expected, cache_dir, model_name, target)
    dist.barrier()
    return features


def load_model_for_eval(network: str, checkpoint: str | os.PathLike, embedding_size: int = 512,
                        device: str | torch.device | None = None) -> nn.Module:
    """``get_model(network)`` with ``checkpoint``'s backbone weights (strict), on ``device``, in eval mode.

    Raises:
        WeightsError: the checkpoint cannot be read or does not fit the network.
    """
    model = get_model(network, embedding_size=embedding_size)
    load_backbone_weights(model, checkpoint)
    return model.to(device if device is not None else "cpu").eval()

