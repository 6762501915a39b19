"""tools/backfill.py: new-model probes against a gallery stored as transformed (FCT) features,
backfilled in each order (the curves: tests/index/test_backfill.py), and the one-line errors before
the work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.gallery import make_gallery_models, write_gallery_catalog
from tests.helpers.models import single_thread
from tests.helpers.tools import load_tool, tool_help

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def fct_catalog(synthetic_tiny, tmp_path_factory):
    """A catalog naming old, new and an (untrained) transformation between them, with one feature
    cache: each model's faces are extracted once."""
    root = tmp_path_factory.mktemp("backfill")
    return write_gallery_catalog(root, synthetic_tiny, make_gallery_models(root / "models"))


def test_backfill_tool_from_fct_gallery(fct_catalog, synthetic_tiny, tmp_path, capsys):
    """tools/backfill.py: new-model probes against a gallery stored as FCT features, re-embedded in
    each order; every curve ends at the new|new 1:N result, uncertainty needs a transformation."""
    from facecompat.eval import ijb

    catalog_path = fct_catalog
    tool = load_tool("backfill")
    out, png = tmp_path / "bf.json", tmp_path / "bf.png"
    assert tool.main(["--config", str(catalog_path), "--query", "new", "--stored", "fct", "--fractions",
                      "0,0.5,1", "--random-runs", "2", "--json", str(out), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "rank1" in text and "area" in text and png.stat().st_size > 1000
    result = json.loads(out.read_text())
    curves = result["orderings"]
    assert list(curves) == ["random", "uncertainty", "distance"]
    assert curves["random"]["runs"] == 2 and "area sd" in text  # the mean of two seeded orderings
    assert curves["random"]["area_sd"]["rank1"] >= 0 and "runs" not in curves["uncertainty"]
    cache = fct_catalog.parent / "cache" / "features"
    new_feats = np.load(next((cache / "new").glob("*.npy")))
    meta = ijb.load_ijb_meta(synthetic_tiny / "IJBC", "IJBC")
    pooled = ijb.pool(meta, new_feats)
    full = ijb.identify_1toN(meta, pooled, pooled)
    # G1 and G2 pooled: rank-1 hits over the mated probes of both (the public evaluator's rate)
    hits = sum(full[g]["cmc"]["1"] * full[g]["num_mated"] for g in full)
    want = hits / sum(full[g]["num_mated"] for g in full)
    for curve in curves.values():
        assert curve["fractions"] == [0.0, 0.5, 1.0]
        assert curve["metric"]["rank1"][-1] == pytest.approx(want)
        assert curve["area"]["rank1"] == pytest.approx(np.mean(curve["metric"]["rank1"]))  # FastFill's area
    capsys.readouterr()
    assert tool.main(["--config", str(catalog_path), "--query", "new", "--stored", "old",
                      "--orderings", "uncertainty"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith("backfill.py: error: ") and "predicts no uncertainty" \
        in errors[0]
    # --json bare: the curves as JSON on stdout, no table
    assert tool.main(["--config", str(catalog_path), "--query", "new", "--stored", "fct", "--fractions",
                      "0,0.5,1", "--random-runs", "1", "--orderings", "distance", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["orderings"]) == ["distance"]


@pytest.mark.parametrize("argv, culprit", [
    (["--json", "{dir}"], "--json"), (["--png", "{dir}"], "--png"), (["--seed", "-1"], "--seed"),
    (["--random-runs", "0"], "--random-runs"), (["--orderings", "random,nope"], "--orderings"),
    (["--device", "cuda:99"], "--device"), (["--fractions", "0,0.3,1"], "--fractions"),
    (["--metric", "rank99"], "--metric"), (["--stored", "new"], "--stored"),
    (["--stored", "nothing"], "nothing")])
def test_backfill_tool_bad_input_one_line_before_the_work(tmp_path, capsys, argv, culprit):
    """Bad flags and outputs stop in one line, exit status 2, before any catalog, meta or model is read
    (the catalog named here does not even exist, except for the model-name case)."""
    tool = load_tool("backfill")
    catalog = tmp_path / "catalog.yaml"
    if culprit == "nothing":
        catalog.write_text("models: {}\n")
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    base = ["--config", str(catalog), "--query", "new", "--stored", "old"]
    try:
        code = tool.main([*base, *argv])
    except SystemExit as exit_:  # argparse refuses it at parse time
        code = exit_.code
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and "backfill.py: error: " in lines[0], captured.err
    assert culprit in lines[0] and "Traceback" not in captured.err


def test_help_names_the_main_arguments(capsys):
    text = tool_help("backfill", capsys)
    for arg in ("--query", "--stored", "--config", "--orderings", "--fractions"):
        assert arg in text, arg
