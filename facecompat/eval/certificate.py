"""The upgrade certificate's figures: per cell TAR and operating threshold with subject-bootstrap
intervals, ECC verdicts, threshold shifts and churn (DESIGN §5 and §8).

    cert = certify_cells(meta, pooled, old="old", candidates=["bct"], independent="new")
    cert["verdicts"]["bct"]["0.001"]  # {"ecc": True | False | None, "margin", "margin_ci", ...}

**One verdict logic.** Every FAR the set resolves (at least :data:`bootstrap.MIN_FALSE_ACCEPTS` impostor
pairs above the threshold) gets a verdict; the others are listed as unresolved with the reason and no
number. At a resolved FAR, ECC holds (True) when the whole 95% interval of the margin ``TAR(cand|old) -
TAR(old|old)`` lies above 0, fails (False) when it lies below, and is "too close to call" (None)
otherwise. The **operating FAR** is the smallest resolved FAR of the requested ones (a caller may name
another). 1:N is judged the same way on rank-1 (G1 and G2 pooled: MixBCT's rate). The **decision** at
the operating FAR: "compatible" when the 1:1 verdict holds and the 1:N one (where the set has 1:N)
holds too; "incompatible" when either fails; otherwise "too close to call". A model that is compatible
in verification but loses rank-1 in search is not compatible: a gallery serves both.

**Subjects.** IJB's 1:N CSVs name each template's subject; every 1:1 template is among them. Where a
set has no 1:N files, subjects are the connected components of the genuine-pair graph (templates joined
by a genuine pair are one subject's): the bootstrap then cannot see that two unjoined templates share a
subject, so its intervals can only be narrower; the certificate says which source was used.

**Scores.** Pair scores are the float32 cosines 1:1 evaluation computes (:func:`ijb.verify.score_pairs`);
the matrix's TAR@FAR re-scores pairs near each FAR in float64 (insightface's arithmetic), so a
certificate's point TAR can differ from the matrix's by a pair at a tie.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from facecompat.errors import UserError
from facecompat.eval import bootstrap, metrics
from facecompat.eval.ijb.identify import _similarity
from facecompat.eval.ijb.pooling import Pooled
from facecompat.eval.ijb.records import IJBMeta
from facecompat.eval.ijb.verify import score_pairs
from facecompat.eval.matrix import cell_key

CERTIFICATE_FARS = metrics.DEFAULT_FARS  # 1e-6 .. 1e-1; those a set cannot resolve are marked
DECISIONS = ("compatible", "incompatible", "too close to call")


class CertifyError(UserError, ValueError):
    """A certificate that cannot be made from what was given (one line)."""


def _components(t1: np.ndarray, t2: np.ndarray, genuine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(templates [T] sorted, component id [T]): templates joined by genuine pairs share an id."""
    templates = np.unique(np.concatenate([t1, t2]))
    parent = np.arange(templates.size)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    a, b = np.searchsorted(templates, t1[genuine]), np.searchsorted(templates, t2[genuine])
    for i, j in zip(a.tolist(), b.tolist()):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return templates, np.array([find(i) for i in range(templates.size)], np.int64)


def pair_subjects(meta: IJBMeta) -> tuple[np.ndarray, np.ndarray, str]:
    """The subjects of every pair's two templates, and where they came from.

    Returns:
        (subject1 [M], subject2 [M], source): source ``"1:N subject ids"`` when the 1:N CSVs name every
        pair template's subject, else ``"genuine-pair components"`` (see the module docstring).
    Raises:
        CertifyError: a genuine pair whose two templates the CSVs give to different subjects.
    """
    t1, t2, genuine = meta.pair_t1, meta.pair_t2, meta.pair_labels.astype(bool)
    known = [meta.probes, *meta.galleries.values()] if meta.probes is not None else []
    if known:
        ids = np.concatenate([s.template_ids for s in known])
        subs = np.concatenate([s.subject_ids for s in known])
        ids, first = np.unique(ids, return_index=True)
        subs = subs[first]
        pos1 = np.minimum(np.searchsorted(ids, t1), ids.size - 1)
        pos2 = np.minimum(np.searchsorted(ids, t2), ids.size - 1)
        if (ids[pos1] == t1).all() and (ids[pos2] == t2).all():
            s1, s2 = subs[pos1], subs[pos2]
            bad = np.flatnonzero(genuine & (s1 != s2))
            if bad.size:
                k = int(bad[0])
                raise CertifyError(f"{meta.target} pair file: genuine pair {t1[k]} {t2[k]} joins templates "
                                   f"of subjects {s1[k]} and {s2[k]} in the 1:N CSVs ({bad.size} such pairs)")
            return s1, s2, "1:N subject ids"
    templates, comp = _components(t1, t2, genuine)
    source = "genuine-pair components"
    return comp[np.searchsorted(templates, t1)], comp[np.searchsorted(templates, t2)], source


