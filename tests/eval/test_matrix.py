"""facecompat.eval.matrix: the verdict table of a cross-model matrix, faces dropped from an IJB-C
evaluation."""

from __future__ import annotations

import numpy as np

from facecompat.eval import ijb, matrix
from tests.helpers.data import subject_features, write_ijb_meta


def test_verdict_table_shows_margins_decisions_and_unresolved_fars(tmp_path):
    from facecompat.pipelines.evaluate import judge

    meta = ijb.load_ijb_meta(write_ijb_meta(tmp_path / "IJBC", 40), "IJBC")
    feats = {"old": subject_features(meta, 0, noise=0.9), "bct": subject_features(meta, 0, noise=0.3),
             "new": subject_features(meta, 4, noise=0.3)}
    pooled = {n: ijb.pool(meta, f) for n, f in feats.items()}
    v = judge(meta, pooled, list(feats), old="old", independent="new", candidates=None, fars=None,
              replicates=50)
    table = matrix.format_verdicts(v).splitlines()
    assert table[0].split()[:4] == ["model", "cross", "@1e-2", "@1e-1"] and "decision @1e-2" in table[0]
    bct = next(line for line in table if line.startswith("bct "))
    assert "holds +" in bct and bct.rstrip().endswith("compatible")
    assert next(line for line in table if line.startswith("new ")).rstrip().endswith("incompatible")
    assert table[-1] == ("not resolved by this set (fewer than 20 impostor pairs above the threshold): "
                         "FAR 1e-6, 1e-5, 1e-4, 1e-3")


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


def test_a_six_by_six_roc_has_no_two_curves_alike_and_keeps_its_legend(tmp_path):
    names = ["old", "new", "bct", "l2", "mixbct", "fct"]
    keys = [f"{q}|{g}" for q in names for g in names]
    styles = matrix.roc_styles(keys)
    assert len({(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}) == 36
    fpr = np.logspace(-6, 0, 20)
    curves = {k: (fpr, np.linspace(0.1, 1.0, 20)) for k in keys}
    path = matrix.plot_roc(curves, tmp_path / "roc.png", "36 curves")
    import cv2

    height, width = cv2.imread(str(path)).shape[:2]
    assert width > 1.5 * height  # widened for the legend beside the axes
