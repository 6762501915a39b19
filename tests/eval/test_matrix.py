"""facecompat.eval.matrix: the compatibility verdicts and update gain of a cross-model matrix, faces
dropped from an IJB-C evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from facecompat.eval import ijb, matrix


def test_compatibility_verdicts_and_gain():
    def cell(tar):
        return {"1:1": {"tar_at_far": {"1e-04": tar, "1e-03": tar + 0.05}}}

    results = {"old|old": cell(0.50), "new|new": cell(0.90), "bct|old": cell(0.60), "new|old": cell(0.0),
               "l2|old": cell(0.50)}
    v = matrix.compatibility(results, ["old", "new", "bct", "l2"], "old", "new", (1e-4, 1e-3))
    assert v["ecc"] == {"new": False, "bct": True, "l2": False}
    assert v["update_gain"]["bct"] == pytest.approx(0.25) and v["update_gain"]["new"] == pytest.approx(-1.25)
    assert v["ecc_detail"]["bct"]["1e-03"] == {"cross": 0.65, "old": 0.55, "holds": True}
    table = matrix.format_verdicts(v)
    assert "holds" in table and "fails" in table and "+0.250" in table
    # an independent model no better than the old one: no gain, not a division by zero
    results["new|new"] = cell(0.50)
    assert matrix.compatibility(results, ["bct"], "old", "new")["update_gain"]["bct"] is None
    with pytest.raises(KeyError, match="mixbct|old"):
        matrix.compatibility(results, ["mixbct"], "old", "new")


def test_drop_faces_counts(synthetic_tiny):
    meta = ijb.load_ijb_meta(synthetic_tiny)
    gallery = meta.galleries["G1"]
    t = int(gallery.template_ids[0])
    faces = np.flatnonzero(meta.template_ids == t)
    reduced, counts = matrix.drop_faces(meta, faces[:1])
    assert counts["templates"] == (1 if faces.size == 1 else 0) and reduced.num_faces == meta.num_faces
    reduced, counts = matrix.drop_faces(meta, faces)
    assert counts == {"faces": faces.size, "templates": 1,
                      "pairs": int(((meta.pair_t1 == t) | (meta.pair_t2 == t)).sum()), "probes": 0,
                      "gallery_templates": 1}
    assert t not in reduced.galleries["G1"].template_ids and t in meta.galleries["G1"].template_ids
    assert matrix.scores_file_name("a/b", "c d") == "a_b__c_d.npy"
