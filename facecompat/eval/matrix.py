"""Cross-model IJB evaluation: the query x gallery matrix, compatibility verdicts, tables, plots.

    pooled = {name: ijb.pool(meta, feats[name]) for name in feats}        # each model pooled once
    results, curves = evaluate_cells(meta, pooled, matrix_cells(["old", "new", "bct"]))
    verdicts = compatibility(results, ["new", "bct"], old="old", independent="new")
    print(format_matrix(results, ["old", "new", "bct"], "IJBC"))

A cell ``"A|B"`` is the cross-model test of DESIGN §5: query model A embeds the second template
of every 1:1 pair (the probe side) and every 1:N probe, gallery model B the first template
(IJB-C's enrolled side, the G1 ∪ G2 templates) and the 1:N galleries; ``"A|A"`` is A's self test.
Compatibility (DESIGN §5): ECC holds for a new model m iff M(m, old) > M(old, old); update
gain = (M(m, old) - M(old, old)) / (M(new*, new*) - M(old, old)) with new* the independently
trained new model. M is 1:1 TAR at the ECC FARs (nearest-ROC-point convention).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from facecompat.eval import ijb, metrics
from facecompat.fileio import atomic_write

HEADLINE_FARS = (1e-4, 1e-5)


def cell_key(query: str, gallery: str) -> str:
    return f"{query}|{gallery}"


def scores_file_name(query: str, gallery: str) -> str:
    """``<query>__<gallery>.npy`` with anything but letters, digits and ``_.+-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{query}__{gallery}") + ".npy"


def pair_cells(query: str, gallery: str) -> list[tuple[str, str]]:
    """``query|gallery``, then the other direction and both self tests (one cell when they are equal)."""
    if query == gallery:
        return [(query, query)]
    return [(query, gallery), (gallery, query), (query, query), (gallery, gallery)]


def matrix_cells(names: Sequence[str]) -> list[tuple[str, str]]:
    """Every (query, gallery) combination of ``names``, row by row."""
    return [(q, g) for q in names for g in names]


# ----------------------------------------------------------------------------------- missing faces
def drop_faces(meta: ijb.IJBMeta, face_rows: np.ndarray) -> tuple[ijb.IJBMeta, dict[str, int]]:
    """``meta`` without the faces at ``face_rows`` (e.g. images missing from ``loose_crop/``).

    Templates left without any face leave with their 1:1 pairs and their 1:N rows.

    Returns:
        the reduced meta (a copy; ``meta`` is unchanged) and counts ``{"faces", "templates",
        "pairs", "probes", "gallery_templates"}`` of what was dropped.
    """
    face_rows = np.asarray(face_rows, np.int64)
    counts = {"faces": int(face_rows.size), "templates": 0, "pairs": 0, "probes": 0, "gallery_templates": 0}
    if face_rows.size == 0:
        return meta, counts
    template_ids = meta.template_ids.copy()
    before = np.unique(template_ids[template_ids >= 0])
    template_ids[face_rows] = -1
    alive = np.unique(template_ids[template_ids >= 0])
    counts["templates"] = int(before.size - alive.size)
    keep = np.isin(meta.pair_t1, alive) & np.isin(meta.pair_t2, alive)
    counts["pairs"] = int((~keep).sum())

    def subset(subjects: ijb.Subjects, key: str) -> ijb.Subjects:
        ok = np.isin(subjects.template_ids, alive)
        counts[key] += int((~ok).sum())
        return ijb.Subjects(subjects.template_ids[ok], subjects.subject_ids[ok])

    reduced = dataclasses.replace(
        meta, template_ids=template_ids, pair_t1=meta.pair_t1[keep], pair_t2=meta.pair_t2[keep],
        pair_labels=meta.pair_labels[keep],
        galleries={g: subset(s, "gallery_templates") for g, s in meta.galleries.items()},
        probes=None if meta.probes is None else subset(meta.probes, "probes"))
    return reduced, counts


