"""facecompat.eval.bootstrap: point estimates against metrics, replicates against an explicit
expansion of the resampled set, and the statistical behaviour the certificate relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from facecompat.errors import UserError
from facecompat.eval import bootstrap as bs
from facecompat.eval import metrics

FARS = (1e-3, 3e-3, 1e-2, 0.05, 0.1, 0.3)


def _pairs(seed: int, num_subjects: int, num_pairs: int, levels: int, genuine_share: float = 0.2,
           dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random pairs over subjects; scores on ``levels`` values, so ties within and across labels."""
    rng = np.random.default_rng(seed)
    s1, s2 = rng.integers(0, num_subjects, num_pairs), rng.integers(0, num_subjects, num_pairs)
    genuine = rng.random(num_pairs) < genuine_share
    s2[genuine] = s1[genuine]
    labels = s1 == s2
    scores = np.floor((rng.random(num_pairs) + 0.6 * labels) * levels) / levels
    return s1 * 7 + 3, s2 * 7 + 3, labels, scores.astype(dtype)  # ids need not be 0..S-1


def _expanded_roc(plan: bs.SubjectBootstrap, r: int, scores: np.ndarray, fars=FARS):
    """(tar, threshold) per FAR of replicate r, by repeating every pair as often as it is drawn
    (NaN when the replicate drew no genuine or no impostor pair)."""
    w = plan.pair_weights(r)
    if not (w[plan.labels].any() and w[~plan.labels].any()):
        return [np.nan] * len(fars), [np.nan] * len(fars)
    fpr, tpr, thr = metrics.roc_curve(np.repeat(scores, w), np.repeat(plan.labels, w))
    return ([metrics.tar_at_far(fpr, tpr, [f])[metrics.far_key(f)] for f in fars],
            [thr[metrics._nearest_index(fpr, f)] for f in fars])


