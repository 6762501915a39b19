"""The miniature quickstart: every stage on tiny data, the report's structure (DESIGN §8), the verdicts
(the independent model incompatible, MixBCT far into the old space; at the README's size, MixBCT
compatible), resuming and redoing (tools/quickstart.py: tests/tools/test_quickstart.py)."""

from __future__ import annotations

import json
import os

import pytest

from facecompat.eval import metrics
from facecompat.pipelines.quickstart import (
    CANDIDATES,
    CATALOG_NAME,
    MODELS,
    STAGES,
    next_commands,
    run_quickstart,
)
from tests.helpers import REPO
from tests.helpers.tools import load_tool

pytestmark = pytest.mark.timeout(900)  # the first test also runs the whole tiny quickstart (minutes)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    logs: list[str] = []
    state = run_quickstart(work, size="tiny", workers=2, progress=False, config_dir=REPO / "configs",
                           log=logs.append)
    return work, state, json.loads((work / "report.json").read_text())


def _pooled_rank1(cell: dict) -> float:
    """Rank-1 hits in G1 and G2 over the mated probes of both (DESIGN §5), computed here."""
    galleries = cell["1:N"].values()
    return sum(g["cmc"]["1"] * g["num_mated"] for g in galleries) / sum(g["num_mated"] for g in galleries)


def test_every_stage_ran_and_wrote_its_outputs(tiny):
    work, state, _ = tiny
    assert state["size"] == "tiny" and list(state["stages"]) == list(STAGES)
    for name in ("old", "new", "bct", "l2", "mixbct", "side"):
        assert (work / "runs" / name / "model.pt").is_file()
        assert state["stages"][name]["steps"] > 0
    assert (work / "runs" / "fct" / "transform.pt").is_file()
    for png in ("roc.png", "backfill.png"):
        assert (work / png).read_bytes()[:8] == PNG_MAGIC
    # one old-feature bank for bct, l2 and mixbct (and FCT), built once
    assert len(list((work / "runs" / "banks").glob("old-*"))) == 1


def test_report_json_has_the_design_schema(tiny):
    _, _, report = tiny
    assert report["old"] == "old" and report["independent"] == "new"
    assert set(report["models"]) >= {*MODELS, "fct"}
    cells = {f"{q}|{g}" for q in MODELS for g in MODELS} | {"new|fct"}
    assert set(report["matrix"]) == cells
    far_keys = {metrics.far_key(f) for f in metrics.DEFAULT_FARS}
    for cell in report["matrix"].values():
        one = cell["1:1"]
        assert set(one["tar_at_far"]) == far_keys and set(one["tar_at_far_strict"]) == far_keys
        assert all(0.0 <= v <= 1.0 for v in one["tar_at_far"].values())
        assert 0.0 <= one["auc"] <= 1.0
        assert set(cell["1:N"]) == {"G1", "G2"}
        for gallery in cell["1:N"].values():
            assert set(gallery["cmc"]) == {"1", "5", "10"} and set(gallery["tpir_at_fpir"]) == {"0.01", "0.1"}
            assert gallery["cmc"]["1"] <= gallery["cmc"]["5"] <= gallery["cmc"]["10"]
    assert set(report["ecc"]) == set(CANDIDATES)
    assert all(v in (True, False, None) for v in report["ecc"].values())
    assert set(report["update_gain"]) == set(CANDIDATES)
    # the certificate's figures (DESIGN §8): the report is its own upgrade's certificate
    genuine = report["pairs"] - report["impostor_pairs"]
    assert report["test_set"]["genuine_pairs"] == genuine
    assert report["test_set"]["impostor_pairs"] == report["impostor_pairs"]
    assert set(report["verdicts"]) == set(CANDIDATES) and set(report["churn"]) == {*CANDIDATES, "1:N"}
    far = report["operating_far"]
    assert set(report["cells"]["old|old"]["1:1"][far]) == {"tar", "tar_ci", "threshold", "threshold_ci"}
    assert set(report["ecc_search"]) == set(CANDIDATES)
    assert report["ecc_search"]["fct"]["cell"] == "new|fct"
    assert set(report["backfill"]) == {"random", "distance", "uncertainty"}
    for curve in report["backfill"].values():
        assert set(curve) >= {"fractions", "metric", "area"}
        assert curve["fractions"][0] == 0.0 and curve["fractions"][-1] == 1.0
        assert len(curve["metric"]["rank1"]) == len(curve["fractions"])


def _tars(report: dict) -> dict[str, float]:
    far = report["ecc_fars"][0]
    return {cell: v["1:1"]["tar_at_far"][far] for cell, v in report["matrix"].items()}


