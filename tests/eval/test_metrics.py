"""facecompat.eval.metrics against slow, obviously-correct references."""

from __future__ import annotations

import numpy as np
import pytest

from facecompat.eval import metrics


def _sklearn_roc_reference(scores: np.ndarray, labels: np.ndarray):
    """sklearn's roc_curve(drop_intermediate=True), written out as its source does it."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], labels[order].astype(np.float64)
    idx = [i for i in range(len(s) - 1) if s[i] != s[i + 1]] + [len(s) - 1]
    cum = np.cumsum(y)
    tps = np.array([cum[i] for i in idx])
    fps = np.array([1 + i - cum[i] for i in idx])
    thr = np.array([s[i] for i in idx])
    if len(fps) > 2:
        keep = [0] + [k for k in range(1, len(fps) - 1)
                      if fps[k - 1] - 2 * fps[k] + fps[k + 1] != 0
                      or tps[k - 1] - 2 * tps[k] + tps[k + 1] != 0] + [len(fps) - 1]
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thr]


@pytest.mark.parametrize("seed", range(6))
def test_roc_curve_matches_sklearn_algorithm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 400))
    levels = int(rng.integers(2, 40))  # few distinct values -> many ties, also across labels
    scores = (rng.integers(0, levels, n) / levels).astype(np.float32 if seed % 2 else np.float64)
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    rfpr, rtpr, rthr = _sklearn_roc_reference(scores, labels)
    np.testing.assert_array_equal(fpr, rfpr)
    np.testing.assert_array_equal(tpr, rtpr)
    np.testing.assert_array_equal(thr, rthr)
    assert thr.dtype == scores.dtype


@pytest.mark.parametrize("genuine_share", [0.02, 0.5, 0.95])
def test_roc_curve_ties_across_labels(genuine_share: float) -> None:
    rng = np.random.default_rng(11)
    for n, levels in ((5, 2), (50, 3), (2000, 25), (20000, 400)):
        scores = rng.integers(0, levels, n).astype(np.float32) / levels
        labels = rng.random(n) < genuine_share
        labels[:2] = [True, False]
        for got, want in zip(metrics.roc_curve(scores, labels), _sklearn_roc_reference(scores, labels)):
            np.testing.assert_array_equal(got, want)


def test_roc_curve_continuous_and_edge_cases() -> None:
    rng = np.random.default_rng(7)
    scores = rng.standard_normal(3000)
    labels = rng.random(3000) < 0.05
    scores[labels] += 1.0
    for got, want in zip(metrics.roc_curve(scores, labels), _sklearn_roc_reference(scores, labels)):
        np.testing.assert_array_equal(got, want)
    fpr, tpr, thr = metrics.roc_curve(np.array([0.5, 0.5]), np.array([1, 0]))
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(tpr, [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc_curve(np.array([np.nan, 1.0]), np.array([1, 0]))
    assert np.isnan(metrics.roc_curve(np.array([0.1, 0.2]), np.array([1, 1]))[0]).all()


def test_tar_at_far_nearest_point_and_strict() -> None:
    fpr = np.array([0.0, 1e-5, 3e-5, 2e-4, 1e-3, 0.5, 1.0])
    tpr = np.array([0.0, 0.2, 0.4, 0.6, 0.7, 0.9, 1.0])
    near = metrics.tar_at_far(fpr, tpr, (1e-5, 1e-4, 1e-1))
    # 1e-4: |1e-4 - 3e-5| = 7e-5 < |1e-4 - 2e-4| = 1e-4
    assert near == {"1e-05": 0.2, "1e-04": 0.4, "1e-01": 0.7}
    strict = metrics.tar_at_far_strict(fpr, tpr, (1e-6, 1e-4, 1e-1))
    assert strict == {"1e-06": 0.0, "1e-04": 0.4, "1e-01": 0.7}
    assert metrics.tar_at_far_strict(fpr[1:], tpr[1:], (1e-6,)) == {"1e-06": 0.0}
    # several points at one FAR: the top of the vertical segment, as insightface's flipped ROC gives
    assert metrics.tar_at_far(np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]), (1e-4, 1e-6)) == \
        {"1e-04": 1.0, "1e-06": 1.0}
    assert metrics.tar_at_far(np.array([0.0, 3e-4, 3e-4, 1.0]), np.array([0.1, 0.5, 0.6, 1.0]), (2e-4,)) == \
        {"2e-04": 0.6}


@pytest.mark.parametrize("decimals", [None, 1])
def test_tar_at_far_vs_loop_reference(decimals) -> None:
    """Against insightface's printed convention, written out: flip the ROC, then min(zip(...))."""
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(5000)
    labels = rng.random(5000) < 0.1
    scores[labels] += 2
    if decimals is not None:  # coarse scores: many ties, vertical ROC segments
        scores = np.round(scores, decimals)
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    fars = (1e-4, 1e-3, 1e-2, 1e-1)
    got = metrics.tar_at_far(fpr, tpr, fars)
    flipped_fpr, flipped_tpr = np.flipud(fpr), np.flipud(tpr)
    for far in fars:
        _, best = min(zip(abs(flipped_fpr - far), range(len(flipped_fpr))))
        assert got[metrics.far_key(far)] == flipped_tpr[best]
        assert metrics.tar_at_far_strict(fpr, tpr, (far,))[metrics.far_key(far)] == \
            max(t for f, t in zip(fpr, tpr) if f <= far)


