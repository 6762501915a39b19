"""facecompat.index.backfill: orderings, the backfill curve on a synthetic IJB 1:N meta, its area and plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from facecompat.eval import ijb
from facecompat.index import backfill
from tests.helpers.errors import raises_one_line


def _meta(template_of_face: list[int], galleries: dict[str, list[int]],
          probes: list[int], subject_of_template: dict[int, int], media_of_face: list[int] | None = None,
          det_scores: np.ndarray | None = None) -> ijb.IJBMeta:
    """An IJBMeta built in memory (no files): faces in the given order, 1:N galleries and probes."""
    num = len(template_of_face)
    tids = np.asarray(template_of_face, np.int64)
    mids = np.asarray(media_of_face if media_of_face is not None else template_of_face, np.int64)
    empty = np.zeros(0, np.int64)
    det = np.ones(num, np.float32) if det_scores is None else det_scores
    meta = ijb.IJBMeta("IJBC", np.array([f"{i}.jpg" for i in range(num)]), np.zeros((num, 5, 2), np.float32),
                       det, tids, mids, empty, empty, empty, np.zeros(0, np.int8))

    def subjects(templates: list[int]) -> ijb.Subjects:
        t = np.sort(np.asarray(templates, np.int64))
        return ijb.Subjects(t, np.array([subject_of_template[x] for x in t.tolist()], np.int64))

    meta.galleries = {name: subjects(t) for name, t in galleries.items()}
    meta.probes = subjects(probes)
    return meta


def _synthetic(seed: int = 0, num_subjects: int = 60, num_nonmated: int = 30, dim: int = 32):
    """Gallery subjects split over G1/G2 (one template each), one probe template per subject plus
    non-mated probes; 1-3 media of 1-2 faces per template; faces shuffled; new features cluster by
    subject, stored ones are noise."""
    rng = np.random.default_rng(seed)
    faces_t, faces_m, subject_of_template = [], [], {}
    galleries: dict[str, list[int]] = {"G1": [], "G2": []}
    probes: list[int] = []
    media = 0
    subjects = list(range(num_subjects)) * 2 + list(range(num_subjects, num_subjects + num_nonmated))
    for t, s in enumerate(subjects, start=1):
        subject_of_template[t] = s
        if t <= num_subjects:
            galleries["G1" if s < num_subjects // 2 else "G2"].append(t)
        else:
            probes.append(t)
        for _ in range(int(rng.integers(1, 4))):
            media += 1
            for _ in range(int(rng.integers(1, 3))):
                faces_t.append(t)
                faces_m.append(media)
    perm = rng.permutation(len(faces_t))
    tids, mids = np.asarray(faces_t)[perm], np.asarray(faces_m)[perm]
    det = rng.uniform(0.5, 1.0, tids.size).astype(np.float32)
    meta = _meta(tids.tolist(), galleries, probes, subject_of_template, mids.tolist(), det)
    subject_of_face = np.array([subject_of_template[t] for t in tids.tolist()])
    centers = rng.standard_normal((num_subjects + num_nonmated, dim))
    new = (centers[subject_of_face] + 0.8 * rng.standard_normal((tids.size, dim))).astype(np.float32)
    noise = rng.standard_normal((tids.size, dim)).astype(np.float32)
    return meta, new, noise


def test_items_and_orderings() -> None:
    meta, new, noise = _synthetic()
    items = backfill.gallery_items(meta)
    gallery_templates = np.r_[meta.galleries["G1"].template_ids, meta.galleries["G2"].template_ids]
    np.testing.assert_array_equal(items, np.flatnonzero(np.isin(meta.template_ids, gallery_templates)))
    n = items.size
    uncertainty = np.random.default_rng(3).random(meta.num_faces)
    orders = {kind: backfill.backfill_order(kind, meta, uncertainty=uncertainty, gallery_stored=noise, seed=1)
              for kind in backfill.ORDERINGS}
    for kind, order in orders.items():
        assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n)), kind
    assert (np.diff(uncertainty[items][orders["uncertainty"]]) <= 0).all()  # largest uncertainty first
    dist = backfill.distance_to_class_mean(meta, noise)
    assert (np.diff(dist[orders["distance"]]) <= 0).all()
    np.testing.assert_array_equal(orders["random"], backfill.backfill_order("random", meta, seed=1))
    assert not np.array_equal(orders["random"], backfill.backfill_order("random", meta, seed=2))
    raises_one_line(ValueError, "ordering 'oracle' is unknown; valid: random, uncertainty, distance",
                    backfill.backfill_order, "oracle", meta)
    raises_one_line(ValueError, "needs uncertainty=", backfill.backfill_order, "uncertainty", meta)
    raises_one_line(ValueError, "needs gallery_stored=", backfill.backfill_order, "distance", meta)
    raises_one_line(ValueError, rf"uncertainty: expected \[N\] with N = {meta.num_faces}",
                    backfill.backfill_order, "uncertainty", meta, uncertainty=uncertainty[items])
    bad = uncertainty.copy()
    bad[items[4]] = np.nan
    raises_one_line(ValueError, f"uncertainty: face row {items[4]} has a NaN", backfill.backfill_order,
                    "uncertainty", meta, uncertainty=bad)


def test_distance_ordering_hand_example() -> None:
    # faces: 0 B1, 1 probe P, 2 A1, 3 B2, 4 A2, 5 B1; subject A = 1 (templates 11, 12), B = 2 (21, 22)
    meta = _meta([21, 31, 11, 22, 12, 21], {"G1": [11, 21], "G2": [12, 22]}, [31],
                 {11: 1, 12: 1, 21: 2, 22: 2, 31: 1})
    stored = np.array([[1, 0], [5, 5], [3, 0], [0, 2], [0, 1], [2, 0]], np.float32)
    np.testing.assert_array_equal(backfill.gallery_items(meta), [0, 2, 3, 4, 5])
    np.testing.assert_array_equal(backfill.item_subjects(meta), [2, 1, 2, 1, 2])
    # A: units (1,0), (0,1) -> mean (.5,.5), cos 1/sqrt(2). B: (1,0), (0,1), (1,0) -> mean (2/3, 1/3),
    # cos (2/3)/(sqrt(5)/3) = 2/sqrt(5) for (1,0) and 1/sqrt(5) for (0,1)
    a, b_near, b_far = 1 - 1 / np.sqrt(2), 1 - 2 / np.sqrt(5), 1 - 1 / np.sqrt(5)
    np.testing.assert_allclose(backfill.distance_to_class_mean(meta, stored), [b_near, a, b_far, a, b_near])
    np.testing.assert_array_equal(backfill.backfill_order("distance", meta, gallery_stored=stored),
                                  [2, 1, 3, 0, 4])  # farthest first, ties in item order


def test_curve_flat_when_stored_equals_new() -> None:
    meta, new, _ = _synthetic()
    order = backfill.backfill_order("random", meta)
    curve = backfill.backfill_curve(meta, new, new, new, order, [0.0, 0.5, 1.0], use_faiss=False)
    assert curve["fractions"] == [0.0, 0.5, 1.0] and curve["galleries"] == ["G1", "G2"]
    n = curve["num_items"]
    assert curve["num_backfilled"] == [0, int(np.floor(0.5 * n + 0.5)), n]
    for name, values in curve["metric"].items():
        assert values[0] == values[1] == values[2], name
        assert curve["area"][name] == pytest.approx(values[0])
    assert set(curve["metric"]) == {"rank1", "rank5", "rank10", "tpir@fpir=0.01", "tpir@fpir=0.1"}


def test_curve_from_noise_to_new_matches_the_1n_evaluation(tmp_path: Path) -> None:
    meta, new, noise = _synthetic()
    full = ijb.evaluate_1toN(meta, new, use_faiss=False)
    order = backfill.backfill_order("random", meta, seed=4)
    curve = backfill.backfill_curve(meta, new, noise, new, order, use_faiss=False)
    assert len(curve["fractions"]) == 11
    rank1 = curve["metric"]["rank1"]
    chance = 1 / meta.galleries["G1"].template_ids.size
    assert rank1[0] < 4 * chance + 0.05  # noise gallery: about chance (1/30 here)
    assert full["G1"]["cmc"]["1"] > 0.8  # and the new model itself is good
    for g in ("G1", "G2"):  # f = 1 is the new|new evaluation, exactly
        assert curve["per_gallery"][g]["rank1"][-1] == full[g]["cmc"]["1"]
        assert curve["per_gallery"][g]["rank10"][-1] == full[g]["cmc"]["10"]
        assert curve["per_gallery"][g]["tpir@fpir=0.01"][-1] == full[g]["tpir_at_fpir"]["0.01"]
    # G1 and G2 pooled: hits in both over the mated probes of both (the public evaluator's rate)
    hits = sum(full[g]["cmc"]["1"] * full[g]["num_mated"] for g in ("G1", "G2"))
    assert rank1[-1] == pytest.approx(hits / (full["G1"]["num_mated"] + full["G2"]["num_mated"]))
    # ... and TPIR the plain mean of the galleries' (each has its own threshold), as that evaluator
    tpir = curve["metric"]["tpir@fpir=0.01"][-1]
    assert tpir == pytest.approx(np.mean([full[g]["tpir_at_fpir"]["0.01"] for g in ("G1", "G2")]))
    assert rank1[-1] > rank1[5] > rank1[0]
    assert curve["area"]["rank1"] == pytest.approx(np.mean(rank1))  # FastFill: the plain mean
    # a pooled probe set gives the same curve; one gallery alone is its per-gallery curve
    pooled = ijb.pool(meta, new)
    again = backfill.backfill_curve(meta, pooled, noise, new, order, use_faiss=False)
    assert again["metric"] == curve["metric"]
    g2 = backfill.backfill_curve(meta, pooled, noise, new, order, [0, 1], galleries=["G2"], use_faiss=False)
    g2_rank1 = curve["per_gallery"]["G2"]["rank1"]
    assert g2["metric"]["rank1"] == [g2_rank1[0], g2_rank1[-1]]
    lines: list[str] = []
    backfill.backfill_curve(meta, pooled, noise, new, order, [0, 1], ranks=(1,), fpirs=(),
                            progress=lines.append, use_faiss=False)
    assert len(lines) == 2 and "rank-1" in lines[0]
    png = backfill.plot_backfill({"random": curve, "same": g2}, tmp_path / "plots" / "backfill.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(png.parent.glob("*.tmp"))
    raises_one_line(ValueError, "has no metric 'rank3'", backfill.plot_backfill, {"random": curve}, png,
                    "rank3")


def test_area_and_fraction_checks() -> None:
    # FastFill's area: the plain mean over evenly spaced fractions (the trapezoid would give 0.75)
    assert backfill.curve_area([0, 0.5, 1], [0, 1, 1]) == pytest.approx(2 / 3)
    assert backfill.curve_area(np.arange(11) / 10, np.arange(11) / 10) == pytest.approx(0.5)
    assert backfill.curve_area([0, 1], [0.3, 0.3]) == pytest.approx(0.3)
    raises_one_line(ValueError, "evenly spaced", backfill.curve_area, [0, 0.25, 1], [0.2, 0.6, 1.0])
    np.testing.assert_array_equal(backfill.num_backfilled(np.array([0, 0.25, 0.5, 1]), 10), [0, 3, 5, 10])
    for bad, match in (([0.1, 1], "start at 0 and end at 1"), ([0, 0.9], "start at 0 and end at 1"),
                       ([0, 0.5, 0.5, 1], "strictly increasing"),
                       ([0, 0.3, 1], "evenly spaced"), ([0, 0.7, 0.4, 1], "strictly increasing"),
                       ([0], "at least 2"), ([[0, 1]], "at least 2"), ([0, np.nan, 1], "finite"),
                       (["a", "b"], "numbers")):
        raises_one_line(ValueError, match, backfill.check_fractions, bad)
    raises_one_line(ValueError, "3 curve values for 2 fractions", backfill.curve_area, [0, 1], [1, 2, 3])
    meta, new, noise = _synthetic(num_subjects=8, num_nonmated=4, dim=8)
    order = backfill.backfill_order("random", meta)
    raises_one_line(ValueError, "start at 0", backfill.backfill_curve, meta, new, noise, new, order, [0.5, 1])
    raises_one_line(ValueError, "permutation", backfill.backfill_curve, meta, new, noise, new, order[:-1])
    raises_one_line(ValueError, "permutation", backfill.backfill_curve, meta, new, noise, new,
                    np.zeros_like(order))
    raises_one_line(ValueError, "16-d, the probe features 8-d", backfill.backfill_curve, meta, new, np.ones(
        (meta.num_faces, 16)), new, order)
    raises_one_line(ValueError, r"gallery_new: expected \[N, D\]", backfill.backfill_curve, meta, new, noise,
                    new[:3], order)
    nan = noise.copy()
    item = backfill.gallery_items(meta)[2]
    nan[item, 1] = np.nan
    raises_one_line(ValueError, f"gallery_stored: face row {item} has a NaN", backfill.backfill_curve, meta,
                    new, nan, new, order)
    raises_one_line(ValueError, r"galleries \['G3'\]", backfill.backfill_curve, meta, new, noise, new, order,
                    galleries=["G3"])


def test_galleries_of_different_sizes_pool_rank_and_average_tpir() -> None:
    """G1 with 30 mated probes, G2 cut to 10: rank-1 over both is hits over 40 probes (the public
    cross-model evaluator's rate), not the mean of the two galleries' rates; TPIR is their mean."""
    meta, new, noise = _synthetic(seed=2)
    g2 = meta.galleries["G2"]
    small_g2 = ijb.Subjects(g2.template_ids[:10], g2.subject_ids[:10])
    meta = dataclasses.replace(meta, galleries={"G1": meta.galleries["G1"], "G2": small_g2})
    mixed = np.where(np.arange(meta.num_faces)[:, None] % 2 == 0, new, noise)  # half-informative gallery
    order = backfill.backfill_order("random", meta, seed=0)
    curve = backfill.backfill_curve(meta, new, mixed, new, order, [0, 1], use_faiss=False)
    per = ijb.evaluate_1toN(meta, new, mixed, use_faiss=False)
    mated = {g: per[g]["num_mated"] for g in per}
    assert mated["G1"] != mated["G2"]
    pooled = sum(per[g]["cmc"]["1"] * mated[g] for g in per) / sum(mated.values())
    assert curve["metric"]["rank1"][0] == pytest.approx(pooled)
    assert abs(pooled - np.mean([per[g]["cmc"]["1"] for g in per])) > 1e-3  # the two rules differ here
    assert curve["metric"]["tpir@fpir=0.1"][0] == pytest.approx(np.mean([per[g]["tpir_at_fpir"]["0.1"]
                                                                         for g in per]))
