"""Class statistics of an old-feature bank (:class:`facecompat.features.bank.FeatureBank`).

All maths in float32 (the credible mask's in float64), over the bank's ``[N, 2, D]`` float16
features (``[:, 0]`` image, ``[:, 1]`` its flip) read in chunks of ``chunk_rows`` records:

- fused unit vector of a record: ``u = normalize(normalize(f_img) + normalize(f_flip))``;
- class mean: ``m_c = normalize(mean of u over the class's records)``;
- angle of a record: ``arccos(clip(u . m_c, -1, 1))`` (radians); per class its mean and its max;
- boundary centre and radius (AdvBCT, the reference's ``gen_class_meta``): with ``v =
  normalize(f_img)`` the unit feature of the un-flipped image, ``c_c = mean of v`` (NOT
  renormalised) and ``d = |v - c_c|``; the radius is the largest ``d`` of the class inside the
  Tukey fences ``[q1 - 1.5 IQR, q3 + 1.5 IQR]``, ``q1 = d_(floor(n/4))``, ``q3 = d_(floor(3n/4))``
  (0-based order statistics of the class's sorted distances, as the reference indexes them;
  classes of fewer than 4 records are not fenced: radius = their largest ``d``);
- credible mask (MixBCT, keep ratio ``T`` in (0, 1], the reference's ``denoise_credible.py``):
  ``v`` as above, each feature column divided by its L2 norm over the whole bank (``w = v / |v[:,
  j]|``, sklearn's ``normalize(axis=0)``); in each class the ``k = ceil(T * n_c)`` records with
  the smallest Euclidean distance ``|w - mean_c w|`` are True (ties: lower record id first), the
  others False. ``T * n_c`` is taken exactly, with ``T`` as the decimal it was written as
  (``0.07 * 100`` keeps 7, although it is 7.000000000000001 in float64).

Both reference tools read one view per image (MixBCT's extraction: the training loader's random
flip; AdvBCT's: none); the un-flipped image's feature is that view, deterministically.

``normalize(x) = x / max(|x|, 1e-12)`` (as ``torch.nn.functional.normalize``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import NamedTuple

import numpy as np

_EPS = 1e-12


class ClassStats(NamedTuple):
    """Per-class statistics of the old features (see the module docstring for definitions).

    Attributes:
        class_ids: int64 ``[C]`` ascending dataset classes present in the bank.
        means: float32 ``[C, D]`` L2-normalised class means of the fused unit vectors.
        count: int64 ``[C]`` records per class.
        angle_mean: float32 ``[C]`` mean angle (radians) of a class's records to its mean.
        angle_max: float32 ``[C]`` largest such angle.
        centres: float32 ``[C, D]`` AdvBCT boundary centres: plain means of the unit image features
            (not renormalised, so inside the unit ball).
        radius: float32 ``[C]`` AdvBCT boundary radius: the largest distance of a unit image feature
            to its centre inside the class's Tukey fences (:func:`fenced_max`).
    """

    class_ids: np.ndarray
    means: np.ndarray
    count: np.ndarray
    angle_mean: np.ndarray
    angle_max: np.ndarray
    centres: np.ndarray
    radius: np.ndarray


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(_EPS))


def fuse(features: np.ndarray) -> np.ndarray:
    """``[n, 2, D]`` (image, flip) features -> float32 ``[n, D]`` fused unit vectors ``u``."""
    f = _normalize(np.asarray(features, dtype=np.float32))
    return _normalize(f[:, 0] + f[:, 1])


def fenced_max(values: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group, the largest of its ``values`` inside the Tukey fences ``[q1 - 1.5 IQR, q3 + 1.5 IQR]``.

    ``q1`` and ``q3`` are the group's sorted values at 0-based positions ``floor(n/4)`` and
    ``floor(3n/4)`` (AdvBCT's ``gen_class_meta`` indexes them so; no numpy percentile method does
    for every ``n``). Groups of fewer than 4 values are not fenced.

    Args:
        values: ``[N]`` finite values; groups: int ``[N]`` group of each, in ``[0, num_groups)``.
    Returns:
        ``values.dtype`` ``[num_groups]``; 0 for an empty group.
    """
    groups = np.asarray(groups, dtype=np.int64)
    order = np.lexsort((values, groups))
    v, g = values[order], groups[order]
    count = np.bincount(groups, minlength=num_groups)
    start = np.r_[0, np.cumsum(count)[:-1]].astype(np.int64)
    has = count > 0
    q1, q3 = np.zeros(num_groups, v.dtype), np.zeros(num_groups, v.dtype)
    q1[has] = v[start[has] + count[has] // 4]
    q3[has] = v[start[has] + (3 * count[has]) // 4]
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    inside = (count[g] < 4) | ((v >= low[g]) & (v <= high[g]))
    out = np.zeros(num_groups, v.dtype)
    if has.any():  # q1 and q3 themselves are always inside: no group keeps nothing
        out[has] = np.maximum.reduceat(np.where(inside, v, -np.inf).astype(v.dtype), start[has])
    return out


def keep_counts(ratio: float, counts: np.ndarray) -> np.ndarray:
    """int64 ``ceil(ratio * n)`` for each ``n`` in ``counts``, with ``ratio`` read as the decimal it
    was written as (``0.9`` is 9/10), so float64 rounding never keeps one more (``0.07 * 100`` is
    7.000000000000001: 7 are kept, not 8)."""
    frac = Fraction(float(ratio)).limit_denominator(1_000_000)
    counts = np.asarray(counts, dtype=np.int64)
    return -(-(counts * frac.numerator) // frac.denominator)


def _segments(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, keys at starts): ``keys[order]`` sorted, split into runs of equal keys."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if keys.size else \
        np.zeros(0, np.int64)
    return order, starts, sorted_keys[starts]


def _chunks(features: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 ``[n, 2, D]`` features) of consecutive slices of the bank."""
    for start in range(0, len(features), chunk_rows):
        yield start, np.asarray(features[start:start + chunk_rows], dtype=np.float32)


def class_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ascending class ids ``[C]``, int64 ``[N]`` index of each record's class among them)."""
    labels = np.asarray(labels)
    class_ids = np.unique(labels)
    return class_ids, np.searchsorted(class_ids, labels)


def _class_sums(features: np.ndarray, chunk_rows: int, inv: np.ndarray, num_classes: int,
                rows_of: Callable[[np.ndarray], np.ndarray], width: int,
                dtype: type = np.float32) -> np.ndarray:
    """``[C, width]`` sums over each class of ``rows_of(chunk features)``, one pass over the bank."""
    sums = np.zeros((num_classes, width), dtype)
    for start, f in _chunks(features, chunk_rows):
        order, starts, keys = _segments(inv[start:start + len(f)])
        if keys.size:
            sums[keys] += np.add.reduceat(rows_of(f)[order], starts, axis=0)
    return sums


def compute_class_stats(features: np.ndarray, labels: np.ndarray, chunk_rows: int) -> ClassStats:
    """The :class:`ClassStats` of float16 ``[N, 2, D]`` bank features and their int64 ``[N]`` classes
    (two passes over the features, ``chunk_rows`` records at a time)."""
    class_ids, inv = class_index(labels)
    num_classes, n, dim = class_ids.size, len(features), int(features.shape[2])
    count = np.bincount(inv, minlength=num_classes).astype(np.int64)
    sums = _class_sums(features, chunk_rows, inv, num_classes,
                       lambda f: np.concatenate([fuse(f), _normalize(f[:, 0])], 1), 2 * dim)
    means = _normalize(sums[:, :dim])
    centres = (sums[:, dim:] / np.maximum(count, 1)[:, None]).astype(np.float32)
    angles, dists = np.empty(n, np.float32), np.empty(n, np.float32)
    for start, f in _chunks(features, chunk_rows):
        part = inv[start:start + len(f)]
        cos = np.einsum("nd,nd->n", fuse(f), means[part])
        angles[start:start + len(f)] = np.arccos(np.clip(cos, -1.0, 1.0))
        dists[start:start + len(f)] = np.linalg.norm(_normalize(f[:, 0]) - centres[part], axis=1)
    angle_sum = np.bincount(inv, weights=angles, minlength=num_classes)
    angle_max = np.zeros(num_classes, np.float32)
    np.maximum.at(angle_max, inv, angles)
    angle_mean = (angle_sum / np.maximum(count, 1)).astype(np.float32)
    radius = fenced_max(dists, inv, num_classes)
    return ClassStats(class_ids.astype(np.int64), means, count, angle_mean, angle_max, centres, radius)


def credible_distances(features: np.ndarray, labels: np.ndarray, chunk_rows: int) -> np.ndarray:
    """float64 ``[N]`` distance of each record to its class mean in MixBCT's denoising space:
    unit image features with every column divided by its L2 norm over the bank."""
    class_ids, inv = class_index(labels)
    dim = int(features.shape[2])
    square = np.zeros(dim, np.float64)
    for _, f in _chunks(features, chunk_rows):
        square += np.square(_normalize(f[:, 0]), dtype=np.float64).sum(axis=0)
    column = np.sqrt(square)
    column[column == 0] = 1.0  # as sklearn: an all-zero column stays zero

    def scaled(f: np.ndarray) -> np.ndarray:
        return _normalize(f[:, 0]).astype(np.float64) / column

    count = np.bincount(inv, minlength=class_ids.size)
    means = _class_sums(features, chunk_rows, inv, class_ids.size, scaled, dim, np.float64) \
        / np.maximum(count, 1)[:, None]
    dists = np.empty(len(features), np.float64)
    for start, f in _chunks(features, chunk_rows):
        dists[start:start + len(f)] = np.linalg.norm(scaled(f) - means[inv[start:start + len(f)]], axis=1)
    return dists


def credible_mask(features: np.ndarray, labels: np.ndarray, ratio: float, chunk_rows: int) -> np.ndarray:
    """bool ``[N]`` MixBCT credible mask for keep ratio ``ratio`` in (0, 1] (see the module docstring);
    rows must be in ascending record-id order (ties go to the lower row)."""
    _, inv = class_index(labels)
    n = len(features)
    dists = credible_distances(features, labels, chunk_rows)
    # by class, then distance, then row (= record id, rows are sorted by it)
    order = np.lexsort((np.arange(n), dists, inv))
    counts = np.bincount(inv)
    class_start = np.r_[0, np.cumsum(counts)[:-1]]
    rank_in_class = np.arange(n) - class_start[inv[order]]
    mask = np.zeros(n, bool)
    mask[order] = rank_in_class < keep_counts(ratio, counts)[inv[order]]
    return mask
