"""IJB 1:N open-set identification: per gallery one probe x gallery similarity matrix, then CMC and
TPIR@FPIR from one blocked pass over it (:func:`metrics.identification`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from facecompat.eval import metrics
from facecompat.eval.ijb.pooling import Pooled, _check_pair, pool
from facecompat.eval.ijb.records import IJBMeta, IJBMetaError


def _similarity(probe_feats: np.ndarray, gallery_feats: np.ndarray, use_faiss: bool) -> np.ndarray:
    """[P, G] float32 inner products: faiss's all-pairs product (on a GPU when faiss has one) or numpy.

    1:N needs every probe x gallery score (ranks count all templates above the true one), so the
    tool is one matrix product, not a k-nearest search: a flat-index search with k = the whole
    gallery spends ~10x the product's time selecting and sorting k results that are then scattered
    back. With faiss and a GPU, faiss's ``pairwise_distance_gpu`` computes the matrix there; on the
    CPU the BLAS product is what faiss's own ``pairwise_distances`` runs for inner products (plus a
    copy), so numpy runs it directly and both settings agree bit for bit.
    """
    probe_feats = np.ascontiguousarray(probe_feats, np.float32)
    gallery_feats = np.ascontiguousarray(gallery_feats, np.float32)
    faiss = None
    if use_faiss:
        try:
            import faiss
        except ImportError:
            faiss = None
    if faiss is not None and hasattr(faiss, "pairwise_distance_gpu") and faiss.get_num_gpus() > 0:
        return faiss.pairwise_distance_gpu(faiss.StandardGpuResources(), probe_feats, gallery_feats,
                                           metric=faiss.METRIC_INNER_PRODUCT)
    return probe_feats @ gallery_feats.T


def identify_1toN(meta: IJBMeta, query: Pooled, gallery: Pooled | None = None,
                  ranks: Sequence[int] = metrics.DEFAULT_RANKS,
                  fpirs: Sequence[float] = metrics.DEFAULT_FPIRS, use_faiss: bool = True) -> dict:
    """1:N from pooled templates: probes from ``query``, galleries from ``gallery`` (None = same).
    See :func:`evaluate_1toN`. Per gallery: one similarity matrix, then CMC and TPIR from one
    blocked pass over it (:func:`metrics.identification`)."""
    if not meta.has_1n:
        raise IJBMetaError(f"{meta.target}: no 1:N meta files (gallery and probe CSVs)")
    gallery = query if gallery is None else gallery
    _check_pair(query, gallery)
    probes = meta.probes
    probe_feats = query.feats[query.rows(probes.template_ids, "1:N probe CSV")]
    out = {}
    for name, subjects in meta.galleries.items():
        gallery_feats = gallery.feats[gallery.rows(subjects.template_ids, f"1:N gallery {name} CSV")]
        sim = _similarity(probe_feats, gallery_feats, use_faiss)
        mated = np.isin(probes.subject_ids, subjects.subject_ids)
        out[name] = {**metrics.identification(sim, probes.subject_ids, subjects.subject_ids, ranks, fpirs),
                     "num_probes": int(probes.template_ids.size), "num_mated": int(mated.sum()),
                     "num_gallery": int(subjects.template_ids.size)}
        del sim
    return out


def evaluate_1toN(meta: IJBMeta, query_features: np.ndarray, gallery_features: np.ndarray | None = None,
                  ranks: Sequence[int] = metrics.DEFAULT_RANKS,
                  fpirs: Sequence[float] = metrics.DEFAULT_FPIRS, use_faiss: bool = True,
                  score_weighting: bool = True) -> dict:
    """IJB 1:N open-set identification per gallery (DESIGN §5).

    Probe templates are pooled from ``query_features``, gallery templates from
    ``gallery_features`` (None = the same model). Mated probes of a gallery are those whose subject
    has a template in it.

    Returns:
        ``{gallery: {"cmc": {"1": r1, ...}, "tpir_at_fpir": {"0.01": x, ...}, "num_probes",
        "num_mated", "num_gallery"}}``.
    """
    query = pool(meta, query_features, score_weighting)
    gallery = None if gallery_features is None else pool(meta, gallery_features, score_weighting)
    return identify_1toN(meta, query, gallery, ranks, fpirs, use_faiss)
