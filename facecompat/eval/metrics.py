"""Verification (1:1) and identification (1:N) metrics on plain score arrays.

1:1 follows insightface's ``eval_ijbc.py``: the ROC is exactly ``sklearn.metrics.roc_curve`` with
``drop_intermediate=True`` (reproduced here without sklearn, and fast on IJB-C's 15.6M scores),
and TAR@FAR is read at the ROC point whose FAR is nearest the target (:func:`tar_at_far`); the
strict "best TAR with FAR <= target" is :func:`tar_at_far_strict`.

1:N follows DESIGN §5 (open set, per gallery): :func:`cmc` over mated probes and
:func:`tpir_at_fpir` with the threshold taken from the non-mated probes' best scores.

Result keys: FARs are formatted by :func:`far_key` (``format(x, ".0e")``: ``"1e-06"``, ``"1e-04"``,
``"1e-01"``), FPIRs by :func:`fpir_key` (``format(x, "g")``: ``"0.01"``, ``"0.1"``), ranks by
``str(k)``, matching the JSON shapes of DESIGN §8.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_FPIRS = (0.01, 0.1)
DEFAULT_RANKS = (1, 5, 10)


def far_key(far: float) -> str:
    """The JSON key of a FAR: ``format(far, ".0e")`` (1e-6 -> "1e-06", 0.1 -> "1e-01")."""
    return format(far, ".0e")


def fpir_key(fpir: float) -> str:
    """The JSON key of an FPIR: ``format(fpir, "g")`` (0.01 -> "0.01", 0.1 -> "0.1")."""
    return format(fpir, "g")


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of binary scores, identical to ``sklearn.metrics.roc_curve(labels, scores)``.

    Same points as sklearn's default ``drop_intermediate=True``: one point per distinct score
    (descending), collinear points dropped by second differences, then (0, 0) prepended with
    threshold ``inf``. Instead of one argsort of all scores, genuine and impostor scores are sorted
    separately (a plain sort is vectorised in numpy, an argsort is not) and counted in integers:
    impostors below each distinct value from the run starts of the sorted impostors, genuine ones
    by a cumulative count (no search per distinct value); only the kept points become float.

    Args:
        scores: [M] float scores (higher = more likely genuine); NaN is rejected.
        labels: [M] labels, genuine where == 1 (or True); anything else is an impostor.

    Returns:
        fpr [K] float64, tpr [K] float64, thresholds [K] (dtype of ``scores``, first is inf).
        With no impostors (or no genuine pairs) fpr (or tpr) is all NaN, as in sklearn.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    labels = labels if labels.dtype == bool else labels == 1  # sklearn's pos_label=1
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be 1-D of one length")
    if scores.size == 0:
        raise ValueError("roc_curve needs at least one score")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    genuine = scores[labels]
    genuine.sort()
    impostor = scores[~labels]  # a copy already: sort it in place (numpy's vectorised sort)
    impostor.sort()
    # distinct values of all scores, ascending: the impostor uniques with the genuine-only values
    # inserted; "#impostors below a value" is the first index of an impostor unique (no search)
    if impostor.size:
        is_first = np.empty(impostor.size, bool)
        is_first[0] = True
        np.not_equal(impostor[1:], impostor[:-1], out=is_first[1:])
        first = np.flatnonzero(is_first)
        del is_first
    else:
        first = np.zeros(0, np.int64)
    imp_u = impostor[first]
    gen_first = np.r_[True, genuine[1:] != genuine[:-1]] if genuine.size else np.zeros(0, bool)
    gen_u = genuine[gen_first]
    gen_n = np.diff(np.r_[np.flatnonzero(gen_first), genuine.size])  # genuine scores per unique
    pos = np.searchsorted(imp_u, gen_u)
    new = (pos >= imp_u.size) | (imp_u[np.minimum(pos, max(imp_u.size - 1, 0))] != gen_u) \
        if imp_u.size else np.ones(gen_u.size, bool)
    imp_below = np.insert(first, pos[new], np.searchsorted(impostor, gen_u[new])) if new.any() else first
    distinct = np.insert(imp_u, pos[new], gen_u[new]) if new.any() else imp_u
    del first, imp_u
    # collinear points (sklearn drops them by nonzero second differences of the counts): the second
    # difference at point i is the change of (impostors, genuine) AT the distinct value from i-1 to
    # i, so point i is kept where that pair of counts changes. The impostor counts are differences
    # of imp_below; the genuine counts are nonzero only at the few genuine values, so their changes
    # are found among those positions and the next ones (no [K] genuine arrays at all).
    num = distinct.size
    keep = np.ones(num, bool)
    if num > 2:
        imp_n = np.diff(imp_below, append=impostor.size)
        np.not_equal(imp_n[1:-1], imp_n[:-2], out=keep[1:-1])
        del imp_n
        if gen_u.size:
            gpos = np.searchsorted(distinct, gen_u)  # where each genuine value is (unique, ascending)
            cand = np.unique(np.r_[gpos, gpos + 1])
            cand = cand[(cand >= 1) & (cand <= num - 2)]
            last = gpos.size - 1
            j = np.minimum(np.searchsorted(gpos, cand), last)  # genuine count at cand and at cand - 1
            at = np.where(gpos[j] == cand, gen_n[j], 0)
            j = np.minimum(np.searchsorted(gpos, cand - 1), last)
            before = np.where(gpos[j] == cand - 1, gen_n[j], 0)
            keep[cand[at != before]] = True
    sel = np.flatnonzero(keep)[::-1]  # descending, as sklearn's thresholds
    fps = (impostor.size - imp_below[sel]).astype(np.float64)
    distinct = distinct[sel]
    tps = (genuine.size - np.searchsorted(genuine, distinct, side="left")).astype(np.float64)
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thresholds = np.r_[np.array([np.inf], dtype=distinct.dtype), distinct]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float] = DEFAULT_FARS) -> dict[str, float]:
    """TAR at the ROC point whose FAR is nearest each target (insightface's printed convention).

    insightface flips the ROC (``np.flipud``, "select largest tpr at same fpr") and then takes
    ``min(zip(|fpr - far|, range))``: among points equally near it takes the LAST one in ascending
    order. That matters on vertical ROC segments (several points at one FAR): the top of the
    segment is reported, e.g. TAR 1.0, not 0.0, for a perfectly separated ROC at small FARs.
    Returns ``{far_key(far): tar}``.
    """
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    last = fpr.size - 1
    return {far_key(far): float(tpr[last - int(np.argmin(np.abs(fpr[::-1] - far)))]) for far in fars}


def tar_at_far_strict(fpr: np.ndarray, tpr: np.ndarray,
                      fars: Sequence[float] = DEFAULT_FARS) -> dict[str, float]:
    """Best TAR over the ROC points with FAR <= each target (0.0 when there is none)."""
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    out = {}
    for far in fars:
        ok = fpr <= far
        out[far_key(far)] = float(tpr[ok].max()) if ok.any() else 0.0
    return out


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC by the trapezoidal rule (``fpr`` ascending, as :func:`roc_curve` gives)."""
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _open_set_scores(similarity: np.ndarray, probe_subjects: np.ndarray, gallery_subjects: np.ndarray,
                     block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per probe: is it mated, best true score, best other-subject score, rank (DESIGN §5).

    One pass over ``similarity`` in row blocks small enough to stay in cache (IJB-C's matrix is
    ~140 MB per gallery; the former [P, G] masks and ``np.where`` copies cost seconds): each block
    is copied once, its true entries set to -inf, then a row max gives the best other score and a
    compare-and-count the rank. The true entries themselves are few (a probe's subject has a
    handful of gallery templates) and are gathered directly, never through a [P, G] mask. The
    input is not modified.

    Returns:
        mated [P] bool; best_true [P] (-inf when not mated); best_other [P] (-inf without other
        subjects); rank [P] int64 = 1 + other-subject templates strictly above best_true.
    """
    sim = np.asarray(similarity)
    probe_subjects = np.asarray(probe_subjects).ravel()
    gallery_subjects = np.asarray(gallery_subjects).ravel()
    if sim.shape != (probe_subjects.size, gallery_subjects.size):
        raise ValueError(f"similarity {sim.shape} does not match {probe_subjects.size} probes "
                         f"x {gallery_subjects.size} gallery templates")
    if not np.issubdtype(sim.dtype, np.floating):
        sim = sim.astype(np.float64)
    num_probes = probe_subjects.size
    # the gallery columns of every probe's subject: a run of the subject-sorted columns
    by_subject = np.argsort(gallery_subjects, kind="stable")
    sorted_subjects = gallery_subjects[by_subject]
    low = np.searchsorted(sorted_subjects, probe_subjects, "left")
    count = np.searchsorted(sorted_subjects, probe_subjects, "right") - low
    mated = count > 0
    true_rows = np.repeat(np.arange(num_probes), count)  # ascending: blocks are contiguous runs
    offset = np.arange(true_rows.size) - np.repeat(np.cumsum(count) - count, count)
    true_cols = by_subject[np.repeat(low, count) + offset]
    best_true = np.full(num_probes, -np.inf, sim.dtype)
    np.maximum.at(best_true, true_rows, sim[true_rows, true_cols])
    best_other = np.empty(num_probes, sim.dtype)
    rank = np.ones(num_probes, np.int64)
    buf = np.empty((min(block, num_probes), sim.shape[1]), sim.dtype)
    bounds = np.searchsorted(true_rows, np.arange(0, num_probes + block, block)).tolist()
    for b, s in enumerate(range(0, num_probes, block)):
        e = min(s + block, num_probes)
        work = buf[:e - s]
        work[...] = sim[s:e]
        work[true_rows[bounds[b]:bounds[b + 1]] - s, true_cols[bounds[b]:bounds[b + 1]]] = -np.inf
        work.max(axis=1, initial=-np.inf, out=best_other[s:e])
        above = work > best_true[s:e, None]  # ties count in the probe's favour
        rank[s:e] += above.sum(axis=1)
    return mated, best_true, best_other, rank


def _cmc_from(mated: np.ndarray, rank: np.ndarray, ranks: Sequence[int]) -> dict[str, float]:
    if not mated.any():
        return {str(k): float("nan") for k in ranks}
    mated_rank = rank[mated]
    return {str(k): float(np.mean(mated_rank <= k)) for k in ranks}


def _tpir_from(mated: np.ndarray, best_true: np.ndarray, best_other: np.ndarray, rank: np.ndarray,
               fpirs: Sequence[float]) -> dict[str, float]:
    if not mated.any():
        return {fpir_key(fpir): float("nan") for fpir in fpirs}
    nonmated_best = np.sort(best_other[~mated])[::-1]  # a non-mated probe's best other = its best
    rank1, true_score = rank[mated] == 1, best_true[mated]
    out = {}
    for fpir in fpirs:
        if nonmated_best.size:
            threshold = nonmated_best[max(int(np.floor(nonmated_best.size * fpir)) - 1, 0)]
        else:
            threshold = -np.inf
        out[fpir_key(fpir)] = float(np.mean(rank1 & (true_score > threshold)))
    return out


def cmc(similarity: np.ndarray, probe_subjects: np.ndarray, gallery_subjects: np.ndarray,
        ranks: Sequence[int] = DEFAULT_RANKS) -> dict[str, float]:
    """Closed-set CMC over the mated probes (those whose subject has a gallery template).

    The rank of a mated probe is 1 + the number of gallery templates of other subjects scoring
    strictly higher than its best true template (ties count in the probe's favour).

    Args:
        similarity: [P, G] probe x gallery template scores.
        probe_subjects: [P] subject ids; gallery_subjects: [G] subject ids.
        ranks: the k of each rank-k rate.

    Returns:
        ``{str(k): share of mated probes with rank <= k}`` (NaN if no probe is mated).
    """
    mated, _, _, rank = _open_set_scores(similarity, probe_subjects, gallery_subjects)
    return _cmc_from(mated, rank, ranks)


def tpir_at_fpir(similarity: np.ndarray, probe_subjects: np.ndarray, gallery_subjects: np.ndarray,
                 fpirs: Sequence[float] = DEFAULT_FPIRS) -> dict[str, float]:
    """Open-set TPIR at FPIR (DESIGN §5).

    The non-mated probes' best scores are sorted descending and the threshold is the entry at
    index ``max(floor(n_nonmated * fpir) - 1, 0)``; TPIR is the share of mated probes whose true
    template ranks first (ties in its favour, as in :func:`cmc`) AND whose score is strictly
    greater than the threshold. With no non-mated probe the threshold is -inf (TPIR = rank-1).

    Returns:
        ``{fpir_key(fpir): tpir}`` (NaN if no probe is mated).
    """
    return _tpir_from(*_open_set_scores(similarity, probe_subjects, gallery_subjects), fpirs)


def identification(similarity: np.ndarray, probe_subjects: np.ndarray, gallery_subjects: np.ndarray,
                   ranks: Sequence[int] = DEFAULT_RANKS,
                   fpirs: Sequence[float] = DEFAULT_FPIRS) -> dict[str, dict[str, float]]:
    """:func:`cmc` and :func:`tpir_at_fpir` from one pass over ``similarity``:
    ``{"cmc": {...}, "tpir_at_fpir": {...}}`` (the pass is the cost; the two share it)."""
    mated, best_true, best_other, rank = _open_set_scores(similarity, probe_subjects, gallery_subjects)
    return {"cmc": _cmc_from(mated, rank, ranks),
            "tpir_at_fpir": _tpir_from(mated, best_true, best_other, rank, fpirs)}
