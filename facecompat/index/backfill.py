"""Partial backfilling on the IJB 1:N protocol: the metric as a growing share of the gallery is re-embedded.

    items = gallery_items(meta)                                  # face rows of G1 + G2 templates
    order = backfill_order("distance", meta, gallery_stored=old_feats)
    curve = backfill_curve(meta, new_feats, old_feats, new_feats, order)
    plot_backfill({"distance": curve}, "backfill.png")

Gallery *items* are the faces (rows of ``meta/*_name_5pts_score.txt``) of the gallery templates, in
ascending face order; an ordering is a permutation of item indices ``0 .. n_items - 1``. At fraction
f the first ``floor(f * n_items + 0.5)`` items of the ordering carry the NEW model's face feature, the
rest their stored one (old model, or FCT-transformed); gallery templates are then pooled as usual
(:func:`facecompat.eval.ijb.pool_templates`: feature x detector score, media mean, template sum, L2)
and searched by the new model's probe templates, which are pooled once. The metrics are those of
:func:`facecompat.eval.ijb.identify_1toN` (DESIGN §5: CMC over mated probes, TPIR@FPIR with the
non-mated threshold rule) over the galleries G1 and G2 as the public cross-model evaluator reports
them (rank-k pooled over all mated probes, TPIR the mean of the galleries'); per-gallery curves are
kept too. The area of a curve is FastFill's: the plain mean of the metric over the evenly spaced
fractions 0, ..., 1.

Orderings (:data:`ORDERINGS`): ``random`` (seeded permutation), ``uncertainty`` (largest predicted
uncertainty first, FastFill), ``distance`` (largest cosine distance of the stored feature to its
subject's mean first: the mean of the L2-normalised stored features of the subject's gallery faces).
Ties keep ascending item order. Any other permutation may be passed to :func:`backfill_curve`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from facecompat.eval import ijb, metrics
from facecompat.eval.matrix import new_figure, save_figure

_CHUNK_ROWS = 65_536
DEFAULT_FRACTIONS = tuple(k / 10 for k in range(11))  # 0, 0.1, ..., 1


# ---------------------------------------------------------------------------------------- items
def _gallery_subjects(meta: ijb.IJBMeta) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique gallery template ids over all galleries and the subject of each."""
    if not meta.has_1n:
        raise ValueError(f"{meta.target}: no 1:N meta files (gallery and probe CSVs): nothing to backfill")
    templates = np.concatenate([s.template_ids for s in meta.galleries.values()]).astype(np.int64)
    subjects = np.concatenate([s.subject_ids for s in meta.galleries.values()]).astype(np.int64)
    order = np.argsort(templates, kind="stable")
    templates, subjects = templates[order], subjects[order]
    same = templates[1:] == templates[:-1]
    clash = same & (subjects[1:] != subjects[:-1])
    if clash.any():
        raise ValueError(f"gallery template {int(templates[1:][clash][0])} has two subjects in the "
                         "gallery CSVs")
    keep = np.r_[True, ~same]
    return templates[keep], subjects[keep]


def gallery_items(meta: ijb.IJBMeta) -> np.ndarray:
    """[n_items] int64 ascending face rows of the faces of every gallery template (G1 and G2)."""
    templates, _ = _gallery_subjects(meta)
    items = np.flatnonzero(np.isin(meta.template_ids, templates))
    if items.size == 0:
        raise ValueError(f"{meta.target}: the gallery templates have no faces in the face list")
    return items.astype(np.int64)


def item_subjects(meta: ijb.IJBMeta, items: np.ndarray | None = None) -> np.ndarray:
    """[n_items] int64 subject id (the gallery template's SUBJECT_ID) of every item."""
    templates, subjects = _gallery_subjects(meta)
    items = gallery_items(meta) if items is None else items
    return subjects[np.searchsorted(templates, meta.template_ids[items])]


