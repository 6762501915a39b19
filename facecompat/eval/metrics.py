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

from collections.abc import Callable, Sequence

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
    return {far_key(far): float(tpr[_nearest_index(fpr, far)]) for far in fars}


def tar_at_far_strict(fpr: np.ndarray, tpr: np.ndarray,
                      fars: Sequence[float] = DEFAULT_FARS) -> dict[str, float]:
    """Best TAR over the ROC points with FAR <= each target (0.0 when there is none)."""
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    out = {}
    for far in fars:
        ok = fpr <= far
        out[far_key(far)] = float(tpr[ok].max()) if ok.any() else 0.0
    return out


def _nearest_index(fpr: np.ndarray, far: float) -> int:
    """Index :func:`tar_at_far` reads: nearest FAR, the last of equally near points."""
    return fpr.size - 1 - int(np.argmin(np.abs(fpr[::-1] - far)))


def _local_roc(scores: np.ndarray, labels: np.ndarray, exact_scores: Callable[[np.ndarray], np.ndarray],
               lo: float, hi: float, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Exact ROC points (after sklearn's dropping) whose thresholds lie in [lo, hi], as counts.

    Pairs whose approximate score is above ``hi + 2 eps`` have exact scores above ``hi + eps``
    and are counted as above every threshold here; those below ``lo - 2 eps`` are below all of
    them; the pairs between are re-scored exactly. A point's keep decision needs both neighbours,
    so only points whose neighbours are also in range are returned (plus the global first/last
    point and sklearn's prepended (0, 0) when the range reaches them).

    Returns:
        (fps, tps, trusted_to_end) of the kept points in threshold-descending order;
        ``trusted_to_end`` is (starts at the global top, ends at the global bottom).
    """
    top, bottom = hi == np.inf, lo == -np.inf
    upper, lower = hi + 2 * eps, lo - 2 * eps
    above = scores > upper
    above_g = int(np.count_nonzero(above & labels))
    above_i = int(np.count_nonzero(above)) - above_g
    idx = np.flatnonzero(~above & (scores >= lower))
    exact = np.asarray(exact_scores(idx), np.float64)
    y = labels[idx]
    order = np.argsort(-exact, kind="stable")
    exact, y = exact[order], y[order]
    if exact.size == 0:
        return None
    last = np.r_[np.flatnonzero(exact[1:] != exact[:-1]), exact.size - 1]  # last pair of each value
    cum_g = np.cumsum(y)[last]
    tps = above_g + cum_g
    fps = above_i + (last + 1) - cum_g
    thr = exact[last]
    inside = (thr >= lo) & (thr <= hi)
    n = thr.size
    keep = np.zeros(n, bool)
    trusted = np.zeros(n, bool)
    if n > 2:
        d2 = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        keep[1:-1] = d2
        trusted[1:-1] = inside[:-2] & inside[1:-1] & inside[2:]
    if top:  # the global first point is always kept
        keep[0], trusted[0] = True, bool(inside[0])
    if bottom:
        keep[-1], trusted[-1] = True, bool(inside[-1])
    sel = keep & trusted
    fps, tps = fps[sel], tps[sel]
    if top:  # sklearn prepends (0, 0) after dropping
        fps, tps = np.r_[0, fps], np.r_[0, tps]
    return fps, tps, np.array([top, bottom])


def refine_tar_at_far(scores: np.ndarray, labels: np.ndarray, fpr: np.ndarray, thresholds: np.ndarray,
                      exact_scores: Callable[[np.ndarray], np.ndarray], eps: float,
                      fars: Sequence[float] = DEFAULT_FARS) -> tuple[dict[str, float], dict[str, float]]:
    """TAR@FAR (nearest point, and strict) of the EXACT scores, from fast approximate ones.

    The pair scores are computed in float32 for speed, while insightface computes them in
    float64; near a target FAR, a genuine and an impostor score 1e-7 apart may swap, and the
    ROC's dropped points may differ, so the reported TAR would differ by a pair or two. Here,
    for each target, the float32 ROC locates the few points around it; every pair whose float32
    score is within ``2 eps`` of that span is re-scored by ``exact_scores`` (float64), and the
    exact ROC points there are rebuilt, counting all other pairs as above or below. The answer
    is accepted only when the rebuilt points bracket the chosen point on both sides (so no point
    outside could be nearer); otherwise the span widens, ending with all pairs if need be.

    Args:
        scores: [M] approximate scores with ``|scores - exact| <= eps`` for every pair.
        labels: [M] genuine where == 1.
        fpr, thresholds: :func:`roc_curve` of ``scores`` (its tpr is not needed).
        exact_scores: pair indices -> their exact float64 scores.
        eps: the bound on the approximation error.

    Returns:
        ``({far_key: tar}, {far_key: strict tar})``, equal to :func:`tar_at_far` and
        :func:`tar_at_far_strict` of ``roc_curve(exact scores)``.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    labels = labels if labels.dtype == bool else labels == 1
    n_gen = int(np.count_nonzero(labels))
    n_imp = labels.size - n_gen
    num = thresholds.size

    points = {far: (_nearest_index(fpr, far), max(int(np.searchsorted(fpr, far, side="right")) - 1, 0))
              for far in fars}  # where the approximate ROC answers (nearest, strict)

    def bounds(far: float, span: int) -> tuple[float, float]:
        j, k = points[far]
        first, last = min(j, k) - span, max(j, k) + span
        hi = np.inf if first <= 1 else float(thresholds[first])  # thresholds[0] is inf
        lo = -np.inf if last >= num - 1 else float(thresholds[last])
        return lo, hi

    # Every first window lies above the lowest of them: one pass keeps only those pairs (about the
    # largest target FAR's share of the impostors), and the windows are cut from that subset.
    floor = min(bounds(far, 8)[0] for far in fars) - 2 * eps if len(fars) else np.inf
    subset = np.flatnonzero(scores >= floor) if floor > -np.inf else None
    sub_scores = scores if subset is None else scores[subset]
    sub_labels = labels if subset is None else labels[subset]
    sub_exact = exact_scores if subset is None else (lambda idx: exact_scores(subset[idx]))
    nearest, strict = {}, {}
    for far in fars:
        key = far_key(far)
        span = 2
        while True:
            lo, hi = bounds(far, span)
            if lo - 2 * eps >= floor:
                got = _local_roc(sub_scores, sub_labels, sub_exact, lo, hi, eps)
            else:
                got = _local_roc(scores, labels, exact_scores, lo, hi, eps)
            if got is not None and got[0].size:
                answer = _read_local(got, far, n_gen, n_imp)
                if answer is not None:
                    nearest[key], strict[key] = answer
                    break
            if hi == np.inf and lo == -np.inf:
                raise RuntimeError(f"exact ROC around FAR {far} could not be rebuilt")  # cannot happen
            span *= 4
    return nearest, strict


def _read_local(local: tuple[np.ndarray, np.ndarray, np.ndarray], far: float, n_gen: int,
                n_imp: int) -> tuple[float, float] | None:
    """(nearest TAR, strict TAR) from exact local points, or None when the points do not prove it."""
    fps, tps, (top, bottom) = local
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / n_imp if n_imp else np.full(fps.size, np.nan)
        tpr = tps / n_gen if n_gen else np.full(tps.size, np.nan)
    j = _nearest_index(fpr, far)
    low, high = min(fpr[j], far), max(fpr[j], far)
    if not (top or (fpr < low).any()) or not (bottom or (fpr > high).any()):
        return None
    ok = np.flatnonzero(fpr <= far)
    if ok.size == 0:  # only possible without the global top; the (0, 0) point is missing
        return None
    s = ok[-1]
    if not (bottom or s + 1 < fpr.size):
        return None
    return float(tpr[j]), float(tpr[s])


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


def pooled_over_galleries(rates: Sequence | np.ndarray, num_mated: Sequence[int]) -> float | np.ndarray:
    """A 1:N rate over several galleries (IJB-C's G1 and G2) as the public cross-model evaluator
    pools it (DESIGN §5): the hits in every gallery over all mated probes of all of them, i.e. each
    gallery's rate weighted by its mated probes -- not the plain mean of the galleries' rates. For
    CMC ranks; that evaluator averages TPIRs plainly (each gallery has its own threshold).

    Args:
        rates: ``[G]`` one rate per gallery, or ``[G, F]`` one curve per gallery.
        num_mated: ``[G]`` mated probes of each gallery.

    Returns:
        a float (``[G]`` rates) or ``[F]`` float64 (curves); NaN when no gallery has a mated probe.
    """
    values, weights = np.asarray(rates, np.float64), np.asarray(num_mated, np.float64)
    total = weights.sum()
    pooled = weights @ values / total if total > 0 else np.full(values.shape[1:], np.nan)
    return float(pooled) if np.ndim(pooled) == 0 else pooled
