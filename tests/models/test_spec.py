"""facecompat.models.spec: a model named by a run directory or a weights file (with its network), its
embedding size read from the weights, and the errors that name the file."""

from __future__ import annotations

import pytest

from facecompat.models.spec import resolve_model_spec
from tests.helpers.models import make_run_dir

NETWORK, EMBEDDING_SIZE = "r18-w0.125", 32


def test_resolve_model_spec(tmp_path):
    old = make_run_dir(tmp_path / "old", 0, NETWORK, EMBEDDING_SIZE)
    assert resolve_model_spec(old) == (NETWORK, EMBEDDING_SIZE, old / "model.pt")
    assert resolve_model_spec(str(old), "r18-w0.25", 64) == ("r18-w0.25", 64, old / "model.pt")
    weights = old / "model.pt"
    # a weights file: the embedding size its embedding layer has, never a default that disagrees
    assert resolve_model_spec(weights, "r50") == ("r50", EMBEDDING_SIZE, weights)
    assert resolve_model_spec(weights, "r50", EMBEDDING_SIZE) == ("r50", EMBEDDING_SIZE, weights)
    with pytest.raises(ValueError, match=rf"model\.pt: .*{EMBEDDING_SIZE}-d, not the 128-d"):
        resolve_model_spec(weights, "r50", 128)
    with pytest.raises(ValueError, match=r"model\.pt: .*--network"):
        resolve_model_spec(weights)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        resolve_model_spec(tmp_path / "missing.pt", "r50")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"half: .*config\.yaml"):
        resolve_model_spec(tmp_path / "half")