# ------------------------------------------------------------------------------------- evaluation
def evaluate_cells(meta: ijb.IJBMeta, pooled: dict[str, ijb.Pooled], cells: Sequence[tuple[str, str]], *,
                   one_to_one: bool = True, one_to_n: bool | None = None,
                   fars: Sequence[float] = metrics.DEFAULT_FARS,
                   fpirs: Sequence[float] = metrics.DEFAULT_FPIRS,
                   ranks: Sequence[int] = metrics.DEFAULT_RANKS, use_faiss: bool = True,
                   scores_dir: str | os.PathLike | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """Run 1:1 and/or 1:N for every (query, gallery) cell from pooled templates.

    Args:
        pooled: model name -> :class:`~facecompat.eval.ijb.Pooled` (the same object for a self test).
        cells: (query, gallery) names.
        one_to_n: None = when the meta has the 1:N files.
        scores_dir: also write ``<query>__<gallery>.npy`` (float32 1:1 scores in pair order: the
            gallery model's t1 against the query model's t2) and ``pairs.npy`` ([M, 3] int64: t1,
            t2, label) there.
        progress: called with one line per finished cell.

    Returns:
        ``({"q|g": {"1:1": {...}, "1:N": {...}}}, {"q|g": (fpr, tpr)})``.
    """

    one_to_n = meta.has_1n if one_to_n is None else one_to_n
    results: dict[str, dict] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if scores_dir is not None and one_to_one:
        Path(scores_dir).mkdir(parents=True, exist_ok=True)
        with atomic_write(Path(scores_dir) / "pairs.npy", "wb") as f:
            np.save(f, np.stack([meta.pair_t1, meta.pair_t2, meta.pair_labels.astype(np.int64)], axis=1))
    for index, (query, gallery) in enumerate(cells, 1):
        start = time.perf_counter()
        key, cell = cell_key(query, gallery), {}
        q, g = pooled[query], pooled[gallery]
        if one_to_one:
            cell["1:1"], curve = ijb.verify_1to1(meta, q, g, fars, return_curves=True)
            curves[key] = (curve["fpr"], curve["tpr"])
            if scores_dir is not None:
                with atomic_write(Path(scores_dir) / scores_file_name(query, gallery), "wb") as f:
                    np.save(f, curve["scores"])
        if one_to_n:
            cell["1:N"] = ijb.identify_1toN(meta, q, g, ranks, fpirs, use_faiss)
        results[key] = cell
        if progress:
            progress(f"[{index}/{len(cells)}] {key}: {_brief(cell)} ({time.perf_counter() - start:.1f} s)")
    return results, curves


def _brief(cell: dict) -> str:
    parts = []
    if "1:1" in cell:
        tar = cell["1:1"]["tar_at_far"]
        parts += [f"TAR@{_far_label(f)} {_pct(tar.get(metrics.far_key(f)))}" for f in HEADLINE_FARS]
    if "1:N" in cell:
        parts += [f"{g} rank-1 {_pct(r['cmc'].get('1'))}" for g, r in cell["1:N"].items()]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------- compatibility
def pooled_rank(results: dict, key: str, rank: str = "1") -> float | None:
    """CMC rank-``rank`` of cell ``key`` pooled over its galleries (G1, G2) as the public
    cross-model evaluator does (:func:`metrics.pooled_over_galleries`); None without 1:N."""
    galleries = results.get(key, {}).get("1:N")
    if not galleries:
        return None
    return metrics.pooled_over_galleries([g["cmc"][rank] for g in galleries.values()],
                                         [g["num_mated"] for g in galleries.values()])


# ------------------------------------------------------------------------------------------ tables
def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 100:.2f}"