def test_far_and_fpir_keys() -> None:
    assert [metrics.far_key(x) for x in metrics.DEFAULT_FARS] == \
        ["1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"]
    assert [metrics.fpir_key(x) for x in metrics.DEFAULT_FPIRS] == ["0.01", "0.1"]


def test_auc_perfect_and_random() -> None:
    labels = np.r_[np.ones(100), np.zeros(100)]
    assert metrics.auc(*metrics.roc_curve(np.r_[np.ones(100), np.zeros(100)], labels)[:2]) == 1.0
    rng = np.random.default_rng(0)
    random_auc = metrics.auc(*metrics.roc_curve(rng.random(20000), rng.random(20000) < 0.5)[:2])
    assert abs(random_auc - 0.5) < 0.02


def _rank_reference(sim, probe_subjects, gallery_subjects):
    ranks = []
    for p in range(len(probe_subjects)):
        if probe_subjects[p] not in set(gallery_subjects.tolist()):
            continue
        best = max(sim[p, g] for g in range(len(gallery_subjects))
                   if gallery_subjects[g] == probe_subjects[p])
        ranks.append(1 + sum(1 for g in range(len(gallery_subjects))
                             if gallery_subjects[g] != probe_subjects[p] and sim[p, g] > best))
    return np.array(ranks)


def test_cmc_and_tpir_hand_made() -> None:
    gallery = np.array([10, 20, 30])
    probes = np.array([10, 20, 30, 99, 98])  # two non-mated probes
    sim = np.array([[0.9, 0.1, 0.2],    # rank 1, score 0.9
                    [0.5, 0.4, 0.3],    # rank 2
                    [0.8, 0.7, 0.6],    # rank 3
                    [0.3, 0.2, 0.1],    # non-mated best 0.3
                    [0.1, 0.85, 0.2]])  # non-mated best 0.85
    assert metrics.cmc(sim, probes, gallery, (1, 2, 3)) == {"1": 1 / 3, "2": 2 / 3, "3": 1.0}
    # FPIR 0.5: n=2 -> index max(1-1, 0) = 0 -> threshold 0.85 -> probe 0 (0.9 > 0.85) passes
    # FPIR 1.0: index 1 -> threshold 0.3 -> probe 0 only (probes 1, 2 are not rank 1)
    assert metrics.tpir_at_fpir(sim, probes, gallery, (0.5, 1.0)) == {"0.5": 1 / 3, "1": 1 / 3}
    # "above" is strict: a mated score equal to the threshold does not count
    sim[0, 0] = 0.85
    assert metrics.tpir_at_fpir(sim, probes, gallery, (0.5,)) == {"0.5": 0.0}