def test_verdicts_follow_their_definitions(tiny):
    _, _, report = tiny
    tar = _tars(report)
    first = report["ecc_fars"][0]
    genuine = report["pairs"] - report["impostor_pairs"]
    label = report["operating_far"]
    for name, holds in report["ecc"].items():
        cell = report["cross_cell"][name]
        detail = report["ecc_detail"][name]
        for d in detail.values():  # holds when the interval is above 0, fails below, else too close
            lo, hi = d["margin_ci"]
            assert d["holds"] == (True if lo > 0 else False if hi < 0 else None)
            assert d["margin"] == pytest.approx(d["cross"] - d["old"])
        assert holds == detail[first]["holds"]
        # the certificate reads float32 scores, the matrix re-scores near each FAR in float64: a pair at most
        assert abs(detail[first]["cross"] - tar[cell]) <= 1.0 / genuine + 1e-9
        new_new, old_old = (report["cells"][c]["1:1"][label]["tar"] for c in ("new|new", "old|old"))
        gain = report["update_gain"][name]
        assert gain is None or gain == pytest.approx((detail[first]["cross"] - old_old) / (new_new - old_old))
    assert report["cross_cell"]["fct"] == "new|fct" and report["cross_cell"]["mixbct"] == "mixbct|old"


def test_the_independent_model_is_incompatible_and_mixbct_moves_into_the_old_space(tiny):
    _, _, report = tiny
    tar = _tars(report)
    auc = {cell: v["1:1"]["auc"] for cell, v in report["matrix"].items()}
    # The tiny set has 47 genuine pairs: a TAR moves in steps of 2.1 points and another float path
    # (here: one vs two math threads) moves a trained model's TAR at FAR 1e-1 by 2-9 points, so
    # TAR comparisons need margins of several pairs. Measured at one / two threads:
    # TAR old|old 0.872 / 0.851, new|new 0.936 / 0.979, new|old 0.213 / 0.191, mixbct|old
    # 0.851 / 0.936; AUC (over all 1,416 pairs) old|old 0.955 / 0.962, new|new 0.985 / 0.990,
    # mixbct|mixbct 0.981 / 0.986, new|old 0.539 / 0.529.
    # Both new models are better than the old one on their own (AUC: 3-4 times its wobble) ...
    assert auc["new|new"] > auc["old|old"] and auc["mixbct|mixbct"] > auc["old|old"], auc
    # ... the independent one is at chance against the old gallery (AUC 0.5): ECC fails by far
    assert report["ecc"]["new"] is False and auc["new|old"] < 0.65 < auc["old|old"] - 0.2, auc
    assert report["decision"]["new"]["decision"] == "incompatible"
    # MixBCT's queries find the old gallery's faces many times more often than the independent
    # model's, in 1:1 and in 1:N. (Beating old|old takes more steps than CI has:
    # test_small_quickstart_holds_search_ecc...)
    assert tar["mixbct|old"] > max(3 * tar["new|old"], 0.3 * tar["old|old"])
    search = report["ecc_search"]
    assert search["new"]["holds"] is False and search["mixbct"]["cross"] > 3 * search["new"]["cross"]
    gain = report["update_gain"]
    assert gain["mixbct"] is None or gain["new"] is None or gain["mixbct"] > gain["new"] + 0.3


@pytest.mark.timeout(3600)  # 11 minutes with two math threads, 16 with one (tools/test.sh's workers)
@pytest.mark.skipif(not os.environ.get("FACECOMPAT_SLOW"),
                    reason="the README's size, 5-14 minutes on 2 cores: FACECOMPAT_SLOW=1 runs it")
def test_small_quickstart_holds_search_ecc_for_mixbct_and_not_for_the_independent_model(tmp_path):
    run_quickstart(tmp_path, size="small", progress=False, config_dir=REPO / "configs", log=lambda _: None)
    report = json.loads((tmp_path / "report.json").read_text())
    # 1:N search (rank-1, G1 and G2 pooled): MixBCT's queries find old-gallery identities better than
    # the old model's own (90.1% against 87.6% with two math threads after issue 16's fixes; the run
    # with one math thread passes too); the independent model's do not (4.1%).
    assert report["ecc_search"]["mixbct"]["margin"] > 0 and report["ecc_search"]["new"]["holds"] is False
    # 1:1 at FAR 1e-2 on 121 genuine pairs: MixBCT 80.2 vs old|old 75.2 with two math threads: the
    # subject-bootstrap interval of that margin holds 0 (too close to call on this set); the independent
    # model fails by far.
    assert report["ecc"]["new"] is False and report["ecc"]["mixbct"] is not False


def test_backfill_ends_are_the_stored_and_the_new_gallery(tiny):
    _, _, report = tiny
    # nothing backfilled: the FCT-upgraded gallery (new|fct); everything: the new model's own gallery
    for curve in report["backfill"].values():
        assert curve["metric"]["rank1"][0] == pytest.approx(_pooled_rank1(report["matrix"]["new|fct"]))
        assert curve["metric"]["rank1"][-1] == pytest.approx(_pooled_rank1(report["matrix"]["new|new"]))
    base = report["backfill_baseline"]["orderings"]["random"]
    assert base["metric"]["rank1"][0] == pytest.approx(_pooled_rank1(report["matrix"]["new|old"]))


