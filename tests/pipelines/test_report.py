"""facecompat.eval.report: how close a verdict is, in genuine pairs, and where the report says so."""

from __future__ import annotations

import math

import pytest

from facecompat.eval.matrix import search_compatibility
from facecompat.eval.report import ecc_margin, format_summary, verdict_lines
from facecompat.pipelines.quickstart import SIZES, describe_models, variants

FAR = "1e-02"


def _report(tars: dict[str, float], pairs: int | None = 1200, impostors: int | None = 1000) -> dict:
    old = tars["old|old"]
    ecc = {"new": tars["new|old"] > old, "mixbct": tars["mixbct|old"] > old}
    return {"ecc_fars": [FAR], "fars": [FAR], "ecc": ecc,
            "cross_cell": {"new": "new|old", "mixbct": "mixbct|old"},
            "update_gain": {name: 0.0 for name in ecc},
            "matrix": {cell: {"1:1": {"tar_at_far": {FAR: tar}}} for cell, tar in tars.items()},
            "pairs": pairs, "impostor_pairs": impostors}


def test_margin_counts_genuine_pairs_against_one_binomial_standard_error():
    # 200 genuine pairs, old|old accepts 100 (se = sqrt(200 * 0.5 * 0.5) = 7.07 pairs)
    report = _report({"old|old": 0.5, "new|old": 0.1, "mixbct|old": 0.515})
    close = ecc_margin(report, "mixbct")
    assert close["pairs"] == 3 and close["genuine"] == 200 and close["close"]
    assert math.isclose(close["se_pairs"], math.sqrt(50))
    far = ecc_margin(report, "new")
    assert far["pairs"] == -80 and not far["close"]
    report["matrix"]["mixbct|old"]["1:1"]["tar_at_far"][FAR] = 0.54  # 8 pairs: beyond one se
    assert not ecc_margin(report, "mixbct")["close"]


def test_close_verdicts_are_flagged_in_the_sentences_and_the_summary():
    report = _report({"old|old": 0.5, "new|old": 0.1, "mixbct|old": 0.505})
    lines = verdict_lines(report)
    mix = next(line for line in lines if line.startswith("- **mixbct**"))
    assert "compatible" in mix and "margin is 1 of 200 genuine pairs" in mix and "too close to call" in mix
    assert "too close" not in next(line for line in lines if line.startswith("- **new**"))
    summary = format_summary(report).splitlines()
    assert summary[-1].startswith("mixbct: margin is 1 of 200 genuine pairs")
    assert sum("too close" in line for line in summary) == 1


def test_no_pair_counts_no_margin():
    report = _report({"old|old": 0.5, "new|old": 0.1, "mixbct|old": 0.505}, pairs=None, impostors=None)
    assert ecc_margin(report, "mixbct") is None
    assert not any("too close" in line for line in [*verdict_lines(report), format_summary(report)])


def _with_search(report: dict, rank1: dict[str, float]) -> dict:
    for cell, r in rank1.items():  # G1 (30 mated probes) and G2 (10): pooled = r, the plain mean r + 0.01
        report["matrix"].setdefault(cell, {})["1:N"] = {"G1": {"cmc": {"1": r - 0.01}, "num_mated": 30},
                                                        "G2": {"cmc": {"1": r + 0.03}, "num_mated": 10}}
    report["ecc_search"] = search_compatibility(report["matrix"], ["new", "mixbct"], "old")
    return report


def test_search_ecc_compares_pooled_rank1_with_old_old():
    report = _with_search(_report({"old|old": 0.5, "new|old": 0.1, "mixbct|old": 0.49}),
                          {"old|old": 0.80, "new|old": 0.05, "mixbct|old": 0.90})
    search = report["ecc_search"]
    assert search["mixbct"] == {"cell": "mixbct|old", "cross": pytest.approx(0.90),
                                "old": pytest.approx(0.80), "holds": True}
    assert not search["new"]["holds"]
    # 1:1 fails, 1:N holds: both are said
    mix = next(line for line in verdict_lines(report) if line.startswith("- **mixbct**"))
    assert mix.startswith("- **mixbct**: NOT compatible") and "In 1:N search it holds: rank-1 90.00%" in mix
    row = next(line for line in format_summary(report).splitlines() if line.startswith("mixbct"))
    assert row.split()[-2:] == ["90.00", "holds"] and "FAILS" in row.split()
    assert "ECC against old|old's 80.00" in format_summary(report).splitlines()[0]
    with pytest.raises(KeyError, match="cell l2\\|old has no 1:N results"):
        search_compatibility(report["matrix"], ["l2"], "old")


def test_a_variant_is_named_wherever_its_numbers_appear():
    """The quickstart's MixBCT runs other settings than the paper's recipe: the summary, report.md's
    compatibility table and the model description say which."""
    ran = variants(SIZES["small"])
    assert sorted(ran["mixbct"]) == ["alpha=0.5", "head_init=old_means"] and "bct" not in ran
    assert "variant: " in describe_models(SIZES["small"])["mixbct"]
    report = _report({"old|old": 0.5, "new|old": 0.1, "mixbct|old": 0.6})
    report["models"] = {"new": {"variant": None}, "mixbct": {"variant": ran["mixbct"]}}
    note = format_summary(report).splitlines()[-1]
    assert note.startswith("mixbct: variant ") and "alpha=0.5" in note and "head_init=old_means" in note
    del report["models"]["mixbct"]["variant"]
    assert "variant" not in format_summary(report)