def _far_label(far: float) -> str:
    return metrics.far_key(far).replace("e-0", "e-")


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def format_cells(results: dict, target: str, fars: Sequence[float] = metrics.DEFAULT_FARS) -> str:
    """One row per cell: 1:1 TAR@FAR (%, nearest-point) + AUC, then 1:N rank-1 and TPIR per gallery."""
    lines = [f"{target} 1:1 TAR (%) at FAR, ROC point nearest the target (insightface convention)"]
    has_1to1 = any("1:1" in c for c in results.values())
    if has_1to1:
        rows = [["query", "gallery", *[_far_label(f) for f in fars], "AUC"]]
        for key, cell in results.items():
            if "1:1" in cell:
                r = cell["1:1"]
                rows.append([*key.split("|"), *[_pct(r["tar_at_far"].get(metrics.far_key(f))) for f in fars],
                             _pct(r["auc"])])
        lines += _grid(rows)
    galleries = next((list(c["1:N"]) for c in results.values() if "1:N" in c), [])
    if galleries:
        lines += ["", f"{target} 1:N open set (%): CMC rank-k, TPIR at FPIR"]
        some = next(c["1:N"] for c in results.values() if "1:N" in c)[galleries[0]]
        rank_keys, fpir_keys = list(some["cmc"]), list(some["tpir_at_fpir"])
        header = ["query", "gallery"]
        for g in galleries:
            header += [f"{g} r{k}" for k in rank_keys] + [f"{g} @{k}" for k in fpir_keys]
        rows = [header]
        for key, cell in results.items():
            if "1:N" in cell:
                row = key.split("|")
                for g in galleries:
                    r = cell["1:N"][g]
                    row += [_pct(r["cmc"][k]) for k in rank_keys]
                    row += [_pct(r["tpir_at_fpir"][k]) for k in fpir_keys]
                rows.append(row)
        lines += _grid(rows)
    if not has_1to1:
        lines.pop(0)
    return "\n".join(lines)


def format_matrix(results: dict, names: Sequence[str], target: str,
                  fars: Sequence[float] = HEADLINE_FARS) -> str:
    """Query (rows) x gallery (columns) grids of 1:1 TAR at each FAR and of 1:N rank-1."""
    blocks = []
    for far in fars:
        rows = [[f"TAR@{_far_label(far)}  q \\ g", *names]]
        for q in names:
            rows.append([q, *[_pct(results.get(cell_key(q, g), {}).get("1:1", {}).get("tar_at_far", {})
                                   .get(metrics.far_key(far))) for g in names]])
        blocks.append("\n".join(_grid(rows)))
    galleries = next((list(c["1:N"]) for c in results.values() if "1:N" in c), [])
    for gal in galleries:
        rows = [[f"{gal} rank-1  q \\ g", *names]]
        for q in names:
            rows.append([q, *[_pct(results.get(cell_key(q, g), {}).get("1:N", {}).get(gal, {})
                                   .get("cmc", {}).get("1")) for g in names]])
        blocks.append("\n".join(_grid(rows)))
    title = f"{target} query (rows) x gallery (columns), %"
    return title + "\n" + "\n\n".join(blocks)


def _verdict(holds: bool | None) -> str:
    return {True: "holds", False: "FAILS", None: "too close"}[holds]


def _margin(entry: Mapping) -> str:
    lo, hi = entry["margin_ci"]
    return f"{entry['margin'] * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}]"


