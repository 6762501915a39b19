"""Template pooling, insightface style (face feature x detector score, media mean, template sum,
L2): :func:`pool_templates` on arrays, :func:`pool` of one model's features into :class:`Pooled`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from facecompat.eval.ijb.records import IJBMeta, _template_rows


def _segment_sum(rows_of: np.ndarray, starts: np.ndarray, sizes: np.ndarray, values: np.ndarray,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sums of groups of rows: ``sum_k w * values[rows_of[starts[g] + k]]`` over k < sizes[g].

    Groups are processed largest first, so step k (the k-th member of every group that has one)
    touches a prefix of the output: one gather into a reused buffer and one in-place add per step,
    as many steps as the largest group. No sorted copy of ``values`` and no per-step allocation
    (fresh pages are what make large temporaries slow). float32 sums run in member order, like
    insightface's ``np.mean``/``np.sum`` over small groups.

    Returns:
        sums [G, D] float32 in largest-first order, and ``perm`` [G]: ``sums[i]`` is group
        ``perm[i]``.
    """
    import torch

    perm = np.argsort(-sizes, kind="stable")
    starts, sizes = starts[perm], sizes[perm]
    out = np.empty((starts.size, values.shape[1]), np.float32)
    buf = np.empty((int(np.count_nonzero(sizes > 1)), values.shape[1]), np.float32)
    # torch's row gather runs on every core (numpy's np.take on one); the adds are elementwise, so
    # the sums are the same float32 numbers in the same order either way
    with warnings.catch_warnings():  # a read-only memory-mapped cache file: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        values_t = torch.from_numpy(values)
    out_t, buf_t = torch.from_numpy(out), torch.from_numpy(buf)
    weights_t = torch.from_numpy(weights) if weights is not None else None
    rows = torch.from_numpy(rows_of[starts])
    torch.index_select(values_t, 0, rows, out=out_t)
    if weights_t is not None:
        out_t.mul_(weights_t[rows, None])
    for k in range(1, int(sizes.max(initial=1))):
        n = int(np.count_nonzero(sizes > k))  # sizes descend: groups with a k-th member are a prefix
        rows = torch.from_numpy(rows_of[starts[:n] + k])
        torch.index_select(values_t, 0, rows, out=buf_t[:n])
        if weights_t is not None:
            buf_t[:n].mul_(weights_t[rows, None])
        out_t[:n].add_(buf_t[:n])
    return out, perm


def pool_templates(features: np.ndarray, template_ids: np.ndarray, media_ids: np.ndarray,
                   weights: np.ndarray | None = None,
                   dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Template features, insightface style: weighted faces -> media mean -> template sum -> L2.

    Vectorised: faces are ordered by (template, media) once; media sums and template sums are
    segment sums over that order (:func:`_segment_sum`), with no Python loop over templates and
    no sorted copy of the features.

    Args:
        features: [N, D] face features (flip-fused, not normalised).
        template_ids, media_ids: [N] ints; faces with a negative template id are skipped.
        weights: [N] per-face weights (detector scores) or None.
        dtype: of the normalised templates. Weighting, media means and template sums are float32
            either way (as insightface computes them); float64 normalises as insightface does
            (its template array is float64), float32 saves memory.

    Returns:
        templates [T] sorted unique template ids (int64), feats [T, D] ``dtype``, L2-normalised
        (a zero template stays zero).
    """
    features = np.asarray(features)
    template_ids, media_ids = np.asarray(template_ids), np.asarray(media_ids)
    if features.ndim != 2 or features.shape[0] != template_ids.size or media_ids.size != template_ids.size:
        raise ValueError(f"features {features.shape}, template_ids {template_ids.shape} and media_ids "
                         f"{media_ids.shape} must describe the same faces")
    if weights is not None:
        if np.shape(weights) != template_ids.shape:
            raise ValueError(f"weights {np.shape(weights)} must be one per face ({template_ids.size})")
        weights = np.asarray(weights, np.float32)
    valid = np.flatnonzero(template_ids >= 0)
    order = valid[np.lexsort((media_ids[valid], template_ids[valid]))]
    tid_sorted, mid_sorted = template_ids[order], media_ids[order]
    new_template = np.r_[True, tid_sorted[1:] != tid_sorted[:-1]]
    new_media = new_template | np.r_[True, mid_sorted[1:] != mid_sorted[:-1]]
    media_start = np.flatnonzero(new_media)  # position in `order` where each media starts
    media_size = np.diff(np.r_[media_start, order.size])
    if features.dtype != np.float32:
        features = features.astype(np.float32)
    media_sum, media_perm = _segment_sum(order, media_start, media_size, features, weights)
    media_sum /= media_size[media_perm, None].astype(np.float32)  # media means
    media_row = np.empty_like(media_perm)
    media_row[media_perm] = np.arange(media_perm.size)  # media m (template order) is media_sum[media_row[m]]
    first_media = np.flatnonzero(new_template[media_start])  # media index where each template starts
    num_media = np.diff(np.r_[first_media, media_start.size])
    template_sum, template_perm = _segment_sum(media_row, first_media, num_media, media_sum)
    pooled = np.empty_like(template_sum)
    pooled[template_perm] = template_sum
    templates = tid_sorted[media_start[first_media]].astype(np.int64)
    pooled = pooled.astype(dtype, copy=False)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    np.divide(pooled, norms, out=pooled, where=norms > 0)
    return templates, pooled


@dataclass
class Pooled:
    """Template features of one model: ``templates`` [T] sorted ids, ``feats`` [T, D] float32
    L2-normalised (fast scoring, 1:N), ``exact`` the same in float64 as insightface holds them
    (pairs near each target FAR are re-scored from it, so TAR@FAR equals insightface's).

    Pool each model once (:func:`pool`) and score any query/gallery combination from the results.
    """

    templates: np.ndarray
    feats: np.ndarray
    exact: np.ndarray | None = None

    def rows(self, ids: np.ndarray, what: str) -> np.ndarray:
        """Row of every template id in ``ids``; :class:`IJBMetaError` naming ``what`` if one is absent."""
        return _template_rows(self.templates, ids, what)

    @functools.cached_property
    def max_norm(self) -> float:
        """Largest template norm (1.0 for pooled templates; computed once, used by every cell)."""
        feats = self.exact if self.exact is not None else self.feats
        return float(np.sqrt(np.einsum("ij,ij->i", feats, feats).max(initial=0.0)))


def pool(meta: IJBMeta, features: np.ndarray, score_weighting: bool = True) -> Pooled:
    """Pool one model's [N, D] face features (face order of ``meta``) into templates."""
    if features.ndim != 2 or features.shape[0] != meta.num_faces:
        raise ValueError(f"features have {features.shape[0]} rows (shape {features.shape}), the meta lists "
                         f"{meta.num_faces} faces")
    weights = meta.det_scores if score_weighting else None
    templates, exact = pool_templates(features, meta.template_ids, meta.media_ids, weights, np.float64)
    return Pooled(templates, exact.astype(np.float32), exact)


def _check_pair(query: Pooled, gallery: Pooled) -> None:
    if query.feats.shape[1] != gallery.feats.shape[1]:
        raise ValueError(f"query features are {query.feats.shape[1]}-d, gallery features "
                         f"{gallery.feats.shape[1]}-d: they cannot be compared")
    if not np.array_equal(query.templates, gallery.templates):
        raise ValueError("query and gallery were pooled from different face lists")