# ------------------------------------------------------------------------------------- orderings
def _check_face_array(x: np.ndarray, meta: ijb.IJBMeta, what: str, ndim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim or x.shape[0] != meta.num_faces:
        want = "[N]" if ndim == 1 else "[N, D]"
        raise ValueError(f"{what}: expected {want} with N = {meta.num_faces} faces (face order of the meta), "
                         f"got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{what}: expected numbers, got {x.dtype}")
    return x


def _check_finite(x: np.ndarray, rows: np.ndarray | None, what: str) -> None:
    """ValueError naming the first face row of ``x`` (restricted to ``rows``) holding NaN or inf."""
    num = x.shape[0] if rows is None else rows.size
    for s in range(0, num, _CHUNK_ROWS):
        block = x[s:s + _CHUNK_ROWS] if rows is None else x[rows[s:s + _CHUNK_ROWS]]
        bad = ~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
        if bad.any():
            first = s + int(np.flatnonzero(bad)[0])
            raise ValueError(f"{what}: face row {first if rows is None else int(rows[first])} has a NaN or "
                             "infinite value")


def _order_random(meta: ijb.IJBMeta, items: np.ndarray, seed: int, **_: object) -> np.ndarray:
    return np.random.default_rng(seed).permutation(items.size).astype(np.int64)


def _order_uncertainty(meta: ijb.IJBMeta, items: np.ndarray, uncertainty: np.ndarray | None = None,
                       **_: object) -> np.ndarray:
    if uncertainty is None:
        raise ValueError("ordering 'uncertainty' needs uncertainty= (one value per face, face order of "
                         "the meta)")
    values = _check_face_array(uncertainty, meta, "uncertainty", 1)[items].astype(np.float64)
    _check_finite(np.asarray(uncertainty), items, "uncertainty")
    return np.argsort(-values, kind="stable").astype(np.int64)


def _order_distance(meta: ijb.IJBMeta, items: np.ndarray, gallery_stored: np.ndarray | None = None,
                    **_: object) -> np.ndarray:
    if gallery_stored is None:
        raise ValueError("ordering 'distance' needs gallery_stored= ([N, D] stored face features)")
    return np.argsort(-distance_to_class_mean(meta, gallery_stored, items), kind="stable").astype(np.int64)


def distance_to_class_mean(meta: ijb.IJBMeta, gallery_stored: np.ndarray,
                           items: np.ndarray | None = None) -> np.ndarray:
    """[n_items] float64 cosine distance ``1 - cos(u, m_s)`` of every item's L2-normalised stored feature
    ``u`` to its subject's mean ``m_s`` (mean of ``u`` over the subject's gallery faces). A zero feature
    or a zero mean gives distance 1."""
    stored = _check_face_array(gallery_stored, meta, "gallery_stored", 2)
    items = gallery_items(meta) if items is None else items
    _check_finite(stored, items, "gallery_stored")
    unit = np.asarray(stored[items], np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    np.divide(unit, norms, out=unit, where=norms > 0)
    unit[norms[:, 0] == 0] = 0.0
    _, subject_row = np.unique(item_subjects(meta, items), return_inverse=True)
    sums = np.zeros((int(subject_row.max()) + 1, unit.shape[1]), np.float64)
    np.add.at(sums, subject_row, unit)
    means = sums / np.bincount(subject_row)[:, None]
    mean_norms = np.linalg.norm(means, axis=1)
    dots = np.einsum("ij,ij->i", unit, means[subject_row])
    norms = mean_norms[subject_row]
    cosine = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return 1.0 - cosine


ORDERINGS: dict[str, Callable[..., np.ndarray]] = {
    "random": _order_random, "uncertainty": _order_uncertainty, "distance": _order_distance}


def backfill_order(kind: str, meta: ijb.IJBMeta, *, uncertainty: np.ndarray | None = None,
                   gallery_stored: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """The order in which gallery items are re-embedded with the new model.

    Args:
        kind: ``random`` (uses ``seed``), ``uncertainty`` (uses ``uncertainty`` [N], face order;
            largest first) or ``distance`` (uses ``gallery_stored`` [N, D], face order; farthest first).
        meta: the IJB meta with its 1:N files.

    Returns:
        [n_items] int64, a permutation of the item indices (positions in :func:`gallery_items`).
    """
    if kind not in ORDERINGS:
        raise ValueError(f"backfill ordering {kind!r} is unknown; valid: {', '.join(ORDERINGS)}")
    items = gallery_items(meta)
    return ORDERINGS[kind](meta, items, uncertainty=uncertainty, gallery_stored=gallery_stored, seed=seed)


# ----------------------------------------------------------------------------------------- curves
def check_fractions(fractions: Sequence[float] | np.ndarray) -> np.ndarray:
    """``fractions`` as float64 [F], F >= 2, evenly spaced from exactly 0 to exactly 1 (ValueError):
    the curve's area is their plain mean (:func:`curve_area`), which needs even spacing."""
    try:
        out = np.asarray(fractions, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"fractions must be numbers, got {fractions!r}") from None
    if out.ndim != 1 or out.size < 2:
        raise ValueError(f"fractions must be a list of at least 2 values from 0 to 1, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise ValueError(f"fractions must be finite, got {out.tolist()}")
    if out[0] != 0.0 or out[-1] != 1.0:
        raise ValueError(f"fractions must start at 0 and end at 1, got {out[0]:g} ... {out[-1]:g}")
    if (np.diff(out) <= 0).any():
        raise ValueError(f"fractions must be strictly increasing, got {out.tolist()}")
    step = 1.0 / (out.size - 1)
    if np.abs(np.diff(out) - step).max() > 1e-9:
        raise ValueError(f"fractions must be evenly spaced (0, {step:g}, ..., 1) for the backfill area, "
                         f"got {out.tolist()}")
    return out


def curve_area(fractions: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> float:
    """Area of a backfill curve as FastFill defines it (DESIGN §5): the plain mean of the metric
    over the evenly spaced ``fractions`` 0, ..., 1 (see :func:`check_fractions`). Both ends count
    fully, so it is not the trapezoid's integral (which halves them)."""
    f = check_fractions(fractions)
    v = np.asarray(values, np.float64)
    if v.shape != f.shape:
        raise ValueError(f"{v.size} curve values for {f.size} fractions")
    return float(v.mean())


def num_backfilled(fractions: np.ndarray, num_items: int) -> np.ndarray:
    """[F] int64 items re-embedded at each fraction: ``floor(f * num_items + 0.5)`` (round half up)."""
    return np.floor(np.asarray(fractions, np.float64) * num_items + 0.5).astype(np.int64)


def metric_names(ranks: Sequence[int] = metrics.DEFAULT_RANKS,
                 fpirs: Sequence[float] = metrics.DEFAULT_FPIRS) -> list[str]:
    """Curve keys: ``rank<k>`` per rank, ``tpir@fpir=<fpir_key>`` per FPIR."""
    return [f"rank{k}" for k in ranks] + [f"tpir@fpir={metrics.fpir_key(x)}" for x in fpirs]


def _over_galleries(name: str, curves: dict[str, list[float]], mated: dict[str, int]) -> list[float]:
    """One curve over the galleries as the public cross-model evaluator reports G1 and G2 together:
    rank-k pooled (hits in every gallery over all their mated probes, DESIGN §5), TPIR the plain
    mean of the galleries' TPIRs (its ``mean_tpirs``: each gallery has its own threshold)."""
    values = np.array(list(curves.values()), np.float64)  # [galleries, F]
    if not name.startswith("rank"):
        return values.mean(axis=0).tolist()
    return metrics.pooled_over_galleries(values, [mated[g] for g in curves]).tolist()


def _flatten(result: dict, ranks: Sequence[int], fpirs: Sequence[float]) -> dict[str, float]:
    out = {f"rank{k}": result["cmc"][str(k)] for k in ranks}
    tpir = result["tpir_at_fpir"]
    out.update({f"tpir@fpir={metrics.fpir_key(x)}": tpir[metrics.fpir_key(x)] for x in fpirs})
    return out


def backfill_curve(meta: ijb.IJBMeta, probe_feats_new: np.ndarray | ijb.Pooled, gallery_stored: np.ndarray,
                   gallery_new: np.ndarray, order: np.ndarray,
                   fractions: Sequence[float] | np.ndarray = DEFAULT_FRACTIONS, *,
                   galleries: Sequence[str] | None = None, ranks: Sequence[int] = metrics.DEFAULT_RANKS,
                   fpirs: Sequence[float] = metrics.DEFAULT_FPIRS, score_weighting: bool = True,
                   use_faiss: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """1:N metrics of new-model probes against a gallery backfilled along ``order``.

    Args:
        meta: IJB meta with the 1:N files.
        probe_feats_new: [N, D] new-model face features (face order), or their ``ijb.pool`` result
            (pool once, reuse for several orderings).
        gallery_stored: [N, D] stored face features (only gallery items are read).
        gallery_new: [N, D] new-model face features (only gallery items are read).
        order: [n_items] permutation of item indices (:func:`backfill_order` or the caller's).
        fractions: strictly increasing from 0 to 1.
        galleries: which galleries to evaluate and pool (default: all of the meta's).

    Returns:
        ``{"fractions": [F], "num_backfilled": [F], "num_items", "galleries": [...],
        "metric": {name: [F] over the galleries (rank-k pooled, TPIR mean)}, "per_gallery": {g: {name: [F]}},
        "area": {name: plain mean over f}}`` with names from :func:`metric_names`.
    """
    fractions = check_fractions(fractions)
    items = gallery_items(meta)
    order = np.asarray(order)
    if order.shape != (items.size,) or not np.issubdtype(order.dtype, np.integer) or \
            not np.array_equal(np.sort(order), np.arange(items.size)):
        raise ValueError(f"order must be a permutation of the {items.size} gallery item indices, got "
                         f"{order.dtype} {order.shape}")
    if galleries is not None:
        unknown = [g for g in galleries if g not in meta.galleries]
        if unknown or not galleries:
            raise ValueError(f"galleries {list(galleries)}: choose among {list(meta.galleries)}")
        meta = dataclasses.replace(meta, galleries={g: meta.galleries[g] for g in galleries})
    names = list(meta.galleries)
    query = probe_feats_new if isinstance(probe_feats_new, ijb.Pooled) else None
    dim = query.feats.shape[1] if query is not None else \
        _check_face_array(probe_feats_new, meta, "probe_feats_new", 2).shape[1]
    for what, x in (("gallery_stored", gallery_stored), ("gallery_new", gallery_new)):
        x = _check_face_array(x, meta, what, 2)
        if x.shape[1] != dim:
            raise ValueError(f"{what} is {x.shape[1]}-d, the probe features {dim}-d: they cannot be mixed")
        _check_finite(x, items, what)
    if query is None:
        _check_finite(np.asarray(probe_feats_new), None, "probe_feats_new")
        query = ijb.pool(meta, np.asarray(probe_feats_new), score_weighting)
    stored_items = np.array(gallery_stored[items], np.float32)
    new_items = np.asarray(gallery_new[items], np.float32)
    item_tids, item_mids = meta.template_ids[items], meta.media_ids[items]
    weights = meta.det_scores[items] if score_weighting else None
    gallery_feats = query.feats.copy()  # rows of gallery templates are overwritten per fraction
    counts = num_backfilled(fractions, items.size)
    keys = metric_names(ranks, fpirs)
    per_gallery: dict[str, dict[str, list[float]]] = {g: {n: [] for n in keys} for g in names}
    mated: dict[str, int] = {}
    done, rows, last = 0, None, None
    for f, count in zip(fractions.tolist(), counts.tolist()):
        if count != done or last is None:
            chosen = order[done:count]
            stored_items[chosen] = new_items[chosen]
            done = count
            templates, pooled = ijb.pool_templates(stored_items, item_tids, item_mids, weights, np.float64)
            rows = query.rows(templates, "backfill gallery") if rows is None else rows
            gallery_feats[rows] = pooled.astype(np.float32)
            last = ijb.identify_1toN(meta, query, ijb.Pooled(query.templates, gallery_feats), ranks, fpirs,
                                     use_faiss)
        for g in names:
            mated[g] = last[g]["num_mated"]
            for n, v in _flatten(last[g], ranks, fpirs).items():
                per_gallery[g][n].append(v)
        if progress:
            r1 = _over_galleries("rank1", {g: per_gallery[g]["rank1"][-1:] for g in names}, mated)[0] \
                if 1 in ranks else np.nan
            progress(f"backfill {f:.3f} ({count}/{items.size} items): rank-1 {r1 * 100:.2f}")
    metric = {n: _over_galleries(n, {g: per_gallery[g][n] for g in names}, mated) for n in keys}
    return {"fractions": fractions.tolist(), "num_backfilled": counts.tolist(), "num_items": int(items.size),
            "galleries": names, "metric": metric, "per_gallery": per_gallery,
            "area": {n: curve_area(fractions, v) for n, v in metric.items()}}


def average_curves(curves: Sequence[dict]) -> dict:
    """The mean of several :func:`backfill_curve` results on the same fractions (e.g. random
    orderings of different seeds): metric and per-gallery curves averaged pointwise, ``area`` the
    mean area, ``area_sd`` its standard deviation over the curves, ``runs`` their number."""
    if not curves:
        raise ValueError("average_curves: no curves")
    first = curves[0]
    if any(c["fractions"] != first["fractions"] for c in curves):
        raise ValueError("average_curves: the curves have different fractions")
    names = list(first["metric"])
    out = {k: v for k, v in first.items() if k not in ("metric", "per_gallery", "area")}
    out["metric"] = {n: np.mean([c["metric"][n] for c in curves], axis=0).tolist() for n in names}
    out["per_gallery"] = {g: {n: np.mean([c["per_gallery"][g][n] for c in curves], axis=0).tolist()
                              for n in names} for g in first["per_gallery"]}
    areas = {n: [c["area"][n] for c in curves] for n in names}
    out["area"] = {n: float(np.mean(v)) for n, v in areas.items()}
    out["area_sd"] = {n: float(np.std(v)) for n, v in areas.items()}
    out["runs"] = len(curves)
    return out


def ordering_curves(meta: ijb.IJBMeta, probe_feats_new: np.ndarray | ijb.Pooled, gallery_stored: np.ndarray,
                    gallery_new: np.ndarray, orderings: Sequence[str],
                    fractions: Sequence[float] | np.ndarray = DEFAULT_FRACTIONS, *,
                    uncertainty: np.ndarray | None = None, seed: int = 0, random_runs: int = 1,
                    use_faiss: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """``{ordering: curve}``: :func:`backfill_curve` for each ordering; ``random`` is the
    :func:`average_curves` of ``random_runs`` seeds from ``seed`` on (the spread of one seed's curve
    is large on small galleries), the others are deterministic."""
    if isinstance(probe_feats_new, np.ndarray):
        probe_feats_new = ijb.pool(meta, probe_feats_new)
    curves = {}
    for name in orderings:
        runs = []
        for s in range(seed, seed + (random_runs if name == "random" else 1)):
            order = backfill_order(name, meta, uncertainty=uncertainty, gallery_stored=gallery_stored, seed=s)
            if progress:
                progress(f"backfill ordering {name}" + (f" (seed {s})" if name == "random" else ""))
            runs.append(backfill_curve(meta, probe_feats_new, gallery_stored, gallery_new, order, fractions,
                                       use_faiss=use_faiss, progress=progress))
        curves[name] = average_curves(runs) if len(runs) > 1 else runs[0]
    return curves


# ------------------------------------------------------------------------------------------- plot
def plot_backfill(curves: Mapping[str, dict], path: str | os.PathLike, metric: str = "rank1",
                  title: str | None = None) -> Path:
    """One line per ordering (metric vs backfilled fraction, area in the legend), atomically written PNG."""

    if not curves:
        raise ValueError("plot_backfill: no curves to plot")
    for name, curve in curves.items():
        if metric not in curve.get("metric", {}):
            raise ValueError(f"plot_backfill: curve {name!r} has no metric {metric!r} "
                             f"(has: {', '.join(curve.get('metric', {}))})")
    fig, ax = new_figure()
    for name, curve in curves.items():
        values = np.asarray(curve["metric"][metric], np.float64)
        area = curve.get("area", {}).get(metric, curve_area(curve["fractions"], values))
        ax.plot(curve["fractions"], values, "-o", lw=1.5, ms=3, label=f"{name} (area {area * 100:.2f})")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("fraction of gallery items backfilled with the new model")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, ax, path, title or f"Partial backfilling: {metric}")
