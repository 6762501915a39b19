"""The certificate's figures on a built IJB-style set: subjects, verdicts, thresholds, churn, the report."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from facecompat.eval import bootstrap, ijb, metrics
from facecompat.eval.certificate import (
    CertifyError,
    _cell_scores,
    certify_cells,
    decide,
    operating_far,
    pair_subjects,
)
from facecompat.eval.certificate_report import format_certificate, summary_table
from facecompat.eval.ijb.records import IJBMeta, Subjects
from facecompat.pipelines.certify import _clean
from tests.helpers.data import write_ijb_meta

SUBJECTS, DIM = 60, 16


def _meta(num: int = SUBJECTS) -> IJBMeta:
    """:func:`write_ijb_meta`'s set read back: 1 gallery and 2 probe templates per subject, all pairs."""
    with tempfile.TemporaryDirectory() as tmp:
        return ijb.load_ijb_meta(write_ijb_meta(Path(tmp) / "IJBC", num), "IJBC")


def _features(meta: IJBMeta, centres: np.ndarray, noise: float, seed: int) -> np.ndarray:
    subject_of = {}
    for group in (meta.probes, *meta.galleries.values()):
        subject_of.update(zip(group.template_ids.tolist(), group.subject_ids.tolist()))
    subjects = np.array([subject_of[t] for t in meta.template_ids.tolist()])
    rng = np.random.default_rng(seed)
    noise = noise * rng.standard_normal((meta.num_faces, centres.shape[1]))
    return (centres[subjects] + noise).astype(np.float32)


@pytest.fixture(scope="module")
def built():
    meta = _meta()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((SUBJECTS, DIM))
    feats = {"old": _features(meta, centres, 0.9, 1),
             "good": _features(meta, centres, 0.3, 2),  # the old space, less noise: compatible
             "bad": _features(meta, rng.standard_normal((SUBJECTS, DIM)), 0.3, 3),  # another space
             "same": None}
    feats["same"] = feats["old"].copy()  # identical to old: every margin is exactly 0
    pooled = {k: ijb.pool(meta, v) for k, v in feats.items()}
    cert = certify_cells(meta, pooled, old="old", candidates=["good", "bad", "same"], independent="good",
                         replicates=200, seed=0)
    return meta, pooled, cert


def test_pair_subjects_from_the_csvs_or_from_genuine_components():
    meta = _meta(8)
    s1, s2, source = pair_subjects(meta)
    assert source == "1:N subject ids"
    genuine = meta.pair_labels.astype(bool)
    assert np.array_equal(s1[genuine], s2[genuine]) and (s1[~genuine] != s2[~genuine]).all()
    bare = dataclasses.replace(meta, galleries={}, probes=None)
    c1, c2, source = pair_subjects(bare)
    assert source == "genuine-pair components"
    assert np.array_equal(c1[genuine], c2[genuine]) and np.unique(np.r_[c1, c2]).size == 8
    # the same partition as the subject ids (labels may differ)
    assert np.array_equal(np.unique(np.c_[s1, c1], axis=0)[:, 0], np.unique(s1))
    shifted = Subjects(meta.probes.template_ids, (meta.probes.subject_ids + 1) % 8)
    broken = dataclasses.replace(meta, probes=shifted)
    with pytest.raises(CertifyError, match=r"^IJBC pair file: genuine pair \d+ \d+ joins templates of subj"):
        pair_subjects(broken)


def test_decisions_follow_the_margins(built):
    _, _, cert = built
    assert cert["operating_far"] == "0.01"  # 7,080 impostor pairs: 1e-2 is the smallest resolved FAR
    assert cert["decision"]["good"]["decision"] == "compatible"
    assert cert["decision"]["bad"]["decision"] == "incompatible"
    assert cert["decision"]["same"] == {"far": "0.01", "1:1": None, "1:N": None,
                                        "decision": "too close to call"}
    same = cert["verdicts"]["same"]["0.01"]
    assert same["margin"] == 0.0 and same["margin_ci"] == [0.0, 0.0]
    for far in ("1e-06", "1e-05", "0.0001", "0.001"):
        assert "false accepts < 20" in cert["verdicts"]["good"][far]["unresolved"]
        assert "tar" not in cert["cells"]["old|old"]["1:1"][far]
    assert cert["test_set"] == {
        "subjects": SUBJECTS, "templates": 3 * SUBJECTS, "genuine_pairs": 2 * SUBJECTS,
        "impostor_pairs": 2 * SUBJECTS * (SUBJECTS - 1), "subjects_from": "1:N subject ids",
        "replicates": 200, "seed": 0, "resolved_fars": ["0.01", "0.1"], "mated_probes": 2 * SUBJECTS}
    tar = {k: cert["cells"][k]["1:1"]["0.01"]["tar"] for k in ("old|old", "good|old", "good|good")}
    gain = (tar["good|old"] - tar["old|old"]) / (tar["good|good"] - tar["old|old"])  # good is also new*
    assert cert["verdicts"]["good"]["0.01"]["update_gain"] == pytest.approx(gain)