def _cell_scores(meta: IJBMeta, pooled: Mapping[str, Pooled], query: str, gallery: str) -> np.ndarray:
    """[M] float32 scores of cell ``query|gallery``: the gallery model's first template against the query
    model's second (DESIGN §5), as :func:`ijb.verify_1to1` scores them."""
    q, g = pooled[query], pooled[gallery]
    i1, i2 = meta.pair_rows(q.templates)
    return score_pairs(g.feats, q.feats, i1, i2)


def _probe_outcomes(meta: IJBMeta, pooled: Mapping[str, Pooled], query: str, gallery: str,
                    use_faiss: bool) -> bootstrap.ProbeOutcomes:
    """Every gallery's probe outcomes of one cell, concatenated (G1 then G2): rank-1 read over them is
    the pooled rate of DESIGN §5."""
    q, g = pooled[query], pooled[gallery]
    probes = meta.probes
    probe_feats = q.feats[q.rows(probes.template_ids, "1:N probe CSV")]
    parts = []
    for name, subjects in meta.galleries.items():
        sim = _similarity(probe_feats, g.feats[g.rows(subjects.template_ids, f"1:N gallery {name} CSV")],
                          use_faiss)
        parts.append(bootstrap.ProbeOutcomes.from_similarity(sim, probes.subject_ids, subjects.subject_ids))
        del sim
    return bootstrap.ProbeOutcomes(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                                     ("probe_subjects", "mated", "best_true", "best_other", "rank")))


def decide(one_to_one: bool | None, one_to_n: bool | None) -> str:
    """The decision at the operating FAR from the 1:1 verdict and the 1:N one (None: too close to call;
    pass ``one_to_n=True`` where the set has no 1:N): both hold -> compatible, either fails ->
    incompatible, else too close to call."""
    if one_to_one is False or one_to_n is False:
        return "incompatible"
    if one_to_one is True and one_to_n is True:
        return "compatible"
    return "too close to call"


def operating_far(plan: bootstrap.SubjectBootstrap, fars: Sequence[float],
                  requested: float | None = None) -> float:
    """The FAR the decision is taken at: ``requested`` (CertifyError when the set cannot resolve it), else
    the smallest of ``fars`` the set resolves."""
    if requested is not None:
        why = plan.unresolved_reason(requested)
        if why is not None:
            raise CertifyError(f"--far {requested:g}: this set cannot resolve it ({why})")
        return requested
    resolved = [f for f in sorted(fars) if plan.unresolved_reason(f) is None]
    if not resolved:
        raise CertifyError(f"no FAR of {', '.join(f'{f:g}' for f in fars)} is resolved by "
                           f"{plan.num_impostors} impostor pairs (at least {bootstrap.MIN_FALSE_ACCEPTS} "
                           "false accepts are needed)")
    return resolved[0]