@pytest.mark.parametrize("seed", range(8))
def test_point_estimates_equal_metrics_with_ties(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    s1, s2, labels, scores = _pairs(seed, int(rng.integers(2, 40)), int(rng.integers(30, 3000)),
                                    int(rng.integers(2, 200)), dtype=np.float32 if seed % 2 else np.float64)
    plan = bs.SubjectBootstrap(s1, s2, labels, replicates=3, seed=seed)
    cell = bs.bootstrap_cell(plan, scores, FARS, min_false_accepts=0)
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    want = metrics.tar_at_far(fpr, tpr, FARS)
    assert cell.tar.keys == tuple(format(f, "g") for f in FARS)
    np.testing.assert_array_equal(cell.tar.point, [want[metrics.far_key(f)] for f in FARS])
    np.testing.assert_array_equal(cell.threshold.point, [thr[metrics._nearest_index(fpr, f)] for f in FARS])


@pytest.mark.parametrize(("window", "prefix"), [(32, 1.5), (1, 0.2)])
def test_replicates_equal_the_explicitly_expanded_set(window: int, prefix: float,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # (1, 0.2): windows and prefixes far too small, so every widening and the all-pairs redo run
    monkeypatch.setattr(bs, "_WINDOW", window)
    monkeypatch.setattr(bs, "_PREFIX", prefix)
    undefined = 0
    cases = [(2, 60, 5), (6, 300, 4), (25, 4000, 30), (40, 12000, 10**6)]
    for seed, (subjects, pairs, levels) in enumerate(cases):
        s1, s2, labels, scores = _pairs(seed, subjects, pairs, levels)
        plan = bs.SubjectBootstrap(s1, s2, labels, replicates=8, seed=seed)
        cell = bs.bootstrap_cell(plan, scores, FARS, min_false_accepts=0)
        for r in range(plan.replicates):
            tar, thr = _expanded_roc(plan, r, scores)
            np.testing.assert_array_equal(cell.tar.replicates[r], tar)
            np.testing.assert_array_equal(cell.threshold.replicates[r], thr)
            undefined += np.isnan(tar[0])
    assert undefined  # a replicate that drew one of the 2 subjects twice has no impostor pair


def test_all_ones_weights_reproduce_the_unweighted_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bs, "_WINDOW", 1)
    monkeypatch.setattr(bs, "_PREFIX", 0.2)
    s1, s2, labels, scores = _pairs(3, 30, 5000, 40)
    plan = bs.SubjectBootstrap(s1, s2, labels, replicates=2, seed=1)
    plan.draws[0] = 1  # replicate 0 forced to draw every subject once
    plan.total_genuine[0], plan.total_impostor[0] = plan.num_genuine, plan.num_impostors
    cell = bs.bootstrap_cell(plan, scores, FARS, min_false_accepts=0)
    np.testing.assert_array_equal(cell.tar.replicates[0], cell.tar.point)
    np.testing.assert_array_equal(cell.threshold.replicates[0], cell.threshold.point)
    np.testing.assert_array_equal(plan.pair_weights(0), np.ones(labels.size))


def test_pair_weights_and_totals() -> None:
    s1, s2, labels, _ = _pairs(5, 12, 800, 10)
    plan = bs.SubjectBootstrap(s1, s2, labels, replicates=6, seed=9)
    for r in range(6):
        m = dict(zip(plan.subjects, plan.counts(r)))
        assert sum(m.values()) == plan.subjects.size
        want = [m[a] if g else m[a] * m[b] for a, b, g in zip(s1, s2, labels)]
        w = plan.pair_weights(r)
        assert w.dtype == np.int64
        np.testing.assert_array_equal(w, want)
        assert plan.total_genuine[r] == w[labels].sum() and plan.total_impostor[r] == w[~labels].sum()


def test_determinism_replicates_blocks_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    s1, s2, labels, scores = _pairs(2, 30, 6000, 10**6)
    a = bs.bootstrap_cell(bs.SubjectBootstrap(s1, s2, labels, replicates=40, seed=4), scores, FARS)
    monkeypatch.setattr(bs, "_BLOCK", 5000)  # other blocks of replicates and subject rows
    longer = bs.SubjectBootstrap(s1, s2, labels, replicates=60, seed=4)
    b = bs.bootstrap_cell(longer, scores, FARS)
    np.testing.assert_array_equal(a.tar.replicates, b.tar.replicates[:40])  # replicate r from (seed, r)
    np.testing.assert_array_equal(a.threshold.replicates, b.threshold.replicates[:40])
    np.testing.assert_array_equal(a.tar.interval(), bs.bootstrap_cell(
        bs.SubjectBootstrap(s1, s2, labels, replicates=40, seed=4), scores, FARS).tar.interval())
    other = bs.bootstrap_cell(bs.SubjectBootstrap(s1, s2, labels, replicates=40, seed=5), scores, FARS)
    assert not np.array_equal(a.tar.replicates, other.tar.replicates)
    assert not np.array_equal(a.plan.draws, other.plan.draws)
    # one BLAS thread in a fresh process: the same integers (the impostor totals use BLAS)
    code = ("import json, sys; sys.path.insert(0, %r); import test_bootstrap as t; "
            "from facecompat.eval import bootstrap as bs; s1, s2, y, sc = t._pairs(2, 30, 6000, 10**6); "
            "p = bs.SubjectBootstrap(s1, s2, y, replicates=60, seed=4); "
            "c = bs.bootstrap_cell(p, sc, t.FARS); "
            "print(json.dumps([p.total_impostor.tolist(), c.tar.replicates.tolist()]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code % os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, check=True).stdout
    totals, reps = json.loads(out)
    assert totals == longer.total_impostor.tolist()
    np.testing.assert_array_equal(np.array(reps), b.tar.replicates)


def test_other_threshold_and_negative_flips_equal_the_expansion() -> None:
    s1, s2, labels, old = _pairs(7, 20, 5000, 50)
    rng = np.random.default_rng(7)
    new = np.where(labels, old + rng.normal(0.05, 0.2, old.size), old + rng.normal(0, 0.1, old.size))
    plan = bs.SubjectBootstrap(s1, s2, labels, replicates=12, seed=2)
    fars = (0.01, 0.1)
    ref, cand = bs.bootstrap_cell(plan, old, fars), bs.bootstrap_cell(plan, new, fars)
    at_old = bs.tar_at_thresholds(cand, ref)
    own, kept = bs.negative_flip_rate(ref, cand), bs.negative_flip_rate(ref, cand, at="reference")
    g_old, g_new = old[labels], new[labels]
    for r in range(-1, plan.replicates):  # -1: the point estimates (every weight 1)
        w = np.ones(g_old.size, int) if r < 0 else plan.pair_weights(r)[labels]
        pick = (lambda e: e.point) if r < 0 else (lambda e, r=r: e.replicates[r])
        t_old, t_new = pick(ref.threshold), pick(cand.threshold)
        e_old, e_new = np.repeat(g_old, w), np.repeat(g_new, w)
        for k in range(len(fars)):
            assert pick(at_old)[k] == np.mean(e_new >= t_old[k])
            assert pick(own)[k] == np.mean((e_old >= t_old[k]) & (e_new < t_new[k]))
            assert pick(kept)[k] == np.mean((e_old >= t_old[k]) & (e_new < t_old[k]))
    np.testing.assert_array_equal(bs.tar_at_thresholds(ref, ref).replicates, ref.tar.replicates)


def _identification_case(seed: int):
    rng = np.random.default_rng(seed)
    subjects = int(rng.integers(4, 40))
    gallery = rng.integers(0, subjects // 2 + 1, int(rng.integers(2, 60)))
    probes = rng.integers(0, subjects, int(rng.integers(5, 300)))
    sim = np.round(rng.random((probes.size, gallery.size)) * 10) / 10  # ties
    sim[probes[:, None] == gallery[None]] += 0.4 * rng.random()
    return np.arange(subjects), probes, gallery, sim


@pytest.mark.parametrize("seed", range(6))
def test_identification_point_and_replicates(seed: int) -> None:
    subjects, probes, gallery, sim = _identification_case(seed)
    plan = bs.SubjectBootstrap(subjects, subjects, np.ones(subjects.size, bool), replicates=15, seed=seed)
    ranks, fpirs = (1, 2, 5), (0.01, 0.1, 0.3)
    o = bs.ProbeOutcomes.from_similarity(sim, probes, gallery)
    res = bs.bootstrap_identification(plan, o, ranks, fpirs)
    want = metrics.identification(sim, probes, gallery, ranks, fpirs)
    np.testing.assert_array_equal(res.cmc.point, list(want["cmc"].values()))
    np.testing.assert_array_equal(res.tpir.point, list(want["tpir_at_fpir"].values()))
    assert res.tpir.keys == ("0.01", "0.1", "0.3") and res.cmc.keys == ("1", "2", "5")
    for r in range(plan.replicates):
        m = plan.draws[r, plan.subject_index(probes)]  # the gallery stays; probes repeat
        mated, best_true, best_other, rank = (np.repeat(a, m) for a in
                                              (o.mated, o.best_true, o.best_other, o.rank))
        cmc = metrics._cmc_from(mated, rank, ranks)
        np.testing.assert_array_equal(res.cmc.replicates[r], list(cmc.values()))
        np.testing.assert_array_equal(res.tpir.replicates[r], list(
            metrics._tpir_from(mated, best_true, best_other, rank, fpirs).values()))


def test_identification_flips_and_margin() -> None:
    subjects, probes, gallery, sim = _identification_case(4)
    plan = bs.SubjectBootstrap(subjects, subjects, np.ones(subjects.size, bool), replicates=30, seed=1)
    rng = np.random.default_rng(0)
    before = bs.bootstrap_identification(plan, bs.ProbeOutcomes.from_similarity(sim, probes, gallery))
    after = bs.bootstrap_identification(plan, bs.ProbeOutcomes.from_similarity(
        sim + rng.normal(0, 0.3, sim.shape), probes, gallery))
    flips = bs.identification_flip_rate(before, after)
    lost = before.outcomes.mated & (before.outcomes.rank == 1) & (after.outcomes.rank != 1)
    assert flips.point[0] == lost.sum() / before.outcomes.mated.sum() > 0
    for r in range(plan.replicates):
        m = plan.draws[r, before.probe_index]
        assert flips.replicates[r, 0] == (m * lost).sum() / (m * before.outcomes.mated).sum()
    margin = after.cmc - before.cmc
    np.testing.assert_array_equal(margin.replicates, after.cmc.replicates - before.cmc.replicates)
    assert set(bs.verdicts(margin)) == {"1", "5", "10"}
    with pytest.raises(bs.BootstrapError, match="probe_subjects"):
        bs.bootstrap_identification(plan, bs.ProbeOutcomes.from_similarity(sim, probes + 100, gallery + 100))


def _clustered(seed: int, shift: float = 0.0, spread: float = 0.25, noise: float = 0.05, mean: float = 0.5,
               model: int = 0):
    """30 subjects x 40 genuine pairs with a per-subject random effect; 30,000 impostor pairs. The
    set and the effects come from ``seed``; the pair-level noise from ``model`` (another model of
    the same quality)."""
    rng = np.random.default_rng(seed)
    subjects, per = 30, 40
    effect = rng.normal(0, spread, subjects)
    gs = np.repeat(np.arange(subjects), per)
    i1 = rng.integers(0, subjects, 30_000)
    i2 = (i1 + rng.integers(1, subjects, i1.size)) % subjects
    labels = np.r_[np.ones(gs.size, bool), np.zeros(i1.size, bool)]
    rng = np.random.default_rng([seed, model])
    scores = np.r_[mean + effect[gs] + rng.normal(0, noise, gs.size), rng.normal(0, 0.1, i1.size)]
    return np.r_[gs, i1], np.r_[gs, i2], labels, scores + shift * labels


def test_subject_bootstrap_is_wider_than_a_binomial_over_pairs() -> None:
    s1, s2, labels, scores = _clustered(0)
    plan = bs.SubjectBootstrap(s1, s2, labels, replicates=400, seed=0)
    cell = bs.bootstrap_cell(plan, scores, (0.01,))
    p = cell.tar.point[0]
    assert 0.2 < p < 0.9
    binomial = 2 * 1.96 * np.sqrt(p * (1 - p) / plan.num_genuine)
    lo, hi = cell.tar.interval()[0]
    assert lo <= p <= hi
    assert hi - lo > 2.5 * binomial


def test_margin_verdicts_identical_better_worse() -> None:
    s1, s2, labels, scores = _clustered(1, spread=0.1, mean=0.2)
    plan = bs.SubjectBootstrap(s1, s2, labels, replicates=300, seed=3)
    fars = (0.01, 0.1)
    old = bs.bootstrap_cell(plan, scores, fars)
    same = bs.verdicts(bs.bootstrap_cell(plan, scores.copy(), fars).tar - old.tar)
    assert all(v["ecc"] is None and v["margin_ci"] == [0.0, 0.0] for v in same.values())
    similar = bs.bootstrap_cell(plan, _clustered(1, spread=0.1, mean=0.2, model=1)[3], fars)  # same quality
    for v in bs.verdicts(similar.tar - old.tar).values():
        assert v["ecc"] is None and v["margin_ci"][0] <= 0 <= v["margin_ci"][1] and v["margin"] != 0
    better = bs.verdicts(bs.bootstrap_cell(plan, scores + 0.1 * labels, fars).tar - old.tar)
    worse = bs.verdicts(bs.bootstrap_cell(plan, scores - 0.1 * labels, fars).tar - old.tar)
    assert [v["ecc"] for v in better.values()] == [True, True]
    assert [v["ecc"] for v in worse.values()] == [False, False]
    assert all(v["margin_ci"][0] > 0 for v in better.values())


def test_update_gain() -> None:
    s1, s2, labels, scores = _clustered(2, spread=0.1, mean=0.2)
    plan = bs.SubjectBootstrap(s1, s2, labels, replicates=200, seed=0)
    fars = (0.01,)
    old = bs.bootstrap_cell(plan, scores, fars).tar
    cross = bs.bootstrap_cell(plan, scores + 0.05 * labels, fars).tar
    new = bs.bootstrap_cell(plan, scores + 0.15 * labels, fars).tar
    gain = bs.update_gain(cross, old, new)["0.01"]
    want = (cross.point[0] - old.point[0]) / (new.point[0] - old.point[0])
    assert gain["update_gain"] == pytest.approx(want)
    lo, hi = gain["update_gain_ci"]
    assert 0 < lo <= gain["update_gain"] <= hi < 1
    assert bs.update_gain(cross, old, old)["0.01"] == {"update_gain": None, "update_gain_ci": None}


def test_unresolved_fars_are_reported_not_computed() -> None:
    s1, s2, labels, scores = _pairs(1, 20, 3000, 10**6)
    plan = bs.SubjectBootstrap(s1, s2, labels, replicates=5)
    cell = bs.bootstrap_cell(plan, scores, (1e-4, 1e-2, 0.1))
    n = plan.num_impostors
    assert n * 1e-2 >= 20 > n * 1e-4
    assert cell.tar.keys == ("0.01", "0.1") and cell.tar.replicates.shape == (5, 2)
    summary = cell.summary()
    assert set(summary["0.0001"]) == {"unresolved"} and "< 20" in summary["0.0001"]["unresolved"]
    assert set(summary["0.01"]) == {"tar", "tar_ci", "threshold", "threshold_ci"}
    assert bs.bootstrap_cell(plan, scores, (1e-4,), min_false_accepts=0).tar.keys == ("0.0001",)
    nothing = bs.bootstrap_cell(plan, scores, (1e-5,))
    assert nothing.tar.keys == () and list(nothing.summary()) == ["1e-05"]


def test_errors_name_the_argument() -> None:
    s1, s2, labels, scores = _pairs(0, 10, 200, 10)
    cases = [
        (lambda: bs.SubjectBootstrap(s1, s2[:-1], labels), "pair_subject2"),
        (lambda: bs.SubjectBootstrap(s1, s2, labels[:-1]), "labels"),
        (lambda: bs.SubjectBootstrap(s1, np.where(labels, s2 + 1, s2), labels), "genuine pair"),
        (lambda: bs.SubjectBootstrap(s1, s2, labels, replicates=0), "replicates=0"),
        (lambda: bs.SubjectBootstrap(s1, s2, labels, replicates=2.5), "replicates=2.5"),
        (lambda: bs.SubjectBootstrap(s1, s2, labels, seed=-1), "seed=-1"),
    ]
    plan = bs.SubjectBootstrap(s1, s2, labels, replicates=2)
    cases += [
        (lambda: bs.bootstrap_cell(plan, scores[:-1]), "scores: 199 values"),
        (lambda: bs.bootstrap_cell(plan, np.where(np.arange(200) == 17, np.nan, scores)), "first at pair 17"),
        (lambda: bs.negative_flip_rate(bs.bootstrap_cell(plan, scores), bs.bootstrap_cell(
            bs.SubjectBootstrap(s1, s2, labels, replicates=2), scores)), "different plans"),
    ]
    for call, text in cases:
        with pytest.raises(bs.BootstrapError, match=text) as info:
            call()
        assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
        assert "\n" not in str(info.value)


def test_percentile_interval_order_statistics() -> None:
    reps = np.c_[np.arange(1000.0), np.r_[np.full(10, np.nan), np.arange(990.0)], np.full(1000, np.nan),
                 np.r_[np.arange(970.0), np.full(30, np.inf)]]
    ci = bs.percentile_interval(reps)
    np.testing.assert_array_equal(ci[0], [24, 975])  # floor / ceil of 2.5% / 97.5% of 999
    np.testing.assert_array_equal(ci[1], [24, 965])  # NaN replicates left out
    assert np.isnan(ci[2]).all()
    assert ci[3, 1] == np.inf and ci[3, 0] == 24
