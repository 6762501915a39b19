"""Subject-bootstrap intervals for the upgrade certificate (DESIGN §5).

Pairs share templates and subjects, so a binomial over pairs overstates certainty: every figure here
gets a 95% percentile interval from a bootstrap over SUBJECTS. Replicate r draws the set's S subjects
with replacement (multiplicities m[s]) from ``SeedSequence(seed, spawn_key=(r,))`` alone and keeps
their pairs and probes once per copy: a genuine pair of s weighs m[s], an impostor pair m[s1] * m[s2]
(the two-way bootstrap), a 1:N probe m[its subject], mated or not, while the GALLERY stays fixed (it
is the enrolment, not a sample; copying or dropping its templates would change who is mated and
every rank). Weights and cumulative sums are int64: results are exact and the same on any CPU,
thread count or block size (the plan's impostor totals go through float64 BLAS on integers below
2^53, exact too). Differences of cells use the same replicates (a paired bootstrap).

Each replicate reads the set expanded by its weights exactly as the full set is read:
TAR@FAR = :func:`metrics.tar_at_far` of :func:`metrics.roc_curve` -- tied scores are one ROC point,
a point of zero weight does not exist, sklearn's collinear points are dropped (this can move the
reading on a diagonal run of ties), the nearest FAR wins, the last of equally near points. The
operating threshold is that point's score (``inf`` for the prepended (0, 0)); a pair is accepted
when its score is >= it. A FAR is resolved when ``num_impostors * far >= min_false_accepts`` (20,
``pipelines.evaluate.headline_far``'s rule); an unresolved one is reported with its reason, no
numbers. Intervals are order statistics at 2.5% / 97.5% (numpy ``"lower"`` / ``"higher"``: no
interpolation, ``inf`` safe) over the replicates where the figure is defined (one without genuine,
impostor or mated weight is NaN). FAR keys as the certificate writes them: ``format(far, "g")``.

Speed: a cell's pairs are sorted once; a replicate gathers the weights of the top pairs (impostors
down to 1.5x the largest resolved FAR), takes one int64 cumsum and reads each FAR in a small window
around its crossing (widened, or redone on all pairs, when a run of ties or of equal steps reaches
past it). Measured here (2 cores, numpy 2.4): ~10 ms per replicate per million pairs read on small
sets, ~23 ms on IJB-C's (cache misses). Quickstart-sized set (1,000 genuine + 100,000 impostor
pairs, 200 subjects, FARs 1e-3..1e-1 resolved, 6 cells, 1,000 replicates): 1.1-1.4 s for the six
cells, 0.1 s for the plan. IJB-C (15.6M impostor pairs, 3,500 subjects, FARs to 1e-1: 2.8M pairs
read): ~65 ms per replicate per cell, ~6.5 min for 6 cells x 1,000 replicates (it scales with the
replicates and the largest FAR), plus ~6 s for the plan and ~5 s per cell for its sort. 1:N with
IJB-C's 19.6k probes: 0.4 s per gallery for 1,000 replicates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from facecompat.errors import UserError
from facecompat.eval import metrics

MIN_FALSE_ACCEPTS = 20
_PREFIX = 1.5  # replicates read the pairs down to this many times the largest FAR's impostors
_WINDOW = 32  # half-width (ROC groups) of the first window around each FAR's crossing
_BLOCK = 1 << 21  # elements per [replicates, items] block (16 MB as int64)
_Counts = tuple[np.ndarray, np.ndarray, np.ndarray]  # a weighted ROC: see _SortedCell.counts


class BootstrapError(UserError, ValueError):
    """Bad bootstrap input (lengths, labels, NaN scores, replicate count), reported in one line."""


def far_label(far: float) -> str:
    """A FAR as the certificate's JSON writes it (DESIGN §8): ``format(far, "g")`` ("0.001")."""
    return format(far, "g")


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> np.ndarray:
    """[K, 2] order-statistic interval of each column of ``replicates`` [R, K], NaNs left out."""
    reps = np.asarray(replicates, np.float64).reshape(len(replicates), -1)
    out = np.full((reps.shape[1], 2), np.nan)
    for k, col in enumerate(reps.T):
        col = col[~np.isnan(col)]
        if col.size:
            out[k] = (np.quantile(col, (1 - level) / 2, method="lower"),
                      np.quantile(col, (1 + level) / 2, method="higher"))
    return out