def test_point_figures_are_the_plain_metrics(built):
    meta, pooled, cert = built
    for key in ("old|old", "good|old", "bad|old"):
        scores = _cell_scores(meta, pooled, *key.split("|"))
        fpr, tpr, thr = metrics.roc_curve(scores, meta.pair_labels)
        entry = cert["cells"][key]["1:1"]["0.01"]
        assert entry["tar"] == metrics.tar_at_far(fpr, tpr, [1e-2])["1e-02"]
        assert entry["threshold"] == pytest.approx(float(thr[metrics._nearest_index(fpr, 1e-2)]))
        assert entry["tar_ci"][0] <= entry["tar"] <= entry["tar_ci"][1]
    result = ijb.identify_1toN(meta, pooled["bad"], pooled["old"])
    pooled_rank1 = metrics.pooled_over_galleries([result[g]["cmc"]["1"] for g in ("G1", "G2")],
                                                 [result[g]["num_mated"] for g in ("G1", "G2")])
    assert cert["cells"]["bad|old"]["1:N"]["rank1"] == pytest.approx(pooled_rank1)


def test_thresholds_and_churn(built):
    meta, pooled, cert = built
    same = cert["thresholds"]["same"]["0.01"]
    assert same["shift"] == 0.0 and same["tar_at_old_threshold"] == same["old_tar"]
    assert cert["churn"]["same"]["0.01"]["negative_flip_rate"] == 0.0
    assert cert["churn"]["1:N"]["same"]["negative_flip_rate"] == 0.0
    # bad|old: by hand, the genuine pairs old|old accepts at its threshold that bad|old rejects at its own
    ref = _cell_scores(meta, pooled, "old", "old")
    cand = _cell_scores(meta, pooled, "bad", "old")
    genuine = meta.pair_labels.astype(bool)
    shift = cert["thresholds"]["bad"]["0.01"]
    t_ref, t_cand = shift["old_threshold"], shift["threshold"]
    want = np.mean((ref[genuine] >= t_ref) & (cand[genuine] < t_cand))
    assert cert["churn"]["bad"]["0.01"]["negative_flip_rate"] == pytest.approx(want)
    assert want > 0.3
    at_old = np.mean(cand[genuine] >= t_ref)
    assert cert["thresholds"]["bad"]["0.01"]["tar_at_old_threshold"] == pytest.approx(at_old)


def test_decide_and_operating_far():
    assert decide(True, True) == "compatible" and decide(True, None) == "too close to call"
    assert decide(None, False) == "incompatible" and decide(False, True) == "incompatible"
    meta = _meta(12)  # 264 impostor pairs: only 1e-1 is resolved
    s1, s2, _ = pair_subjects(meta)
    plan = bootstrap.SubjectBootstrap(s1, s2, meta.pair_labels, replicates=2)
    assert operating_far(plan, metrics.DEFAULT_FARS) == 0.1
    with pytest.raises(CertifyError, match=r"^--far 0.01: this set cannot resolve it \(264 impostor pairs"):
        operating_far(plan, metrics.DEFAULT_FARS, 0.01)
    with pytest.raises(CertifyError, match="no FAR of 1e-06, 0.001 is resolved by 264 impostor pairs"):
        operating_far(plan, (1e-6, 1e-3))


def test_missing_cell_features_are_named(built):
    meta, pooled, _ = built
    with pytest.raises(CertifyError, match="^cell fct|old: no features of fct$"):
        certify_cells(meta, pooled, old="old", candidates=["fct"], replicates=2)


def test_report_reads_as_the_json(built):
    _, _, cert = built
    text = format_certificate({**cert, "target": "IJBC"})
    assert "**good: compatible**" in text and "**bad: incompatible**" in text
    assert "**same: too close to call**" in text
    assert "Not resolved by this set" in text and "FAR 1e-06, 1e-05, 0.0001, 0.001" in text
    assert "| good\\|old |" in text  # a cell name does not split a markdown column
    after = text.split("Not resolved")[1].split("\n", 1)[1]
    assert "FAR 0.001" not in after  # no column at an unresolved FAR
    table = summary_table(cert)
    assert table.splitlines()[0].startswith("candidate") and "compatible" in table
    json.dumps(_clean({"x": float("inf"), "y": [float("nan"), 1.0]}), allow_nan=False)
