"""LFW / CFP-FP / AgeDB-style pair verification, as insightface reports it.

A verification set is ``2N`` aligned faces and ``N`` same/different flags (images ``2i`` and
``2i + 1`` form pair ``i``), read from a ``.bin`` by :mod:`facecompat.data.pairs_bin`. The
number is insightface's: embeddings ``f(img) + f(flip(img))`` L2-normalised, squared L2
distance per pair, 10-fold cross-validation (folds in order, no shuffle) where each fold
takes the threshold in ``np.arange(0, 4, 0.01)`` that is best on the other nine folds and
reports its accuracy on itself; the headline is the mean over folds.

The same protocol scores a cross-model test: the first image of every pair is embedded by
model A, the second by model B (:func:`verify_cross`), so old and new models can be compared
on one scale.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facecompat.data.pairs_bin import PairsBinError, load_pairs_bin
from facecompat.features import embed_batches

__all__ = [
    "VerificationCallback",
    "VerificationSet",
    "evaluate_pairs",
    "extract_embeddings",
    "load_verification_set",
    "verify",
    "verify_cross",
]

logger = logging.getLogger(__name__)

# insightface's candidate thresholds on the squared L2 distance of unit vectors (range [0, 4]).
THRESHOLDS = np.arange(0, 4, 0.01)


@dataclass
class VerificationSet:
    """A decoded verification set.

    Attributes:
        name: short name, the file stem (``lfw``, ``cfp_fp``, ``agedb_30``).
        images: ``[2N, 3, H, W]`` uint8 RGB, CPU; images ``2i`` and ``2i + 1`` form pair ``i``.
            Kept as uint8 (4x smaller than float) and normalised batch by batch on the device.
        issame: ``[N]`` bool, whether pair ``i`` shows one identity.
    """

    name: str
    images: torch.Tensor
    issame: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be uint8 [2N, 3, H, W], got {self.images.dtype} "
                             f"{list(self.images.shape)}")
        self.issame = np.asarray(self.issame, dtype=bool).reshape(-1)
        if self.images.shape[0] != 2 * len(self.issame):
            raise ValueError(f"{self.name}: {self.images.shape[0]} images for {len(self.issame)} pairs; "
                             f"expected {2 * len(self.issame)}")

    @property
    def num_pairs(self) -> int:
        """Number of pairs ``N``."""
        return len(self.issame)


def load_verification_set(path: str | os.PathLike, image_size: int = 112) -> VerificationSet:
    """Read and decode a verification ``.bin`` (safely: nothing in it is executed).

    Images whose width is not ``image_size`` are resized as insightface's ``load_bin`` does
    (``resize_short`` with area interpolation, which for the square crops these files hold is
    a resize to ``image_size x image_size``); a non-square image is refused.

    Args:
        path: the ``.bin`` file; its stem becomes the set's name.
        image_size: side of the square images the network takes.

    Returns:
        The set, images ``[2N, 3, image_size, image_size]`` uint8 RGB.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: (:class:`~facecompat.data.pairs_bin.PairsBinError`) an unreadable or
            malformed file, an odd image count, an issame length that does not match, no pairs,
            or an image that does not decode; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: verification set not found")
    encoded, issame = load_pairs_bin(path)
    if len(issame) == 0:
        raise PairsBinError(f"{path}: holds no pairs")
    images = torch.empty((len(encoded), 3, image_size, image_size), dtype=torch.uint8)
    out = images.numpy()  # shares memory: decode straight into the final CHW layout
    for i, data in enumerate(encoded):
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise PairsBinError(f"{path}: image {i} ({len(data)} bytes) does not decode")
        height, width = bgr.shape[:2]
        if (height, width) != (image_size, image_size):
            if height != width:
                raise PairsBinError(f"{path}: image {i} is {width}x{height}; verification images must be "
                                    f"square aligned crops")
            bgr = cv2.resize(bgr, (image_size, image_size), interpolation=cv2.INTER_AREA)
        out[i] = bgr[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW
    return VerificationSet(name=path.stem, images=images, issame=issame)


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


@torch.inference_mode()
def extract_embeddings(model: nn.Module, images_uint8: torch.Tensor | np.ndarray, batch_size: int = 256,
                       device: str | torch.device = "cpu", flip: bool = True,
                       autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Embed uint8 images the way insightface's verification test does.

    Each batch goes to ``device`` as uint8 (through pinned memory for CUDA) and is normalised there
    as the model was trained (:func:`~facecompat.data.normalize.normalize_images`). With ``flip``
    the feature is ``f(x) + f(flip(x))`` (each cast to float32, summed unnormalised, flip along the
    width); each batch's features are L2-normalised. They stay on the device until the last batch
    (:func:`~facecompat.features.embed_batches`): one wait for the device per call, not one per
    batch. The model runs in eval mode; every submodule's train/eval flag is restored afterwards.
    The model is not moved: it must already be on ``device``. Pass the plain module, not a DDP
    wrapper (whose forward may call collectives).

    Args:
        model: ``forward(x [B, 3, H, W] float) -> [B, D]``.
        images_uint8: ``[M, 3, H, W]`` uint8 RGB (CPU tensor or array).
        batch_size: images per forward pass.
        device: where the model runs.
        flip: add the embedding of the horizontally flipped image.
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (e.g.
            ``torch.float16``); ``None`` runs in the model's own precision.

    Returns:
        ``[M, D]`` float32, unit rows.
    """
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [M, 3, H, W], got {images.dtype} {list(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.shape[0] == 0:
        raise ValueError("no images to embed")
    device = torch.device(device)
    modes = _module_modes(model)
    try:
        emb = embed_batches(_Float32Output(model), _host_batches(images, batch_size, device), device=device,
                            flip=flip, autocast_dtype=autocast_dtype, num_rows=images.shape[0])
        for start in range(0, emb.shape[0], batch_size):  # batch by batch, as the rows were made
            emb[start:start + batch_size] = F.normalize(emb[start:start + batch_size], dim=1)
    finally:
        for module, training in modes:
            module.training = training
    return emb.cpu().numpy()  # the one wait for the device


class _Float32Output(nn.Module):
    """``model(x)`` cast to float32, so that under autocast the flip sum is taken in float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()


def _host_batches(images: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``images`` in batches; pinned for CUDA (a copy from pageable memory waits for the GPU's queue)."""
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        yield batch.pin_memory() if device.type == "cuda" else batch


def _fold_bounds(num_pairs: int, nfolds: int) -> list[tuple[int, int]]:
    """Contiguous folds as sklearn's ``KFold(nfolds, shuffle=False)``: the first
    ``num_pairs % nfolds`` folds hold one pair more."""
    sizes = np.full(nfolds, num_pairs // nfolds)
    sizes[: num_pairs % nfolds] += 1
    ends = np.cumsum(sizes)
    return [(int(end - size), int(end)) for end, size in zip(ends, sizes)]


def _correct_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Correct decisions at every threshold (``same`` predicted iff ``dist < t``).

    Returns:
        ``[T]`` int: genuine pairs with ``dist < t`` plus impostor pairs with ``dist >= t``.
    """
    genuine = np.sort(dist[issame])
    impostor = np.sort(dist[~issame])
    true_accepts = np.searchsorted(genuine, thresholds, side="left")
    true_rejects = len(impostor) - np.searchsorted(impostor, thresholds, side="left")
    return true_accepts + true_rejects


def _auc(dist: np.ndarray, issame: np.ndarray) -> float | None:
    """ROC AUC of ``-dist`` as the genuine score: P(genuine closer than impostor), ties count half."""
    genuine, impostor = dist[issame], np.sort(dist[~issame])
    if len(genuine) == 0 or len(impostor) == 0:
        return None
    below = np.searchsorted(impostor, genuine, side="left")
    upto = np.searchsorted(impostor, genuine, side="right")
    wins = (len(impostor) - upto).sum() + 0.5 * (upto - below).sum()
    return float(wins / (len(genuine) * len(impostor)))


def evaluate_pairs(emb_a: np.ndarray, emb_b: np.ndarray, issame: np.ndarray | Sequence[bool],
                   nfolds: int = 10) -> dict:
    """insightface's k-fold verification accuracy for pairs ``(emb_a[i], emb_b[i])``.

    The pairs are split into ``nfolds`` contiguous folds (no shuffle). For each fold, the
    threshold in ``np.arange(0, 4, 0.01)`` on the squared L2 distance that maximises accuracy
    on the other folds (first one on ties) is applied to the fold; ``same`` is predicted iff
    ``distance < threshold``. With ``nfolds == 1`` the threshold is chosen and tested on all
    pairs (insightface's ``LFold``). Embeddings are expected L2-normalised (the thresholds span
    the distances of unit vectors); ``emb_a`` and ``emb_b`` may come from different models.

    Args:
        emb_a: ``[N, D]`` first embedding of every pair.
        emb_b: ``[N, D]`` second embedding of every pair.
        issame: ``[N]`` bool.
        nfolds: number of folds, ``1 <= nfolds <= N``.

    Returns:
        ``{"accuracy": mean test accuracy over folds, "accuracy_std": its std (numpy's, ddof 0),
        "threshold": mean chosen threshold, "auc": ROC AUC over all pairs (absent when only
        one class is present), "num_pairs": N}``; accuracies are fractions in [0, 1].
    """
    emb_a, emb_b = np.asarray(emb_a), np.asarray(emb_b)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if emb_a.ndim != 2 or emb_a.shape != emb_b.shape:
        raise ValueError(f"emb_a and emb_b must be [N, D] of one shape, got {emb_a.shape} and {emb_b.shape}")
    num_pairs = len(issame)
    if emb_a.shape[0] != num_pairs:
        raise ValueError(f"{emb_a.shape[0]} embedding pairs for {num_pairs} issame flags")
    if not 1 <= nfolds <= num_pairs:
        raise ValueError(f"nfolds must be in [1, {num_pairs}] (the number of pairs), got {nfolds}")
    dist = np.sum(np.square(emb_a - emb_b), axis=1)

    accuracies, thresholds = np.zeros(nfolds), np.zeros(nfolds)
    for fold, (start, end) in enumerate(_fold_bounds(num_pairs, nfolds)):
        test = np.zeros(num_pairs, dtype=bool)
        test[start:end] = True
        train = ~test if nfolds > 1 else test
        best = int(np.argmax(_correct_counts(dist[train], issame[train], THRESHOLDS)))
        thresholds[fold] = THRESHOLDS[best]
        correct = _correct_counts(dist[test], issame[test], THRESHOLDS[best:best + 1])[0]
        accuracies[fold] = correct / test.sum()

    result = {"accuracy": float(accuracies.mean()), "accuracy_std": float(accuracies.std()),
              "threshold": float(thresholds.mean()), "num_pairs": num_pairs}
    auc = _auc(dist, issame)
    if auc is not None:
        result["auc"] = auc
    return result


def verify(model: nn.Module, vset: VerificationSet, batch_size: int = 256, device: str | torch.device = "cpu",
           flip: bool = True, autocast_dtype: torch.dtype | None = None, nfolds: int = 10) -> dict:
    """Self test: one model embeds all ``2N`` images; pair ``i`` is ``(2i, 2i + 1)``.

    Args:
        model: on ``device``; ``forward(x [B, 3, H, W]) -> [B, D]``.
        vset: the set.
        batch_size, device, flip, autocast_dtype: as :func:`extract_embeddings`.
        nfolds: as :func:`evaluate_pairs`.

    Returns:
        :func:`evaluate_pairs`'s dict.
    """
    emb = extract_embeddings(model, vset.images, batch_size, device, flip, autocast_dtype)
    return evaluate_pairs(emb[0::2], emb[1::2], vset.issame, nfolds)


def verify_cross(model_a: nn.Module, model_b: nn.Module, vset: VerificationSet, batch_size: int = 256,
                 device: str | torch.device = "cpu", flip: bool = True,
                 autocast_dtype: torch.dtype | None = None, nfolds: int = 10) -> dict:
    """Cross-model test: ``model_a`` embeds images ``2i``, ``model_b`` images ``2i + 1``.

    Both models must map into one embedding space (a backward-compatible pair) and be on
    ``device``; each embeds only its half of the images.

    Args:
        model_a: embeds the first image of every pair (the query side).
        model_b: embeds the second image of every pair (the gallery side).
        vset, batch_size, device, flip, autocast_dtype, nfolds: as :func:`verify`.

    Returns:
        :func:`evaluate_pairs`'s dict.
    """
    emb_a = extract_embeddings(model_a, vset.images[0::2], batch_size, device, flip, autocast_dtype)
    emb_b = extract_embeddings(model_b, vset.images[1::2], batch_size, device, flip, autocast_dtype)
    return evaluate_pairs(emb_a, emb_b, vset.issame, nfolds)


class VerificationCallback:
    """Periodic verification during training, keeping the best accuracy per set.

    The sets are read on the first call (decoded once, kept as uint8 on the CPU); missing
    files are reported when the callback is built. No distributed logic: the trainer calls
    it on one rank and makes the others wait.

    Args:
        paths: ``.bin`` files; each set is named by its file stem (which must be unique).
        batch_size: images per forward pass.
        flip: flip test-time augmentation.
        image_size: side of the images the network takes.
        nfolds: folds of the accuracy protocol.

    Attributes:
        best: ``{name: best accuracy so far}``.
        last: ``{name: full result dict of the last call}`` (see :func:`evaluate_pairs`).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], batch_size: int = 256, flip: bool = True,
                 image_size: int = 112, nfolds: int = 10):
        self.paths = [Path(p) for p in paths]
        names = [p.stem for p in self.paths]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"verification sets must have distinct file stems; repeated: {duplicates}")
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: verification set not found")
        self.batch_size, self.flip, self.image_size, self.nfolds = batch_size, flip, image_size, nfolds
        self.sets: list[VerificationSet] | None = None
        self.best: dict[str, float] = {}
        self.last: dict[str, dict] = {}

    def load(self) -> list[VerificationSet]:
        """Read and decode the sets (once)."""
        if self.sets is None:
            self.sets = [load_verification_set(p, self.image_size) for p in self.paths]
        return self.sets

    def __call__(self, model: nn.Module, step: int, device: str | torch.device = "cpu",
                 autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
        """Evaluate ``model`` (already on ``device``; its train/eval modes are restored) on every set.

        Args:
            model: the plain backbone (not DDP-wrapped).
            step: training step, for the log line.
            device: where the model runs.
            autocast_dtype: as :func:`extract_embeddings`.

        Returns:
            ``{name: accuracy}`` of this call, fractions in [0, 1].
        """
        accuracies: dict[str, float] = {}
        for vset in self.load():
            result = verify(model, vset, self.batch_size, device, self.flip, autocast_dtype, self.nfolds)
            accuracy = result["accuracy"]
            self.best[vset.name] = max(accuracy, self.best.get(vset.name, accuracy))
            self.last[vset.name] = result
            accuracies[vset.name] = accuracy
            logger.info("[%s][%d] accuracy %.5f +- %.5f, best %.5f", vset.name, step, accuracy,
                        result["accuracy_std"], self.best[vset.name])
        return accuracies