@dataclass(frozen=True)
class Estimate:
    """A statistic per key: the full set's value ``point`` [K] and each replicate's ``replicates``
    [R, K]. Differences of two estimates from one plan are paired (same replicates)."""

    keys: tuple[str, ...]
    point: np.ndarray
    replicates: np.ndarray

    def interval(self, level: float = 0.95) -> np.ndarray:
        """[K, 2] percentile interval (see :func:`percentile_interval`)."""
        return percentile_interval(self.replicates, level)

    def __sub__(self, other: Estimate) -> Estimate:
        if self.keys != other.keys or self.replicates.shape != other.replicates.shape:
            raise BootstrapError(f"estimates over {self.keys} and {other.keys} cannot be compared")
        return Estimate(self.keys, self.point - other.point, self.replicates - other.replicates)

    def as_dict(self, name: str, level: float = 0.95) -> dict[str, dict[str, float | list[float]]]:
        """``{key: {name: point, name + "_ci": [lo, hi]}}``."""
        ci = self.interval(level)
        return {k: {name: float(p), f"{name}_ci": [float(lo), float(hi)]}
                for k, p, (lo, hi) in zip(self.keys, self.point, ci)}


class SubjectBootstrap:
    """The resampling plan of one test set: which subjects each replicate draws, and how often.

    Args:
        pair_subject1, pair_subject2: [M] the subjects of each pair's two sides (any ids).
        labels: [M] genuine where True (or == 1); a genuine pair's two subjects must be equal.
        replicates: bootstrap replicates (>= 1). seed: a non-negative integer.
        subjects: the set's subjects (default: those of the pairs); 1:N probes must be among them.

    Attributes:
        subjects [S] (sorted); draws [R, S + 1] int64: row r is ``counts(r)`` then a sentinel 1;
        total_genuine, total_impostor [R] int64: each replicate's summed pair weights.
    """

    def __init__(self, pair_subject1: np.ndarray, pair_subject2: np.ndarray, labels: np.ndarray, *,
                 replicates: int = 1000, seed: int = 0, subjects: np.ndarray | None = None) -> None:
        s1, s2 = np.asarray(pair_subject1).ravel(), np.asarray(pair_subject2).ravel()
        lab = np.asarray(labels).ravel()
        lab = lab if lab.dtype == bool else lab == 1
        for name, arr in (("pair_subject2", s2), ("labels", lab)):
            if arr.size != s1.size:
                raise BootstrapError(f"{name}: {arr.size} values, pair_subject1 has {s1.size}")
        if s1.size == 0:
            raise BootstrapError("pair_subject1: no pairs")
        if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) or replicates < 1:
            raise BootstrapError(f"replicates={replicates!r}: need an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise BootstrapError(f"seed={seed!r}: need a non-negative integer")
        bad = np.flatnonzero(lab & (s1 != s2))
        if bad.size:
            raise BootstrapError(f"labels: genuine pair {bad[0]} joins subjects {s1[bad[0]]!r} and "
                                 f"{s2[bad[0]]!r} ({bad.size} such pairs; a genuine pair is one subject's)")
        self.subjects = np.unique(np.concatenate([s1, s2]) if subjects is None else np.ravel(subjects))
        self.replicates, self.seed, self.labels = int(replicates), int(seed), lab
        num = self.subjects.size
        self.sub1 = self.subject_index(s1, "pair_subject1")
        # a genuine pair's second side reads the sentinel column `num`, always 1: weight m[s] * 1
        self.sub2 = np.where(lab, num, self.subject_index(s2, "pair_subject2"))
        self.genuine_subjects = self.sub1[lab]
        self.num_genuine, self.num_impostors = int(lab.sum()), int((~lab).sum())
        self.draws = np.ones((self.replicates, num + 1), np.int64)  # [R, S + 1]: m, then the sentinel
        for r in range(self.replicates):
            self.draws[r, :num] = self.counts(r)
        self.total_genuine = self.draws[:, :num] @ np.bincount(self.genuine_subjects, minlength=num)
        self.total_impostor = _impostor_totals(self.draws[:, :num], self.sub1[~lab] * num + self.sub2[~lab])

    def counts(self, r: int) -> np.ndarray:
        """[S] int64 multiplicities of replicate r: S subjects drawn with replacement."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(r,)))
        num = self.subjects.size
        return np.bincount(rng.integers(0, num, size=num), minlength=num).astype(np.int64)

    def pair_weights(self, r: int) -> np.ndarray:
        """[M] int64 weights of replicate r: m[s] for a genuine pair, m[s1] * m[s2] for an impostor."""
        return self.draws[r, self.sub1] * self.draws[r, self.sub2]

    def unit_draws(self) -> np.ndarray:
        """[1, S + 1] all-ones draws: the full set, unweighted (the point estimates)."""
        return np.ones((1, self.subjects.size + 1), np.int64)

    def subject_index(self, ids: np.ndarray, what: str = "subjects") -> np.ndarray:
        """[N] indices of subject ids in :attr:`subjects`; BootstrapError naming ``what`` if unknown."""
        ids = np.asarray(ids).ravel()
        pos = np.minimum(np.searchsorted(self.subjects, ids), self.subjects.size - 1)
        bad = np.flatnonzero(self.subjects[pos] != ids)
        if bad.size:
            raise BootstrapError(f"{what}: subject {ids[bad[0]]!r} is not among the test set's "
                                 f"{self.subjects.size} subjects ({bad.size} entries)")
        return pos.astype(np.int64)

    def unresolved_reason(self, far: float, min_false_accepts: int = MIN_FALSE_ACCEPTS) -> str | None:
        """Why ``far`` is not resolved by this set (None when ``num_impostors * far >= min``)."""
        if self.num_impostors * far >= min_false_accepts:
            return None
        return (f"{self.num_impostors} impostor pairs x {far:g} = {self.num_impostors * far:.3g} false "
                f"accepts < {min_false_accepts}")

    def check_scores(self, scores: np.ndarray, what: str = "scores") -> np.ndarray:
        """[M] float scores in pair order; BootstrapError on a wrong length or NaN."""
        scores = np.asarray(scores).ravel()
        if scores.size != self.labels.size:
            raise BootstrapError(f"{what}: {scores.size} values, the plan has {self.labels.size} pairs")
        scores = scores if np.issubdtype(scores.dtype, np.floating) else scores.astype(np.float64)
        nan = np.flatnonzero(np.isnan(scores))
        if nan.size:
            raise BootstrapError(f"{what}: {nan.size} NaN values (first at pair {nan[0]})")
        return scores


def _impostor_totals(draws: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """[R] sum over impostor pairs of m[s1] * m[s2] (``codes`` = s1 * S + s2), as m^T C m with C the
    [S, S] pair counts, by rows of C. In float64 BLAS, yet exact and order-free: every product and
    partial sum is an integer below 2^53 (checked), so the int64 result does not depend on the CPU."""
    num = draws.shape[1]
    if codes.size * float(draws.max(initial=0)) ** 2 >= 2.0 ** 53:
        raise BootstrapError(f"pair_subject1: {codes.size} impostor pairs are too many for exact totals")
    codes, per_pair = np.unique(codes, return_counts=True)
    m = draws.astype(np.float64)
    total = np.zeros(len(draws))
    step = max(1, _BLOCK // num)
    for a0 in range(0, num, step):
        lo, hi = np.searchsorted(codes, [a0 * num, (a0 + step) * num])
        c = np.zeros((min(step, num - a0), num))
        c.ravel()[codes[lo:hi] - a0 * num] = per_pair[lo:hi]
        total += np.einsum("ra,ar->r", m[:, a0:a0 + step], c @ m.T)
    return np.rint(total).astype(np.int64)


def _blocks(num: int, width: int) -> list[tuple[int, int]]:
    """(start, count) row blocks of ``num`` rows holding about ``_BLOCK`` elements of ``width``."""
    step = max(1, _BLOCK // max(width, 1))
    return [(s, min(step, num - s)) for s in range(0, num, step)]


def _fpr_bound(far: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Largest integer x with float64 ``x / total <= far`` (the division is monotone in x)."""
    x = np.floor(far * total).astype(np.int64)
    for _ in range(2):
        x = np.where((x + 1) / total <= far, x + 1, x)
        x = np.where(x / total > far, x - 1, x)
    return x


def _read_windows(counts: _Counts, rows: np.ndarray, w0: np.ndarray, width: int, bound: np.ndarray,
                  far: np.ndarray, tot_g: np.ndarray, tot_i: np.ndarray,
                  complete: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One nearest-FAR reading per item (replicate row, FAR) in the window [w0, w0 + width) of the
    weighted ROC ``counts`` (:meth:`_SortedCell.counts`). Returns (tar, group (-1 for the (0, 0)
    point), ok); ok is False where the window cannot prove the answer."""
    fp, gcum, through = counts
    num, k = len(rows), fp.shape[1]
    cols = w0[:, None] + np.arange(width)
    g, i = gcum[rows[:, None], through[cols]], fp[rows[:, None], cols]
    prev = np.maximum(w0 - 1, 0)
    pg = np.where(w0 > 0, gcum[rows, through[prev]], 0)[:, None]
    pi = np.where(w0 > 0, fp[rows, prev], 0)[:, None]
    step_g, step_i = np.diff(g, axis=1, prepend=pg), np.diff(i, axis=1, prepend=pi)
    real = (step_g + step_i) > 0  # a group of zero weight is no ROC point
    first = real & (np.concatenate([pg, g[:, :-1]], 1) == 0) & (np.concatenate([pi, i[:, :-1]], 1) == 0)
    at = np.arange(width)
    nxt = np.minimum.accumulate(np.where(real, at, width)[:, ::-1], axis=1)[:, ::-1]
    nxt = np.concatenate([nxt[:, 1:], np.full((num, 1), width)], axis=1)  # next real point
    has = nxt < width
    nc = np.minimum(nxt, width - 1)
    same = (np.take_along_axis(step_g, nc, 1) == step_g) & (np.take_along_axis(step_i, nc, 1) == step_i)
    end = (complete & (w0 + width == k))[:, None]
    # sklearn keeps the first and last points and every point whose next step differs from its own
    keep = real & (first | (has & ~same) | (~has & end))
    known = real & (has | end)
    below = i <= bound[:, None]
    a_any, u_any = (keep & below).any(1), (keep & ~below).any(1)
    a_col = width - 1 - np.argmax((keep & below)[:, ::-1], 1)
    u_val = i[np.arange(num), np.argmax(keep & ~below, 1)]  # the first kept FAR above the target
    b_col = width - 1 - np.argmax((keep & (i == u_val[:, None]))[:, ::-1], 1)  # its last point
    # proven when the last kept point at or below the target is in the window (or the window starts
    # at the top: then it is (0, 0)) and a known point lies past the first kept FAR above the target
    # (so all points at that FAR, the last of which wins a tie, are in the window and known)
    ok = (a_any | (w0 == 0)) & np.where(u_any, end[:, 0] | (known & (i > u_val[:, None])).any(1), end[:, 0])
    dist_a = np.abs(np.where(a_any, i[np.arange(num), a_col] / tot_i, 0.0) - far)
    dist_b = np.where(u_any, np.abs(u_val / tot_i - far), np.inf)
    use_b = dist_b <= dist_a  # the last of equally near points
    col = np.where(use_b, b_col, a_col)
    zero = ~use_b & ~a_any
    tar = np.where(zero, 0.0, g[np.arange(num), col] / tot_g)
    return tar, np.where(zero, -1, w0 + col), ok


def _nearest(counts: _Counts, tot_g: np.ndarray, tot_i: np.ndarray, fars: Sequence[float],
             complete: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TAR [n, F] and group [n, F] of the nearest-FAR point of each row's weighted ROC, and the rows
    that need all pairs (their answer lies past the prefix); rows without weight are NaN / -2."""
    fp = counts[0]
    num, k = fp.shape
    tar, group = np.full((num, len(fars)), np.nan), np.full((num, len(fars)), -2, np.int64)
    defined = np.flatnonzero((tot_g > 0) & (tot_i > 0))
    rows = np.repeat(defined, len(fars))
    fidx = np.tile(np.arange(len(fars)), defined.size)
    far, ti, tg = np.asarray(fars, np.float64)[fidx], tot_i[rows], tot_g[rows]
    bound = _fpr_bound(far, ti)
    cross = np.concatenate([np.searchsorted(fp[r], b, "right")  # groups with FAR <= the target
                            for r, b in zip(defined, bound.reshape(-1, len(fars)))] or [rows])
    half = _WINDOW
    while rows.size:
        width = min(2 * half, k)
        w0 = np.clip(cross - half, 0, k - width)
        got, grp, ok = _read_windows(counts, rows, w0, width, bound, far, tg, ti, complete)
        tar[rows[ok], fidx[ok]], group[rows[ok], fidx[ok]] = got[ok], grp[ok]
        rows, fidx, far, ti, tg, bound, cross = (x[~ok] for x in (rows, fidx, far, ti, tg, bound, cross))
        if width == k:
            break
        half *= 16
    return tar, group, np.unique(rows)


class _SortedCell:
    """One cell's pairs in descending score order with its tie groups (one ROC point each)."""

    def __init__(self, plan: SubjectBootstrap, scores: np.ndarray) -> None:
        order = np.argsort(-scores, kind="stable")
        self.scores = scores[order]
        self.sub1, self.sub2 = plan.sub1[order], plan.sub2[order]
        self.ends = np.r_[np.flatnonzero(self.scores[1:] != self.scores[:-1]), scores.size - 1]
        self.gen_pos = np.flatnonzero(plan.labels[order])
        self.gen_through = np.searchsorted(self.gen_pos, self.ends, "right")  # genuine down to a group

    def prefix(self, far_max: float) -> int:
        """Groups a replicate reads first: its impostors reach ``_PREFIX * far_max`` of the set's."""
        imp_through = self.ends + 1 - self.gen_through
        need = min(int(imp_through[-1]), math.ceil(_PREFIX * far_max * imp_through[-1]) + 64)
        groups = int(np.searchsorted(imp_through, need)) + 1
        return self.ends.size if 2 * groups > self.ends.size else groups

    def counts(self, draws: np.ndarray, groups: int) -> _Counts:
        """The weighted ROC of each row of ``draws`` down to group ``groups``, in int64: impostors
        down to each group's end [n, groups]; genuine pairs down to each genuine pair [n, G' + 1],
        read at a group through the third item, ``gen_through``."""
        ends, stop = self.ends[:groups], self.ends[groups - 1] + 1
        s1, s2, through = self.sub1[:stop], self.sub2[:stop], self.gen_through[:groups]
        gen = self.gen_pos[:through[-1]]
        fp = np.empty((len(draws), groups), np.int64)
        gcum = np.zeros((len(draws), gen.size + 1), np.int64)
        w, w2 = np.empty(stop, np.int64), np.empty(stop, np.int64)  # reused: no page faults per row
        for row, d in enumerate(draws):  # a 1-D cumsum per replicate: numpy's 2-D one is slower
            np.multiply(np.take(d, s1, out=w), np.take(d, s2, out=w2), out=w)
            np.cumsum(w[gen], out=gcum[row, 1:])
            w[gen] = 0
            if groups == stop:
                np.cumsum(w, out=fp[row])
            else:
                fp[row] = np.cumsum(w)[ends]
        return fp, gcum, through

    def read(self, draws: np.ndarray, tot_g: np.ndarray, tot_i: np.ndarray,
             fars: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """TAR and threshold [n, F] of each row of ``draws`` at each FAR (NaN where undefined)."""
        tar, thr = np.full((len(draws), len(fars)), np.nan), np.full((len(draws), len(fars)), np.nan)
        if not len(fars):
            return tar, thr
        full, groups = self.ends.size, self.prefix(max(fars))
        for s, n in _blocks(len(draws), groups):
            blk = slice(s, s + n)
            t, grp, redo = _nearest(self.counts(draws[blk], groups), tot_g[blk], tot_i[blk], fars,
                                    groups == full)
            for r in redo + s:  # the answer lies past the prefix: read this replicate on all pairs
                one = slice(r, r + 1)
                t[r - s], grp[r - s], left = _nearest(self.counts(draws[one], full), tot_g[one], tot_i[one],
                                                      fars, True)
                assert not left.size  # on all pairs a window as wide as the ROC always decides
            tar[blk] = t
            thr[blk] = np.where(grp >= 0, self.scores[self.ends[np.maximum(grp, 0)]], np.inf)
            thr[blk][grp == -2] = np.nan
        return tar, thr


def _replicated(plan: SubjectBootstrap, width: int, read: Callable[..., np.ndarray],
                *per_replicate: Estimate) -> tuple[np.ndarray, np.ndarray]:
    """``read(draws, *rows)`` on the unit draws (the point) and on blocks of replicates: (point, reps)."""
    point = read(plan.unit_draws(), *(e.point[None] for e in per_replicate))[0]
    reps = [read(plan.draws[s:s + n], *(e.replicates[s:s + n] for e in per_replicate))
            for s, n in _blocks(plan.replicates, width)]
    return point, np.concatenate(reps)


@dataclass(frozen=True)
class CellBootstrap:
    """One cell's 1:1 bootstrap: ``tar`` and operating ``threshold`` at each resolved FAR (keys
    :func:`far_label`), ``unresolved`` ``{far_label: reason}``, and ``genuine_scores`` [G] in the
    plan's genuine-pair order."""

    plan: SubjectBootstrap
    tar: Estimate
    threshold: Estimate
    unresolved: dict[str, str]
    genuine_scores: np.ndarray

    def summary(self, level: float = 0.95) -> dict[str, dict]:
        """``{far: {"tar", "tar_ci", "threshold", "threshold_ci"}}`` or ``{far: {"unresolved": why}}``."""
        tar, thr = self.tar.as_dict("tar", level), self.threshold.as_dict("threshold", level)
        return {**{k: {**tar[k], **thr[k]} for k in tar}, **{k: {"unresolved": why}
                                                              for k, why in self.unresolved.items()}}


def bootstrap_cell(plan: SubjectBootstrap, scores: np.ndarray, fars: Sequence[float] = metrics.DEFAULT_FARS,
                   *, min_false_accepts: int = MIN_FALSE_ACCEPTS) -> CellBootstrap:
    """TAR@FAR and the operating threshold of one cell, with every replicate's value.

    The point equals ``metrics.tar_at_far(*metrics.roc_curve(scores, labels)[:2])`` and that ROC
    point's threshold; replicate r reads the set expanded by :meth:`SubjectBootstrap.pair_weights`.

    Args:
        plan: the test set's plan. scores: [M] the cell's pair scores in the plan's pair order.
        fars: target FARs; those the set does not resolve go to ``unresolved``.
    """
    scores = plan.check_scores(scores)
    unresolved = {far_label(f): why for f in fars
                  if (why := plan.unresolved_reason(f, min_false_accepts)) is not None}
    kept = [f for f in fars if far_label(f) not in unresolved]
    cell = _SortedCell(plan, scores)
    one = (np.array([plan.num_genuine]), np.array([plan.num_impostors]))
    tar0, thr0 = cell.read(plan.unit_draws(), *one, kept)
    tar, thr = cell.read(plan.draws, plan.total_genuine, plan.total_impostor, kept)
    keys = tuple(far_label(f) for f in kept)
    return CellBootstrap(plan, Estimate(keys, tar0[0], tar), Estimate(keys, thr0[0], thr), unresolved,
                         scores[plan.labels])


def _same_plan(*cells: CellBootstrap) -> SubjectBootstrap:
    if any(c.plan is not cells[0].plan or c.tar.keys != cells[0].tar.keys for c in cells):
        raise BootstrapError("cells: drawn with different plans or FARs; compare cells of one plan")
    return cells[0].plan


def tar_at_thresholds(cell: CellBootstrap, other: CellBootstrap) -> Estimate:
    """TAR of ``cell`` at ``other``'s operating thresholds, replicate by replicate ("at old|old's
    threshold, new|old accepts X% of genuine pairs": the operator keeps today's threshold)."""
    plan = _same_plan(cell, other)
    order = np.argsort(cell.genuine_scores, kind="stable")
    ascending, subjects = cell.genuine_scores[order], plan.genuine_subjects[order]

    def read(draws: np.ndarray, thr: np.ndarray) -> np.ndarray:
        cum = np.zeros((len(draws), ascending.size + 1), np.int64)
        np.cumsum(np.take(draws, subjects, axis=1), axis=1, out=cum[:, 1:])
        below = np.take_along_axis(cum, np.searchsorted(ascending, thr.ravel()).reshape(thr.shape), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(np.isnan(thr), np.nan, (cum[:, -1:] - below) / cum[:, -1:])

    return Estimate(cell.tar.keys, *_replicated(plan, ascending.size, read, other.threshold))


def negative_flip_rate(reference: CellBootstrap, candidate: CellBootstrap, *, at: str = "own") -> Estimate:
    """Churn at the deployed point (DESIGN §5): the share of genuine pairs accepted by ``reference``
    at its threshold and rejected by ``candidate`` at its own (``at="own"``) or at the reference's
    (``at="reference"``), on the same replicates (a genuine pair weighs m[s])."""
    if at not in ("own", "reference"):
        raise BootstrapError(f"at={at!r}: expected 'own' or 'reference'")
    plan = _same_plan(reference, candidate)
    ref_g, cand_g = reference.genuine_scores, candidate.genuine_scores

    def read(draws: np.ndarray, t_ref: np.ndarray, t_cand: np.ndarray) -> np.ndarray:
        w = np.take(draws, plan.genuine_subjects, axis=1)  # [n, G]
        flips = (ref_g >= t_ref[..., None]) & (cand_g < t_cand[..., None])  # [n, F, G]
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = (flips.astype(np.int64) @ w[..., None])[..., 0] / w.sum(1, keepdims=True)
        return np.where(np.isnan(t_ref) | np.isnan(t_cand), np.nan, rate)

    thresholds = (reference.threshold, candidate.threshold if at == "own" else reference.threshold)
    width = ref_g.size * max(len(reference.tar.keys), 1)
    return Estimate(reference.tar.keys, *_replicated(plan, width, read, *thresholds))


def verdicts(margin: Estimate, level: float = 0.95) -> dict[str, dict]:
    """``{key: {"ecc", "margin", "margin_ci"}}`` of a margin (candidate - reference, same plan): ecc
    True when its interval lies above 0, False below, None ("too close to call") when it holds 0."""
    out = margin.as_dict("margin", level)
    for entry in out.values():
        lo, hi = entry["margin_ci"]
        entry["ecc"] = True if lo > 0 else False if hi < 0 else None
    return out


def update_gain(cross: Estimate, old: Estimate, independent: Estimate,
                level: float = 0.95) -> dict[str, dict]:
    """DESIGN §5's (M(new,old) - M(old,old)) / (M(new*,new*) - M(old,old)) per key with its interval
    (``{"update_gain", "update_gain_ci"}``); both None where the denominator's interval holds 0."""
    num, den = cross - old, independent - old
    den_ci = den.interval(level)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = Estimate(num.keys, num.point / den.point, num.replicates / den.replicates)
    ci = ratio.interval(level)
    out = {}
    for k, key in enumerate(num.keys):
        clear = (den_ci[k, 0] > 0 or den_ci[k, 1] < 0) and den.point[k] != 0
        out[key] = {"update_gain": float(ratio.point[k]) if clear else None,
                    "update_gain_ci": [float(ci[k, 0]), float(ci[k, 1])] if clear else None}
    return out


@dataclass(frozen=True)
class ProbeOutcomes:
    """Per probe of one gallery: its subject and :func:`metrics._open_set_scores`' four arrays."""

    probe_subjects: np.ndarray
    mated: np.ndarray
    best_true: np.ndarray
    best_other: np.ndarray
    rank: np.ndarray

    @classmethod
    def from_similarity(cls, similarity: np.ndarray, probe_subjects: np.ndarray,
                        gallery_subjects: np.ndarray) -> ProbeOutcomes:
        """From a [P, G] probe x gallery similarity (one pass, as :func:`metrics.identification`)."""
        return cls(np.asarray(probe_subjects).ravel(),
                   *metrics._open_set_scores(similarity, probe_subjects, gallery_subjects))


@dataclass(frozen=True)
class IdentificationBootstrap:
    """One gallery's 1:N bootstrap: ``cmc`` keyed by ``str(k)``, ``tpir`` by :func:`metrics.fpir_key`."""

    plan: SubjectBootstrap
    cmc: Estimate
    tpir: Estimate
    outcomes: ProbeOutcomes
    probe_index: np.ndarray


def _identification(draws: np.ndarray, o: ProbeOutcomes, idx: np.ndarray, ranks: Sequence[int],
                    fpirs: Sequence[float]) -> np.ndarray:
    """[n, ranks + fpirs]: CMC then TPIR of the probes weighted by each row of ``draws``, read as
    :func:`metrics._cmc_from` / :func:`metrics._tpir_from` read the probes repeated m times."""
    w, num = np.take(draws, idx, axis=1), len(draws)
    mated_w = w[:, o.mated].sum(1)
    hits = w[:, o.mated] @ (o.rank[o.mated][:, None] <= np.asarray(ranks)).astype(np.int64)
    nonmated = np.flatnonzero(~o.mated)
    nonmated = nonmated[np.argsort(-o.best_other[nonmated], kind="stable")]  # best scores, descending
    hit = np.flatnonzero(o.mated & (o.rank == 1))
    hit = hit[np.argsort(o.best_true[hit], kind="stable")]
    hit_cum = np.zeros((num, hit.size + 1), np.int64)
    np.cumsum(w[:, hit], axis=1, out=hit_cum[:, 1:])
    nm_cum = np.zeros((num, nonmated.size + 1), np.int64)
    np.cumsum(w[:, nonmated], axis=1, out=nm_cum[:, 1:])
    nm_total = nm_cum[:, -1]
    scores = np.r_[o.best_other[nonmated], -np.inf]
    thr = np.empty((num, len(fpirs)))
    for f, fpir in enumerate(fpirs):
        # entry max(floor(n * fpir) - 1, 0) of the weighted list: the first whose cumulative weight passes it
        at = np.maximum(np.floor(nm_total * fpir).astype(np.int64) - 1, 0)
        j = np.array([np.searchsorted(c, a, "right") - 1 for c, a in zip(nm_cum, at)], np.int64)
        thr[:, f] = np.where(nm_total > 0, scores[np.minimum(j, nonmated.size)], -np.inf)
    above = hit_cum[:, -1:] - np.take_along_axis(hit_cum, np.searchsorted(o.best_true[hit], thr, "right"), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.concatenate([hits, above], axis=1) / mated_w[:, None]


def bootstrap_identification(plan: SubjectBootstrap, outcomes: ProbeOutcomes,
                             ranks: Sequence[int] = metrics.DEFAULT_RANKS,
                             fpirs: Sequence[float] = metrics.DEFAULT_FPIRS) -> IdentificationBootstrap:
    """Rank-k rates and TPIR@FPIR of one gallery with every replicate's value.

    A probe weighs its subject's multiplicity (mated or not); the gallery is fixed. The points equal
    :func:`metrics.identification`. Pooling G1 and G2 is the caller's: rank-k over both galleries
    from the concatenated outcomes, TPIR per gallery (each has its own threshold), on one plan.
    """
    o = outcomes
    shapes = [np.shape(a) for a in (o.mated, o.best_true, o.best_other, o.rank)]
    if any(s != np.shape(o.probe_subjects) for s in shapes):
        raise BootstrapError(f"outcomes: arrays of shapes {shapes}, probe_subjects "
                             f"{np.shape(o.probe_subjects)}")
    if np.isnan(o.best_true).any() or np.isnan(o.best_other).any():
        raise BootstrapError("outcomes: NaN probe scores")
    idx = plan.subject_index(o.probe_subjects, "probe_subjects")
    point, reps = _replicated(plan, idx.size, lambda d: _identification(d, o, idx, ranks, fpirs))
    k = len(ranks)
    return IdentificationBootstrap(
        plan, Estimate(tuple(str(r) for r in ranks), point[:k], reps[:, :k]),
        Estimate(tuple(metrics.fpir_key(f) for f in fpirs), point[k:], reps[:, k:]), o, idx)


def identification_flip_rate(reference: IdentificationBootstrap,
                             candidate: IdentificationBootstrap) -> Estimate:
    """1:N churn (key "1"): the share of mated probes right at rank 1 in ``reference`` and wrong in
    ``candidate``, on the same replicates; both must hold the same probes of the same gallery."""
    ro, co = reference.outcomes, candidate.outcomes
    same = np.array_equal(reference.probe_index, candidate.probe_index) and np.array_equal(ro.mated, co.mated)
    if reference.plan is not candidate.plan or not same:
        raise BootstrapError("candidate: its plan or probes (subjects, mated set) differ from the reference")
    flips = (ro.mated & (ro.rank == 1) & (co.rank != 1)).astype(np.int64)

    def read(draws: np.ndarray) -> np.ndarray:
        w = np.take(draws, reference.probe_index, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((w @ flips) / (w @ ro.mated.astype(np.int64)))[:, None]

    return Estimate(("1",), *_replicated(reference.plan, flips.size, read))
