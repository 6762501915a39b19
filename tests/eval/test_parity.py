"""facecompat.eval.parity: served (ONNX + onnxruntime) against evaluated (PyTorch) features on the tiny
IJB-C set, the 1:1 TAR change, FCT's h exported, and the errors."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facecompat.compat.fct import FCTransform, Transformation
from facecompat.errors import UserError
from facecompat.eval import ijb
from facecompat.eval.extract import extract_features, read_face_list
from facecompat.eval.parity import (
    ParityError,
    export_transform_onnx,
    model_parity,
    onnx_features,
    open_session,
    parity_report,
    transform_parity,
)
from facecompat.fileio import file_sha1
from facecompat.models.onnx_export import export_onnx
from tests.helpers.models import calibrated_model, single_thread

ort = pytest.importorskip("onnxruntime")

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

DIM = 32
FAR_KEYS = ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]  # format(far, "g"), as the certificate
LOADER = {"batch_size": 32, "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def tiny(synthetic_tiny: Path, tmp_path_factory) -> dict:
    """The tiny IJB-C set, a random-weight model, its evaluation features and its model_parity entry."""
    ijbc = synthetic_tiny / "IJBC"
    faces, meta = read_face_list(ijbc), ijb.load_ijb_meta(synthetic_tiny)
    model = calibrated_model("r18-w0.125", embedding_size=DIM)
    torch_feats = extract_features(model, ijbc, faces, **LOADER)
    workdir = tmp_path_factory.mktemp("parity") / "onnx"
    entry = model_parity(model, "runs/old", ijbc, faces, meta, torch_feats, workdir=workdir, **LOADER)
    return {"ijbc": ijbc, "faces": faces, "meta": meta, "model": model, "torch": torch_feats,
            "workdir": workdir, "entry": entry}


def _pair_scores(meta: ijb.IJBMeta, feats: np.ndarray) -> np.ndarray:
    pooled = ijb.pool(meta, feats)
    i1, i2 = meta.pair_rows(pooled.templates)
    return ijb.score_pairs(pooled.exact, pooled.exact, i1, i2)


def test_model_parity_entry(tiny):
    entry, workdir = tiny["entry"], tiny["workdir"]
    assert set(entry) == {"onnx", "sha1", "max_cosine_deviation", "p999_cosine_deviation",
                          "max_norm_rel_diff", "tar_change", "cross_tar_change", "faces", "provider"}
    assert entry["onnx"] == str(workdir / "runs_old.onnx")  # a path-like name becomes a file name
    assert sorted(p.name for p in workdir.iterdir()) == ["runs_old.onnx"]  # atomic: no temp files left
    assert entry["sha1"] == file_sha1(entry["onnx"])
    assert entry["faces"] == len(tiny["faces"]) and entry["provider"] == "CPUExecutionProvider"
    assert 0.0 <= entry["p999_cosine_deviation"] <= entry["max_cosine_deviation"] <= 1e-5
    assert entry["max_norm_rel_diff"] <= 1e-5


def test_tar_change_is_zero_on_this_set(tiny):
    """Exactly 0.0 at every FAR, self and cross: the ONNX features move each pair score by far less than
    the smallest gap between two of the 102 pair scores, so the pairs sort the same, the ROC is the same
    and every TAR@FAR (a ROC point) is the same. A set with near-tied scores could move by one pair."""
    entry = tiny["entry"]
    assert list(entry["tar_change"]) == FAR_KEYS and list(entry["cross_tar_change"]) == FAR_KEYS
    assert set(entry["tar_change"].values()) == {0.0} and set(entry["cross_tar_change"].values()) == {0.0}
    onnx = onnx_features(entry["onnx"], tiny["ijbc"], tiny["faces"], **LOADER)
    before, after = _pair_scores(tiny["meta"], tiny["torch"]), _pair_scores(tiny["meta"], onnx)
    gaps = np.diff(np.unique(before))
    assert np.abs(after - before).max() < gaps.min() / 10


def test_onnx_features_match_evaluation_with_and_without_flip(tiny):
    path = tiny["entry"]["onnx"]
    for flip in (True, False):
        expected = tiny["torch"] if flip else extract_features(tiny["model"], tiny["ijbc"], tiny["faces"],
                                                               flip=False, **LOADER)
        got = onnx_features(path, tiny["ijbc"], tiny["faces"], flip=flip, dim=DIM, **LOADER)
        assert got.shape == (len(tiny["faces"]), DIM) and got.dtype == np.float32
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
        cos = np.einsum("ij,ij->i", got, expected) / norms
        assert 1.0 - cos.min() < 1e-5
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_perturbed_graph_shows_deviation_and_tar_change(tiny, tmp_path):
    perturbed = copy.deepcopy(tiny["model"])
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        perturbed.fc.weight.add_(torch.randn(perturbed.fc.weight.shape, generator=generator)
                                 * perturbed.fc.weight.std())
    export_onnx(perturbed, tmp_path / "perturbed.onnx")
    served = onnx_features(tmp_path / "perturbed.onnx", tiny["ijbc"], tiny["faces"], **LOADER)
    report = parity_report(tiny["torch"], served, tiny["meta"])
    assert report["max_cosine_deviation"] > 0.1 and report["max_norm_rel_diff"] > 0.05
    assert any(report["tar_change"].values()) and any(report["cross_tar_change"].values())
    # given the PyTorch templates, the same numbers
    pooled = ijb.pool(tiny["meta"], tiny["torch"])
    assert parity_report(tiny["torch"], served, tiny["meta"], torch_pooled=pooled) == report


@pytest.mark.parametrize("side", [True, False], ids=["side-info", "no-side-info"])
def test_transform_parity(tmp_path, side):
    old_dim, side_dim, new_dim = 12, 6 if side else 0, 10
    torch.manual_seed(3)
    module = Transformation(old_dim, side_dim, new_dim, hidden=(16,), uncertainty=side)
    transform = FCTransform(module, {"output_norm": 7.5}, tmp_path)
    rng = np.random.default_rng(0)
    old = rng.standard_normal((300, old_dim)).astype(np.float32) * 20
    side_feats = rng.standard_normal((300, side_dim)).astype(np.float32) if side else None
    result = transform_parity(transform, old, side_feats, tmp_path / "onnx", batch_size=128)
    assert result["rows"] == 300 and result["side_information"] is side
    assert result["onnx"] == str(tmp_path / "onnx" / "fct.onnx")
    assert result["sha1"] == file_sha1(result["onnx"])
    assert result["max_cosine_deviation"] < 1e-6
    assert result["max_abs_diff"] < 1e-4 * 7.5  # output_norm applied: unscaled it would be off by ~6.5x
    session = open_session(result["onnx"])
    assert [i.name for i in session.get_inputs()] == (["old", "side"] if side else ["old"])
    assert [o.name for o in session.get_outputs()] == (["prediction", "log_var"] if side else ["prediction"])


def test_transform_export_check_failure_writes_nothing(tmp_path):
    module = Transformation(4, 0, 4, hidden=(8,), uncertainty=False)
    with pytest.raises(ParityError, match="differ"):
        export_transform_onnx(module, tmp_path / "h.onnx", atol=-1.0)  # no difference can pass
    assert list(tmp_path.iterdir()) == []


def test_errors(tiny, tmp_path, monkeypatch):
    assert issubclass(ParityError, UserError) and issubclass(ParityError, RuntimeError)
    path, ijbc, faces = tiny["entry"]["onnx"], tiny["ijbc"], tiny["faces"]
    with pytest.raises(ParityError, match=r"runs_old\.onnx: the graph outputs 32-d embeddings, the PyTorch "
                                          r"features are 16-d"):
        onnx_features(path, ijbc, faces, dim=16, **LOADER)
    with pytest.raises(ParityError, match=r"runs_old\.onnx.*32-d.*16-d"):  # model_parity checks the same
        model_parity(tiny["model"], "runs/old", ijbc, faces, tiny["meta"], tiny["torch"][:, :16],
                     workdir=tmp_path / "w", **LOADER)
    with pytest.raises(ParityError, match="no such ONNX file"):
        onnx_features(tmp_path / "absent.onnx", ijbc, faces, **LOADER)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ParityError, match=r"junk\.onnx: onnxruntime cannot load it"):
        onnx_features(tmp_path / "junk.onnx", ijbc, faces, **LOADER)
    export_transform_onnx(Transformation(DIM, 0, DIM, hidden=(8,)), tmp_path / "h.onnx")
    with pytest.raises(ParityError, match=r"h\.onnx: not a backbone export"):
        onnx_features(tmp_path / "h.onnx", ijbc, faces, **LOADER)
    with pytest.raises(ParityError, match="differ in shape"):
        parity_report(tiny["torch"], tiny["torch"][:, :16], tiny["meta"])

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ParityError, match=r"onnxruntime.*pip install -e \.\[export\]"):
        onnx_features(path, ijbc, faces, **LOADER)
    with pytest.raises(ParityError, match=r"pip install -e \.\[export\]"):
        model_parity(tiny["model"], "new", ijbc, faces, tiny["meta"], tiny["torch"], workdir=tmp_path / "m",
                     **LOADER)
    assert not (tmp_path / "m").exists()  # refused before exporting anything