def test_report_md_states_the_verdicts(tiny):
    work, _, report = tiny
    text = (work / "report.md").read_text()
    for name in report["ecc"]:
        assert f"**{name}: {report['decision'][name]['decision']}**" in text
    assert "![ROC" in text and "(roc.png)" in text and "(backfill.png)" in text
    for name in (*MODELS, "fct"):
        assert f"| {name} |" in text
    # the MixBCT that ran is named as the variant it is, beside its numbers
    assert sorted(report["models"]["mixbct"]["variant"]) == ["alpha=0.5", "head_init=old_means"]
    assert "- mixbct: variant " in text and report["models"]["bct"]["variant"] is None


def test_the_next_commands_run_on_its_outputs(tiny, capsys):
    """The quickstart writes an evaluation catalog of its models and prints the next commands; they run
    on its outputs (features cached: no extraction)."""
    work, _, report = tiny
    catalog = work / CATALOG_NAME
    commands = next_commands(work)
    assert commands[0] == f"python tools/eval_ijbc.py --config {catalog} --query new --gallery old"
    assert load_tool("eval_ijbc").main(commands[0].split()[2:] + ["--json", str(work / "next.json")]) == 0
    cross = json.loads((work / "next.json").read_text())
    assert cross["matrix"]["new|old"]["1:1"] == report["matrix"]["new|old"]["1:1"]
    argv = commands[1].split()[2:] + ["--replicates", "50", "--parity"]
    assert load_tool("certify").main(argv) == 0, capsys.readouterr().err
    cert = json.loads((work / "certificate" / "certificate.json").read_text())
    assert cert["cross_cells"]["fct"] == "new|fct" and set(cert["decision"]) == set(CANDIDATES)
    assert cert["decision"]["new"]["decision"] == report["decision"]["new"]["decision"]
    # store version ids, so a gallery matches the certificate's pairs by the ids its rows carry
    from facecompat.index.store import model_version_id
    from tests.helpers.models import model_spec

    assert cert["versions"]["bct"] == model_version_id(model_spec(work / "runs" / "bct").fingerprint())
    assert cert["versions"]["fct"].startswith("fct-") and set(cert["versions"]) == {"old", *CANDIDATES}
    # deployment parity: every backbone as an ONNX graph in onnxruntime, FCT's h as its own graph
    parity = cert["parity"]
    assert set(parity) == set(CANDIDATES)
    one_pair = 1.0 / report["test_set"]["genuine_pairs"] + 1e-9
    for name in ("new", "bct", "l2", "mixbct"):
        assert parity[name]["max_cosine_deviation"] < 1e-4
        assert (work / "certificate" / "onnx" / f"{name}.onnx").is_file()
        assert all(abs(v) <= one_pair for v in parity[name]["tar_change"].values())
    assert parity["fct"]["max_cosine_deviation"] < 1e-4 and parity["fct"]["side_information"]
    assert "## Deployment parity" in (work / "certificate" / "certificate.md").read_text()


def test_rerun_skips_finished_stages_and_redoes_what_is_gone(tiny):
    work, state, report = tiny
    logs: list[str] = []
    again = run_quickstart(work, size="tiny", workers=2, progress=False, config_dir=REPO / "configs",
                           log=logs.append)
    assert again["stages"] == state["stages"] and all("done before" in line for line in logs)

    (work / "backfill.png").unlink()  # an output gone: its stage and the later ones run again
    logs.clear()
    redone = run_quickstart(work, size="tiny", workers=2, progress=False, config_dir=REPO / "configs",
                            log=logs.append)
    ran = [line.split()[1] for line in logs if line.endswith("...")]
    assert ran == ["backfill", "report"] and (work / "backfill.png").is_file()
    assert json.loads((work / "report.json").read_text())["backfill"] == report["backfill"]
    assert redone["stages"]["evaluate"] == state["stages"]["evaluate"]


def test_on_a_gpu_the_recipes_use_dali_and_bf16_and_the_sizes_grow(tmp_path):
    from facecompat.config import load_config
    from facecompat.pipelines.quickstart import (
        RECIPES,
        SIZES,
        QuickstartContext,
        _training_overrides,
        pick_size,
    )

    gpu = QuickstartContext(tmp_path, SIZES["large"], None, False, device="cuda")
    cpu = QuickstartContext(tmp_path, SIZES["small"], None, False, device="cpu")
    for name, recipe in RECIPES.items():
        on_gpu = load_config(REPO / "configs" / recipe, _training_overrides(gpu, name, 1))
        on_cpu = load_config(REPO / "configs" / recipe, _training_overrides(cpu, name, 1))
        assert (on_gpu.data.loader, on_gpu.model.precision) == ("auto", "auto")
        assert (on_cpu.data.loader, on_cpu.model.precision) == ("torch", "fp32")
    assert on_gpu.model.network == "r18-w0.25" and on_cpu.model.network == "r18-w0.0625"  # side: old's
    assert SIZES["large"].data["num_ids"] > SIZES["small"].data["num_ids"] > SIZES["tiny"].data["num_ids"]
    assert pick_size("auto") == "small"  # no CUDA here
    with pytest.raises(ValueError, match="huge"):
        pick_size("huge")
