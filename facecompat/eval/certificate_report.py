"""The certificate as people read it: ``certificate.md`` and the stdout table, and the score plot.

Rates are percentages everywhere in text and plots (the JSON keeps fractions); a FAR the set cannot
resolve appears once, in the list of unresolved FARs, never as a column.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from facecompat.eval.matrix import new_figure, save_figure


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.{digits}f}"


def _ci(values: Sequence[float] | None, digits: int = 1) -> str:
    return "" if not values else f" [{_pct(values[0], digits)}, {_pct(values[1], digits)}]"


def _thr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _verdict(ecc: bool | None) -> str:
    return {True: "holds", False: "fails", None: "too close to call"}[ecc]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:  # a cell name's "|" would split a markdown column
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(head), "|" + "---|" * len(head), *(line(r) for r in rows)]


def _resolved(cert: Mapping) -> list[str]:
    return list(cert["test_set"]["resolved_fars"])


def decision_lines(cert: Mapping) -> list[str]:
    """One line per candidate: the decision at the operating FAR and the two verdicts behind it."""
    out = []
    for c, d in cert["decision"].items():
        v = cert["verdicts"][c][d["far"]]
        search = cert["verdicts"][c].get("1:N")
        parts = [f"1:1 ECC at FAR {d['far']} {_verdict(d['1:1'])} (margin {_pct(v['margin'])} points"
                 f"{_ci(v['margin_ci'])})"]
        if search is not None:
            parts.append(f"1:N rank-1 ECC {_verdict(search['ecc'])} (margin {_pct(search['margin'])}"
                         f"{_ci(search['margin_ci'])})")
        out.append(f"- **{c}: {d['decision']}** -- " + "; ".join(parts) + ".")
    return out


def format_certificate(cert: Mapping) -> str:
    """``certificate.md``: test set, decisions, the cells, verdicts per FAR, thresholds, churn, parity."""
    ts, old = cert["test_set"], cert["old"]
    ref = f"{old}|{old}"
    fars = _resolved(cert)
    unresolved = [k for k, v in cert["cells"][ref]["1:1"].items() if "unresolved" in v]
    lines = [f"# Upgrade certificate: {', '.join(cert['candidates'])} against the {old} gallery", "",
             f"Test set: {cert.get('target', '')} {ts['subjects']} subjects, {ts['templates']} templates, "
             f"{ts['genuine_pairs']} genuine and {ts['impostor_pairs']} impostor pairs"
             + (f", {ts['mated_probes']} mated 1:N probe searches" if ts.get("mated_probes") else "") + ". "
             f"Intervals: 95%, bootstrap over subjects ({ts['replicates']} replicates, seed {ts['seed']}; "
             f"subjects from {ts['subjects_from']}). Operating FAR: {cert['operating_far']} (the smallest "
             "FAR this set resolves, unless one was asked for). Rates in %.", "",
             "## Decision", "", *decision_lines(cert), "",
             "A decision needs both verdicts: ECC in 1:1 verification at the operating FAR and in 1:N "
             "search (rank-1, G1 and G2 pooled). Either failing is incompatible; an interval of the "
             "margin that holds 0 is too close to call.", ""]
    if unresolved:
        lines += [f"Not resolved by this set (fewer than 20 impostor pairs would pass): FAR "
                  f"{', '.join(unresolved)}.", ""]
    lines += ["## Cells (1:1 TAR and operating threshold)", ""]
    rows = []
    for key, cell in cert["cells"].items():
        row = [key]
        for far in fars:
            e = cell["1:1"][far]
            row.append(f"{_pct(e['tar'])}{_ci(e['tar_ci'])} @ {_thr(e['threshold'])}")
        if "1:N" in cell:
            row.append(f"{_pct(cell['1:N']['rank1'])}{_ci(cell['1:N']['rank1_ci'])}")
        rows.append(row)
    head = ["cell (query|gallery)", *[f"TAR @ threshold, FAR {f}" for f in fars]]
    if any("1:N" in c for c in cert["cells"].values()):
        head.append("1:N rank-1")
    lines += _table(head, rows) + [""]
    lines += ["## ECC verdicts", ""]
    rows = []
    for c, v in cert["verdicts"].items():
        row = [f"{cert['cross_cells'][c]}"]
        for far in fars:
            e = v[far]
            gain = "" if e.get("update_gain") is None else f", gain {e['update_gain']:.2f}"
            row.append(f"{_verdict(e['ecc'])}: {_pct(e['margin'])}{_ci(e['margin_ci'])}{gain}")
        if "1:N" in v:
            row.append(f"{_verdict(v['1:N']['ecc'])}: {_pct(v['1:N']['margin'])}{_ci(v['1:N']['margin_ci'])}")
        rows.append(row)
    search_col = ["1:N rank-1 margin"] if any("1:N" in v for v in cert["verdicts"].values()) else []
    lines += _table(["cross cell", *[f"FAR {f}: margin" for f in fars], *search_col], rows)
    lines += ["", "## Thresholds at cut-over", "",
              f"What an operator changes: each cell's own threshold at the FAR, and what the candidate "
              f"accepts if {ref}'s threshold is kept.", ""]
    rows = []
    for c, per_far in cert["thresholds"].items():
        for far in fars:
            e = per_far[far]
            rows.append([cert["cross_cells"][c], far, _thr(e["old_threshold"]), _thr(e["threshold"]),
                         "-" if e["shift"] is None else f"{e['shift']:+.3f}", _pct(e["old_tar"]),
                         f"{_pct(e['tar_at_old_threshold'])}{_ci(e['tar_at_old_threshold_ci'])}"])
    lines += _table(["cell", "FAR", f"{ref} threshold", "own threshold", "shift", f"{ref} TAR",
                     f"TAR at {ref}'s threshold"], rows)
    lines += ["", "## Churn", "",
              f"Negative flips: genuine pairs {ref} accepts at its threshold and the candidate rejects at "
              "its own, now (cross cell) and after a full backfill (candidate|candidate); in 1:N, probes "
              f"right at rank 1 in {ref} and wrong in the cross cell.", ""]
    rows = []
    for c in cert["candidates"]:
        for far in fars:
            e = cert["churn"][c][far]
            rows.append([c, far, f"{_pct(e['negative_flip_rate'])}{_ci(e['negative_flip_rate_ci'])}",
                         f"{_pct(e['negative_flip_rate_new'])}{_ci(e['negative_flip_rate_new_ci'])}"])
    lines += _table(["candidate", "FAR", "1:1 now", "1:1 after backfill"], rows)
    search = cert["churn"].get("1:N") or {}
    if search:
        lines += ["", *_table(["candidate", "1:N rank-1 negative flips"],
                              [[c, f"{_pct(e['negative_flip_rate'])}{_ci(e['negative_flip_rate_ci'])}"]
                               for c, e in search.items()])]
    parity = _parity_text(cert.get("parity") or {}, cert["operating_far"])
    lines += ["", "## Deployment parity", "", parity, ""]
    if cert.get("fingerprints"):
        lines += ["## Fingerprints", "", *[f"- {k}: `{v}`" for k, v in cert["fingerprints"].items()], ""]
    return "\n".join(lines)


def _parity_text(parity: Mapping, far: str | None = None) -> str:
    if not parity or parity.get("status") == "not measured":
        return ("Not measured in this certificate: the ONNX export of each candidate has not been run "
                "against PyTorch on these faces" + (f" ({parity['reason']})" if parity.get("reason") else "")
                + ".")
    rows = []
    for c, p in parity.items():
        change = p.get("tar_change", {}).get(far) if far else None
        cross = p.get("cross_tar_change", {}).get(far) if far else None
        rows.append([c, f"{p['max_cosine_deviation']:.2e}",
                     "-" if change is None else f"{100 * change:+.2f}",
                     "-" if cross is None else f"{100 * cross:+.2f}",
                     str(p.get("provider", "")), Path(p["onnx"]).name])
    return "\n".join([f"Each candidate exported to ONNX and run with onnxruntime on the evaluation faces "
                      f"(flip fused by the caller: docs/SERVING.md); TAR change in points at FAR {far}.", "",
                      *_table(["candidate", "largest 1 - cos vs PyTorch", "TAR change", "TAR change, ONNX "
                               "queries vs PyTorch gallery", "provider", "file"], rows)])


def summary_table(cert: Mapping) -> str:
    """The stdout view: one row per candidate at the operating FAR."""
    far = cert["operating_far"]
    rows = []
    for c, d in cert["decision"].items():
        v, t = cert["verdicts"][c][far], cert["thresholds"][c][far]
        search = cert["verdicts"][c].get("1:N")
        rows.append([c, d["decision"], f"{_pct(v['margin'])}{_ci(v['margin_ci'])}",
                     "-" if search is None else f"{_pct(search['margin'])}{_ci(search['margin_ci'])}",
                     f"{_thr(t['old_threshold'])} -> {_thr(t['threshold'])}",
                     _pct(cert["churn"][c][far]["negative_flip_rate"])])
    head = ["candidate", f"decision (FAR {far})", "1:1 margin (pts)", "1:N rank-1 margin (pts)",
            "threshold old -> own", "negative flips %"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*r) for r in rows)])


def plot_scores(scores: Mapping[str, np.ndarray], labels: np.ndarray, thresholds: Mapping[str, float | None],
                path: str | os.PathLike, title: str) -> Path:
    """Genuine and impostor score histograms of a few cells (one colour per cell: genuine solid,
    impostor dashed) with each cell's operating threshold as a vertical line."""
    fig, ax = new_figure()
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    bins = np.linspace(-0.5, 1.0, 61)
    genuine = np.asarray(labels).astype(bool)
    for (key, s), colour in zip(scores.items(), colours):
        for mask, style, kind in ((genuine, "-", "genuine"), (~genuine, "--", "impostor")):
            hist, edges = np.histogram(s[mask], bins=bins, density=True)
            ax.step(edges[:-1], hist, where="post", ls=style, color=colour, lw=1.3, label=f"{key} {kind}")
        if thresholds.get(key) is not None:
            ax.axvline(thresholds[key], color=colour, lw=1, ls=":", label=f"{key} threshold")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, ax, path, title, legend_loc="upper left")


__all__ = ["decision_lines", "format_certificate", "plot_scores", "summary_table"]