def format_verdicts(verdicts: dict) -> str:
    """Per candidate: the margin of its cross test over old|old (points, 95% subject-bootstrap interval)
    and the verdict at every resolved FAR, the 1:N rank-1 verdict, the update gain and the decision at
    the operating FAR; unresolved FARs named below the table."""
    old, fars, op = verdicts["old"], verdicts["fars"], verdicts["ecc_fars"][0]
    search = verdicts.get("ecc_search") or {}
    header = ["model", "cross", *[f"@{f.replace('e-0', 'e-')}" for f in fars],
              *(["1:N rank-1"] if search else []), "update gain", f"decision @{op.replace('e-0', 'e-')}"]
    rows = [header]
    for m, detail in verdicts["ecc_detail"].items():
        gain = verdicts["update_gain"].get(m)
        rows.append([m, verdicts["cross_cell"][m],
                     *[f"{_verdict(detail[f]['holds'])} {_margin(detail[f])}" for f in fars],
                     *([f"{_verdict(search[m]['holds'])} {_margin(search[m])}"] if m in search else
                       (["-"] if search else [])),
                     "-" if gain is None else f"{gain:+.3f}", verdicts["decision"][m]])
    notes = [f"margin: TAR(m|{old}) - TAR({old}|{old}) in points with its 95% interval (bootstrap over "
             f"subjects); ECC holds when the interval is above 0, too close when it holds 0"]
    if verdicts["independent"]:
        notes.append(f"update gain relative to {verdicts['independent']}|{verdicts['independent']}")
    if verdicts.get("unresolved_fars"):
        notes.append("not resolved by this set (fewer than 20 impostor pairs above the threshold): FAR "
                     + ", ".join(f.replace("e-0", "e-") for f in verdicts["unresolved_fars"]))
    return "\n".join(_grid(rows) + notes)


# -------------------------------------------------------------------------------------------- plot
def new_figure():
    """A (figure, axes) pair of the project's plots (7x5 in, 120 dpi) on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 5), dpi=120)


def save_figure(fig, ax, path: str | os.PathLike, title: str, legend_loc: str = "lower right",
                legend_columns: int = 1) -> Path:
    """Title, grid, legend, tight layout; the PNG written atomically (parents created); figure closed.
    ``legend_loc="outside"`` puts the legend right of the axes (the figure widens to keep it)."""
    import matplotlib.pyplot as plt


    ax.set_title(title)
    if legend_loc == "outside":
        fig.set_size_inches(fig.get_size_inches()[0] + 2.2 * legend_columns, fig.get_size_inches()[1])
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, ncol=legend_columns)
    else:
        ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def roc_styles(keys: Sequence[str]) -> dict[str, dict]:
    """Per cell ``q|g`` its line: colour by query model (tab10, tab20 past ten), line style by gallery
    model, and a marker once the galleries outnumber the four line styles."""
    import matplotlib.pyplot as plt

    queries = list(dict.fromkeys(k.split("|")[0] for k in keys))
    galleries = list(dict.fromkeys(k.split("|")[1] for k in keys))
    colours = plt.get_cmap("tab10" if len(queries) <= 10 else "tab20")
    styles, markers = ("-", "--", ":", "-."), (None, "o", "s", "^", "v", "D")
    out = {}
    for key in keys:
        query, gallery = key.split("|")
        g = galleries.index(gallery)
        out[key] = {"color": colours(queries.index(query) % colours.N), "linestyle": styles[g % 4],
                    "marker": markers[(g // 4) % len(markers)]}
    return out


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str) -> Path:
    """ROC curves (TAR vs FAR) of the cells, written atomically as PNG. The log FAR axis starts at
    1e-6 (IJB-C's 15.6M impostor pairs resolve it), or at the decade of the smallest FAR the
    curves resolve when they have fewer impostors. Colour = the query model, line style (and, past
    four galleries, a marker) = the gallery model, so a 6 x 6 matrix has no two curves alike; more
    than eight curves put the legend beside the axes."""
    fig, ax = new_figure()
    smallest = 1.0
    for (key, (fpr, tpr)), style in zip(curves.items(), roc_styles(list(curves)).values()):
        query, gallery = key.split("|")
        ok = fpr > 0
        if ok.any():
            smallest = min(smallest, float(fpr[ok].min()))
        ax.plot(fpr[ok], tpr[ok], markevery=0.1, markersize=4, lw=1.5, label=f"{query} vs {gallery} gallery",
                **style)
    ax.set_xscale("log")
    ax.set_xlim(max(1e-6, 10.0 ** math.floor(math.log10(smallest))) if smallest < 1.0 else 1e-6, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.grid(True, which="both", alpha=0.3)
    if len(curves) > 8:
        return save_figure(fig, ax, path, title, legend_loc="outside", legend_columns=1 + len(curves) // 20)
    return save_figure(fig, ax, path, title)
