"""facecompat.eval.catalog: how a model named on the command line or in a catalog resolves."""

from __future__ import annotations

import shutil

from facecompat.eval.catalog import EvalCatalog, resolve_model
from tests.helpers.models import make_run_dir

NETWORK = "r18-w0.125"


def test_network_names_a_weights_file_and_leaves_run_directories_alone(tmp_path):
    run_dir = make_run_dir(tmp_path / "old", seed=0, network=NETWORK)
    weights = tmp_path / "zoo.pt"
    shutil.copy(run_dir / "model.pt", weights)
    catalog = EvalCatalog()
    # a run directory next to a weights file of another network: each keeps its own
    assert resolve_model(str(run_dir), catalog, network="r50").network == NETWORK
    assert resolve_model(str(weights), catalog, network="r50").network == "r50"