def test_cmc_tpir_vs_loop_reference() -> None:
    rng = np.random.default_rng(3)
    gallery = rng.permutation(40)[:25]
    probes = rng.integers(0, 40, 200)
    sim = rng.random((200, 25)).astype(np.float32)
    sim[probes[:, None] == gallery[None, :]] += 0.4
    ranks = _rank_reference(sim, probes, gallery)
    got = metrics.cmc(sim, probes, gallery, (1, 5, 10))
    for k in (1, 5, 10):
        assert got[str(k)] == pytest.approx(np.mean(ranks <= k))
    mated = np.isin(probes, gallery)
    nonmated = sorted((sim[p].max() for p in np.flatnonzero(~mated)), reverse=True)
    for fpir in (0.01, 0.1, 0.3):
        thr = nonmated[max(int(np.floor(len(nonmated) * fpir)) - 1, 0)]
        hits = [ranks[i] == 1 and sim[p][gallery == probes[p]].max() > thr
                for i, p in enumerate(np.flatnonzero(mated))]
        assert metrics.tpir_at_fpir(sim, probes, gallery, (fpir,))[metrics.fpir_key(fpir)] == \
            pytest.approx(np.mean(hits))


@pytest.mark.parametrize("block_rows", [1, 7, 256])
def test_cmc_tpir_ties_vs_loop_reference(block_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores on a coarse grid (many ties), several gallery templates per subject, small row blocks."""
    rng = np.random.default_rng(8)
    gallery = rng.integers(0, 30, 45)  # subjects repeat: best true = max over several templates
    probes = rng.integers(0, 40, 300)
    sim = np.round(rng.random((300, 45)), 1)  # 11 distinct values
    before = sim.copy()
    monkeypatch.setattr(metrics._open_set_scores, "__defaults__", (block_rows,))
    ranks = _rank_reference(sim, probes, gallery)
    got = metrics.cmc(sim, probes, gallery, (1, 2, 5))
    for k in (1, 2, 5):
        assert got[str(k)] == np.mean(ranks <= k)
    mated = np.isin(probes, gallery)
    nonmated = sorted((sim[p].max() for p in np.flatnonzero(~mated)), reverse=True)
    tpir = metrics.tpir_at_fpir(sim, probes, gallery, (0.01, 0.1, 0.5))
    for fpir in (0.01, 0.1, 0.5):
        thr = nonmated[max(int(np.floor(len(nonmated) * fpir)) - 1, 0)]
        hits = [ranks[i] == 1 and sim[p][gallery == probes[p]].max() > thr
                for i, p in enumerate(np.flatnonzero(mated))]
        assert tpir[metrics.fpir_key(fpir)] == np.mean(hits)
    both = metrics.identification(sim, probes, gallery, (1, 2, 5), (0.01, 0.1, 0.5))
    assert both == {"cmc": got, "tpir_at_fpir": tpir}
    np.testing.assert_array_equal(sim, before)  # the input is not modified
    # integer scores: the same ranks
    assert metrics.cmc((sim * 10).astype(np.int64), probes, gallery, (1, 2, 5)) == got


@pytest.mark.parametrize("seed", range(6))
def test_refine_tar_at_far_equals_the_exact_roc(seed) -> None:
    """Approximate scores (exact + error <= eps, as float32 arithmetic gives) refined to the exact answer."""
    rng = np.random.default_rng(seed)
    n = 40_000
    labels = (rng.random(n) < 0.02).astype(np.int8)
    # coarse exact scores: many ties and near-ties across labels, where float32 error matters
    exact = np.round(rng.normal(0.0, 0.1, n) + 0.25 * labels, 4 if seed % 2 else 6)
    eps = 3e-5
    approx = (exact + rng.uniform(-eps, eps, n)).astype(np.float32)
    fpr, tpr, thr = metrics.roc_curve(approx, labels)
    calls = []

    def exact_scores(idx):
        calls.append(idx.size)
        return exact[idx]

    fars = (1e-4, 1e-3, 1e-2, 1e-1, 0.5)
    nearest, strict = metrics.refine_tar_at_far(approx, labels, fpr, thr, exact_scores, eps, fars)
    efpr, etpr, _ = metrics.roc_curve(exact, labels)
    assert nearest == metrics.tar_at_far(efpr, etpr, fars)
    assert strict == metrics.tar_at_far_strict(efpr, etpr, fars)
    assert sum(calls) < 5 * n  # local re-scoring, not the whole set each time
    if seed == 0:  # the approximate scores alone do not give the exact answer here
        assert metrics.tar_at_far(fpr, tpr, fars) != nearest or \
            metrics.tar_at_far_strict(fpr, tpr, fars) != strict