def _one(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def certify_cells(meta: IJBMeta, pooled: Mapping[str, Pooled], *, old: str, candidates: Sequence[str],
                  independent: str | None = None, cross_cells: Mapping[str, str] | None = None,
                  new_cells: Mapping[str, str] | None = None, fars: Sequence[float] = CERTIFICATE_FARS,
                  far: float | None = None, replicates: int = 1000, seed: int = 0,
                  use_faiss: bool = True, progress=None) -> dict:
    """The certificate's figures for ``candidates`` against the ``old`` gallery.

    Args:
        meta, pooled: the IJB meta and every model's pooled templates (names as in the cells).
        old: the deployed model; old|old is the reference cell.
        candidates: the models (or gallery upgrades) to certify.
        independent: the independently trained new model (update gains against new*|new*), if evaluated.
        cross_cells: candidate -> its cross cell (default ``<cand>|<old>``; an FCT gallery: ``new|fct``).
        new_cells: candidate -> its cell after a full backfill (default ``<cand>|<cand>``): churn's
            ``negative_flip_rate_new``.
        fars: the FARs to report; far: the operating FAR (default the smallest resolved).
        replicates, seed: the subject bootstrap.
        progress: called with one line per step.

    Returns:
        ``{"test_set", "operating_far", "cells", "verdicts", "thresholds", "churn", "decision"}`` (DESIGN §8).
    """
    say = progress or (lambda line: None)
    cross_cells = {c: (cross_cells or {}).get(c, cell_key(c, old)) for c in candidates}
    new_cells = {c: (new_cells or {}).get(c, cell_key(c, c)) for c in candidates}
    ref_key = cell_key(old, old)
    wanted = [ref_key, *cross_cells.values(), *new_cells.values()]
    if independent is not None:
        wanted.append(cell_key(independent, independent))
    wanted = list(dict.fromkeys(wanted))
    for key in wanted:
        missing = [n for n in key.split("|") if n not in pooled]
        if missing:
            raise CertifyError(f"cell {key}: no features of {', '.join(missing)}")
    s1, s2, source = pair_subjects(meta)
    has_1n = meta.has_1n and source == "1:N subject ids"
    subjects = np.unique(np.concatenate([s1, s2] + ([meta.probes.subject_ids] if has_1n else [])))
    plan = bootstrap.SubjectBootstrap(s1, s2, meta.pair_labels, replicates=replicates, seed=seed,
                                      subjects=subjects)
    op = operating_far(plan, fars, far)
    cells, one, idn = {}, {}, {}
    for key in wanted:
        query, gallery = key.split("|")
        one[key] = bootstrap.bootstrap_cell(plan, _cell_scores(meta, pooled, query, gallery), fars)
        cells[key] = {"1:1": one[key].summary()}
        if has_1n:
            idn[key] = bootstrap.bootstrap_identification(
                plan, _probe_outcomes(meta, pooled, query, gallery, use_faiss), ranks=(1,), fpirs=())
            cells[key]["1:N"] = {"rank1": float(idn[key].cmc.point[0]),
                                 "rank1_ci": [float(v) for v in idn[key].cmc.interval()[0]]}
        say(f"certificate: {key} bootstrapped ({replicates} replicates)")
    ref = one[ref_key]
    verdicts, thresholds, churn, decision = {}, {}, {"1:N": {}}, {}
    for c in candidates:
        cross, after = one[cross_cells[c]], one[new_cells[c]]
        v = bootstrap.verdicts(cross.tar - ref.tar)
        if independent is not None:
            gains = bootstrap.update_gain(cross.tar, ref.tar, one[cell_key(independent, independent)].tar)
            for k in v:
                v[k].update(gains[k])
        v.update({k: {"unresolved": why} for k, why in ref.unresolved.items()})
        at_old = bootstrap.tar_at_thresholds(cross, ref).as_dict("tar_at_old_threshold")
        thresholds[c] = {k: {"old_threshold": _one(ref.threshold.point[i]),
                             "threshold": _one(cross.threshold.point[i]),
                             "shift": _one(cross.threshold.point[i] - ref.threshold.point[i]),
                             "old_tar": float(ref.tar.point[i]), **at_old[k]}
                         for i, k in enumerate(ref.tar.keys)}
        flips = bootstrap.negative_flip_rate(ref, cross).as_dict("negative_flip_rate")
        flips_new = bootstrap.negative_flip_rate(ref, after).as_dict("negative_flip_rate_new")
        churn[c] = {k: {**flips[k], **flips_new[k]} for k in ref.tar.keys}
        search = None
        if has_1n:
            margin = idn[cross_cells[c]].cmc - idn[ref_key].cmc
            v["1:N"] = bootstrap.verdicts(margin)["1"]
            search = v["1:N"]["ecc"]
            churn["1:N"][c] = bootstrap.identification_flip_rate(idn[ref_key], idn[cross_cells[c]]).as_dict(
                "negative_flip_rate")["1"]
        verdicts[c] = v
        op_key = bootstrap.far_label(op)
        decision[c] = {"far": op_key, "1:1": v[op_key]["ecc"], "1:N": search,
                       "decision": decide(v[op_key]["ecc"], search if has_1n else True)}
    test_set = {"subjects": int(plan.subjects.size), "templates": int(np.unique(np.r_[meta.pair_t1,
                                                                                      meta.pair_t2]).size),
                "genuine_pairs": plan.num_genuine, "impostor_pairs": plan.num_impostors,
                "subjects_from": source, "replicates": replicates, "seed": seed,
                "resolved_fars": [bootstrap.far_label(f) for f in fars if plan.unresolved_reason(f) is None],
                "mated_probes": int(idn[ref_key].outcomes.mated.sum()) if has_1n else None}
    return {"test_set": test_set, "operating_far": bootstrap.far_label(op), "old": old,
            "candidates": list(candidates), "cross_cells": cross_cells, "new_cells": new_cells,
            "cells": cells, "verdicts": verdicts, "thresholds": thresholds, "churn": churn,
            "decision": decision}


__all__ = ["CERTIFICATE_FARS", "DECISIONS", "CertifyError", "certify_cells", "decide", "operating_far",
           "pair_subjects"]
