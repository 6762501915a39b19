"""IJB 1:1 verification: pair scores of pooled templates (:func:`score_pairs`), TAR@FAR as
insightface's float64 arithmetic gives it (:func:`tar_from_scores`), :func:`verify_1to1`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from facecompat.eval import metrics
from facecompat.eval.ijb.pooling import Pooled, _check_pair, pool
from facecompat.eval.ijb.records import IJBMeta


def score_pairs(feats1: np.ndarray, feats2: np.ndarray, index1: np.ndarray,
                index2: np.ndarray, block: int = 2048, min_density: float = 1 / 64) -> np.ndarray:
    """Scores ``feats1[index1[k]] . feats2[index2[k]]`` of many template pairs.

    IJB-C's pairs cover ~3% of the template x template matrix, so dense block products waste ~30x
    the work; instead every pair is one sampled dot product (``torch.sparse.sampled_addmm``: a CSR
    pattern of the pairs times ``query @ gallery_band.T``, computed only at the pattern). Pairs are
    split into column bands of ``block`` gallery templates so the band (4 MB at 512-d) stays in
    cache while all query rows stream past it once.

    The CSR order (band, row) comes from one ``np.sort`` of an int64 key ``(band * T + row) << 32
    | pair`` -- numpy's vectorised (AVX-512) sort is several times faster than any argsort, and the
    row, band and pair index all come back from the sorted key by shifts and masks; only the column
    needs a gather, and the values one scatter back to pair order (torch's ``index_copy_``, ~1.5x
    numpy's). A band denser than itself (repeated pairs) is one GEMM. Inputs with fewer than
    ``min_density * block**2`` pairs (or more pairs than the key can hold) use row gathers.
    Pass the same array twice for a self test (no copy is made).

    Args:
        feats1: [T, D] templates of each pair's first member (L2-normalised -> cosine).
        feats2: [T, D] templates of each pair's second member, same template order.
        index1, index2: [M] template row indices.
        block: gallery templates per column band.
        min_density: below ``min_density * block**2`` pairs, score by row gathers.

    Returns:
        [M] scores in pair order: float64 when either input is float64, float32 otherwise.
    """
    self_test = feats1 is feats2
    dtype = np.float64 if np.float64 in (np.asarray(feats1).dtype, np.asarray(feats2).dtype) \
        else np.float32
    feats1 = np.ascontiguousarray(feats1, dtype)
    feats2 = feats1 if self_test else np.ascontiguousarray(feats2, dtype)
    if feats1.shape != feats2.shape:
        raise ValueError(f"first {feats1.shape} and second {feats2.shape} feats differ")
    # int32 indices: at IJB-C size every [M] int64 temporary is 125 MB
    index1, index2 = np.asarray(index1, np.int32).ravel(), np.asarray(index2, np.int32).ravel()
    if index1.shape != index2.shape:
        raise ValueError(f"index1 {index1.shape} and index2 {index2.shape} differ")
    num_pairs, num_templates = index1.size, feats1.shape[0]
    block = max(1, min(int(block), num_templates))
    num_bands = -(-num_templates // block)
    if num_pairs < max(min_density * block * block, 1) or num_pairs >= 2**32 or \
            num_bands * num_templates >= 2**31:
        scores = np.empty(num_pairs, dtype)
        for s in range(0, num_pairs, 65_536):
            e = min(s + 65_536, num_pairs)
            np.einsum("ij,ij->i", feats1[index1[s:e]], feats2[index2[s:e]], out=scores[s:e])
        return scores
    import torch

    # key = (band * T + row) << 32 | pair, built in place (one int64 array, no int64 temporaries)
    key = np.empty(num_pairs, np.int64)
    band_row = index2 // np.int32(block)
    band_row *= np.int32(num_templates)
    band_row += index1
    key[:] = band_row
    del band_row
    key <<= 32
    key |= np.arange(num_pairs, dtype=np.int64)
    key.sort()
    bounds = np.searchsorted(key, (np.arange(num_bands + 1, dtype=np.int64) * num_templates) << 32).tolist()
    feats1_t, feats2_t = torch.from_numpy(feats1), torch.from_numpy(feats2)
    scores = np.empty(num_pairs, dtype)
    scores_t = torch.from_numpy(scores)
    with warnings.catch_warnings():  # torch's note that beta=0 still multiplies (hence zero values)
        warnings.simplefilter("ignore", UserWarning)
        for band in range(num_bands):
            s, e = bounds[band], bounds[band + 1]
            if s == e:
                continue
            c0 = band * block
            width = min(block, num_templates - c0)
            part = key[s:e]
            rows = (part >> 32) - band * num_templates
            pair = part & 0xFFFFFFFF
            cols = index2[pair] - np.int32(c0)
            if e - s >= num_templates * width:  # denser than the band itself (repeats): one GEMM
                scores[pair] = (feats1 @ feats2[c0:c0 + width].T)[rows, cols]
                continue
            crow = torch.zeros(num_templates + 1, dtype=torch.int64)
            torch.cumsum(torch.bincount(torch.from_numpy(rows), minlength=num_templates), 0, out=crow[1:])
            pattern = torch.sparse_csr_tensor(crow, torch.from_numpy(cols.astype(np.int64)),
                                              torch.zeros(e - s, dtype=feats1_t.dtype),  # 0 * NaN is NaN
                                              size=(num_templates, width))
            values = torch.sparse.sampled_addmm(pattern, feats1_t, feats2_t[c0:c0 + width].T, beta=0.0)
            scores_t.index_copy_(0, torch.from_numpy(pair), values.values())  # faster than numpy's
    return scores


def _float32_score_error(query: Pooled, gallery: Pooled) -> float:
    """Bound on |float32 score - float64 score|: rounding both templates to float32 (2u) plus a
    D-term float32 dot product in any order (gamma_D), relative to |q| |g| (u = 2**-24)."""
    unit = 2.0 ** -24
    dim = query.feats.shape[1]
    return 1.01 * ((dim + 3) * unit) * max(query.max_norm * gallery.max_norm, 1.0)


def tar_from_scores(meta: IJBMeta, first: Pooled, second: Pooled, scores: np.ndarray, rows1: np.ndarray,
                    rows2: np.ndarray, fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray,
                    fars: Sequence[float] = metrics.DEFAULT_FARS) -> tuple[dict, dict]:
    """TAR@FAR (nearest point, strict) of float32 pair ``scores`` and their ROC, as insightface's
    float64 arithmetic gives them: pairs near each target FAR are re-scored from the float64
    templates of ``first`` (rows ``rows1``, the pairs' first column) and ``second`` (``rows2``)
    (:func:`~facecompat.eval.metrics.refine_tar_at_far`). Without float64 templates the float32
    ROC is read directly."""
    if first.exact is None or second.exact is None:
        return metrics.tar_at_far(fpr, tpr, fars), metrics.tar_at_far_strict(fpr, tpr, fars)
    f64, s64 = first.exact, second.exact

    def exact_scores(idx: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", f64[rows1[idx]], s64[rows2[idx]])

    return metrics.refine_tar_at_far(scores, meta.pair_labels, fpr, thresholds, exact_scores,
                                     _float32_score_error(first, second), fars)


def verify_1to1(meta: IJBMeta, query: Pooled, gallery: Pooled | None = None,
                fars: Sequence[float] = metrics.DEFAULT_FARS,
                return_curves: bool = False) -> dict | tuple[dict, dict]:
    """1:1 over the meta's pairs from pooled templates (DESIGN §5): each pair's first template
    (IJB-C's enrolled side, the G1 ∪ G2 gallery templates) from ``gallery``, its second template
    (the probe) from ``query``; ``gallery`` None or ``query`` itself = self test. See
    :func:`evaluate_1to1`."""
    gallery = query if gallery is None else gallery
    _check_pair(query, gallery)
    i1, i2 = meta.pair_rows(query.templates)
    probe_feats = gallery.feats if gallery is query else query.feats  # the same array: a self test
    scores = score_pairs(gallery.feats, probe_feats, i1, i2)
    fpr, tpr, thresholds = metrics.roc_curve(scores, meta.pair_labels)
    tar, strict = tar_from_scores(meta, gallery, query, scores, i1, i2, fpr, tpr, thresholds, fars)
    result = {"tar_at_far": tar, "tar_at_far_strict": strict,
              "auc": metrics.auc(fpr, tpr), "num_pairs": int(scores.size),
              "num_genuine": int(meta.pair_labels.sum())}
    if return_curves:
        return result, {"scores": scores, "labels": meta.pair_labels, "fpr": fpr, "tpr": tpr}
    return result


def evaluate_1to1(meta: IJBMeta, query_features: np.ndarray, gallery_features: np.ndarray | None = None,
                  fars: Sequence[float] = metrics.DEFAULT_FARS, score_weighting: bool = True,
                  return_curves: bool = False) -> dict | tuple[dict, dict]:
    """IJB 1:1 verification over the meta's template pairs.

    Args:
        meta: from :func:`load_ijb_meta`.
        query_features: [N, D] face features of the query model, which embeds each pair's second
            template (the probe side).
        gallery_features: [N, D] of the gallery model, which embeds each pair's first template
            (IJB-C's enrolled side); None = self test.
        fars: target FARs.
        score_weighting: weight faces by detector score before pooling (insightface default).
        return_curves: also return ``{"scores" [M] float32, "labels" [M] int8, "fpr", "tpr"}``.

    Returns:
        ``{"tar_at_far": {far_key: tar}, "tar_at_far_strict": {...}, "auc", "num_pairs",
        "num_genuine"}`` (and the curves dict with ``return_curves``).
    """
    query = pool(meta, query_features, score_weighting)
    gallery = None if gallery_features is None else pool(meta, gallery_features, score_weighting)
    return verify_1to1(meta, query, gallery, fars, return_curves)
