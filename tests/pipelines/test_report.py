"""The verdict policy (facecompat.pipelines.evaluate.judge: the certificate's rules) and how the report
says it: decisions, margins with intervals, unresolved FARs, 1:N, variants."""

from __future__ import annotations

import numpy as np
import pytest

from facecompat.eval import ijb, matrix
from facecompat.eval.report import backfill_findings, format_summary, next_steps, verdict_lines
from facecompat.pipelines.evaluate import judge
from facecompat.pipelines.quickstart import SIZES, describe_models, variants
from tests.helpers.data import subject_features, write_ijb_meta

NAMES = ("old", "good", "bad", "same", "new", "fct")


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """40 subjects (80 genuine, 3,120 impostor pairs: FAR 1e-2 and 1e-1 resolved). old: noisy; good: its
    space, less noise; bad: another space; same: old itself; fct: a gallery transformation (the good
    space) queried by new (= good)."""
    meta = ijb.load_ijb_meta(write_ijb_meta(tmp_path_factory.mktemp("report") / "IJBC", 40), "IJBC")
    feats = {"old": subject_features(meta, 0, noise=0.9), "good": subject_features(meta, 0, noise=0.3),
             "bad": subject_features(meta, 9, noise=0.3)}
    feats.update(same=feats["old"].copy(), new=feats["good"], fct=subject_features(meta, 0, noise=0.4))
    pooled = {n: ijb.pool(meta, f) for n, f in feats.items()}
    logged: list[str] = []
    verdicts = judge(meta, pooled, list(NAMES), old="old", independent="new", candidates=None, fars=None,
                     transforms=["fct"], replicates=200, log=logged.append)
    cells = [("old", "old"), *[(c, "old") for c in NAMES[1:5]], *[(c, c) for c in NAMES[1:5]], ("new", "fct")]
    results, _ = matrix.evaluate_cells(meta, pooled, cells, use_faiss=False)
    report = {"matrix": results, **verdicts, "models": {}}
    return meta, pooled, report, logged


def test_verdicts_by_interval_at_every_resolved_far(judged):
    _, _, report, logged = judged
    assert report["fars"] == ["1e-02", "1e-01"] and report["ecc_fars"] == ["1e-02"]
    assert list(report["unresolved_fars"]) == ["1e-06", "1e-05", "1e-04", "1e-03"]
    assert report["ecc"]["good"] is True and report["ecc"]["bad"] is False and report["ecc"]["same"] is None
    assert report["ecc_detail"]["same"]["1e-02"]["margin_ci"] == [0.0, 0.0]
    assert report["decision"] == {"good": "compatible", "bad": "incompatible", "same": "too close to call",
                                  "new": "compatible", "fct": report["decision"]["fct"]}
    # the gallery transformation is judged through the new model's queries, never silently dropped
    assert report["cross_cell"]["fct"] == "new|fct" and "fct" in report["ecc"] and not logged
    detail = report["ecc_detail"]["good"]["1e-02"]
    assert detail["margin"] == pytest.approx(detail["cross"] - detail["old"])
    lo, hi = detail["margin_ci"]
    assert 0 < lo <= hi


def test_search_verdicts_read_pooled_rank1(judged):
    _, _, report, _ = judged
    search = report["ecc_search"]
    assert search["bad"]["holds"] is False and search["good"]["holds"] is not False
    assert search["good"]["old"] == pytest.approx(matrix.pooled_rank(report["matrix"], "old|old"))
    assert search["bad"]["cross"] == pytest.approx(matrix.pooled_rank(report["matrix"], "bad|old"))


def test_a_transformation_without_the_new_model_is_named_not_judged(judged):
    meta, pooled, _, _ = judged
    logged: list[str] = []
    verdicts = judge(meta, pooled, ["old", "good", "fct"], old="old", independent=None, candidates=None,
                     fars=None, transforms=["fct"], replicates=20, log=logged.append)
    assert "fct" not in verdicts["ecc"] and logged == [
        "not judged: fct (a gallery transformation is judged by the new model's queries: give --independent)"]


def test_no_resolved_far_no_verdicts(judged):
    meta, pooled, _, _ = judged
    logged: list[str] = []
    assert judge(meta, pooled, ["old", "good"], old="old", independent=None, candidates=None, fars=[1e-4],
                 log=logged.append) == {}
    assert logged == ["no ECC verdicts: 3120 impostor pairs resolve none of FAR 0.0001 (at least 20 false "
                      "accepts are needed)"]


def test_sentences_and_summary_say_the_decision_and_the_interval(judged):
    _, _, report, _ = judged
    lines = verdict_lines(report)
    same = next(line for line in lines if line.startswith("- **same"))
    assert same.startswith("- **same: too close to call**") and "margin +0.00 [+0.00, +0.00] points" in same
    assert next(line for line in lines if line.startswith("- **bad")).startswith("- **bad: incompatible**")
    assert "In 1:N search ECC fails" in next(line for line in lines if line.startswith("- **bad"))
    summary = format_summary(report).splitlines()
    row = next(line for line in summary if line.startswith("good "))
    assert row.rstrip().endswith("compatible") and "holds" in row
    assert any(line.startswith("not resolved by this test set") and "FAR 1e-6, 1e-5, 1e-4, 1e-3" in line
               for line in summary)
    assert "too close" in next(line for line in summary if line.startswith("same "))


def test_a_variant_is_named_wherever_its_numbers_appear(judged):
    """The quickstart's MixBCT runs other settings than the paper's recipe: the summary, report.md's
    compatibility table and the model description say which."""
    ran = variants(SIZES["small"])
    assert sorted(ran["mixbct"]) == ["alpha=0.5", "head_init=old_means"] and "bct" not in ran
    assert "variant: " in describe_models(SIZES["small"])["mixbct"]
    report = dict(judged[2])
    report["models"] = {"good": {"variant": None}, "bad": {"variant": ran["mixbct"]}}
    note = format_summary(report).splitlines()[-1]
    assert note.startswith("bad: variant ") and "alpha=0.5" in note and "head_init=old_means" in note
    del report["models"]["bad"]["variant"]
    assert "variant" not in format_summary(report)
    assert np.isfinite(report["update_gain"]["good"])


def test_backfill_findings_call_out_a_result_against_the_literature():
    def report(unc: float, rnd: float) -> dict:
        area = {"uncertainty": {"area": {"rank1": unc}},
                "random": {"area": {"rank1": rnd}, "area_sd": {"rank1": 0.001}}}
        return {"backfill": area, "models": {"fct": {"held_out_cos_h_new": 0.81}}}

    below = "\n".join(backfill_findings(report(0.60, 0.62)))
    assert "**Against the literature:**" in below and "*below* a random order" in below
    assert "60.00% against 62.00%; random orders vary by ±0.10" in below and "0.810" in below
    above = "\n".join(backfill_findings(report(0.63, 0.62)))
    assert "beats a random order" in above and "Against" not in above
    assert backfill_findings({"backfill": {}}) == []


def test_the_report_ends_with_next_steps_and_names_no_file_outside_the_repository(judged):
    steps = next_steps({**judged[2], "ecc": {"same": None, "good": True}})
    assert steps[0] == "## Next steps" and any("Too close to call: same." in s for s in steps)
    assert any("FAR 1e-6, 1e-5, 1e-4, 1e-3" in s for s in steps)
    assert any("tools/certify.py" in s for s in steps) and any("docs/SERVING.md" in s for s in steps)
    import inspect

    from facecompat.eval import report as module

    assert "DESIGN §" not in inspect.getsource(module.format_report)
    assert "../shared" not in inspect.getsource(module)
