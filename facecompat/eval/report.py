"""The compatibility report of a model upgrade: ``report.json`` (DESIGN §8) and a Markdown page.

    report = build_report(stages, evaluation, backfill)     # the quickstart's stage results
    Path("report.md").write_text(format_report(report))

``evaluation`` is what :func:`facecompat.quickstart.stage_evaluate` writes (the matrix of cells with
ECC verdicts and update gains), ``backfill`` what :func:`~facecompat.quickstart.stage_backfill` writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from facecompat.eval.matrix import pooled_rank

OLD, INDEPENDENT = "old", "new"
# the certificate's figures (DESIGN §8) the report carries: it is its upgrade's certificate
CERTIFICATE_KEYS = ("test_set", "operating_far", "cells", "verdicts", "thresholds", "churn", "decision")


def build_report(stages: dict, evaluation: dict, backfill: dict, *, size: Any = None,
                 descriptions: dict[str, str] | None = None,
                 variants: dict[str, list[str]] | None = None) -> dict:
    """One JSON object: models, the matrix, verdicts, backfill curves, data and timings.

    ``variants``: per model the method settings that differ from its recipe (``["alpha=0.5", ...]``),
    kept as ``models[name]["variant"]`` and named under every table of its numbers."""
    descriptions, variants = descriptions or {}, variants or {}
    models: dict[str, dict] = {}
    for name in ("old", "new", "bct", "l2", "mixbct", "side"):
        stage = stages.get(name, {})
        models[name] = {"description": descriptions.get(name, ""), "network": stage.get("network"),
                        "steps": stage.get("steps"), "loss": stage.get("loss"),
                        "lfw_accuracy": stage.get("lfw_accuracy"), "train_seconds": stage.get("seconds"),
                        "path": str(stage["model"]) if "model" in stage else None,
                        "variant": variants.get(name)}
    fct = stages.get("fct", {})
    models["fct"] = {"description": descriptions.get("fct", ""), "network": "fct", "steps": fct.get("steps"),
                     "held_out_cos_h_new": fct.get("cos_h_new"),
                     "held_out_cos_old_new": fct.get("cos_old_new"), "train_seconds": fct.get("seconds"),
                     "path": fct["outputs"][0] if fct.get("outputs") else None}
    seconds = {name: stage.get("seconds") for name, stage in stages.items()}
    report = {
        "models": models, "old": OLD, "independent": INDEPENDENT,
        "matrix": evaluation["matrix"],
        "ecc": evaluation["ecc"], "ecc_detail": evaluation["ecc_detail"], "ecc_fars": evaluation["ecc_fars"],
        "fars": evaluation.get("fars", evaluation["ecc_fars"]),
        "update_gain": evaluation["update_gain"], "update_gain_ci": evaluation.get("update_gain_ci"),
        "cross_cell": evaluation["cross_cell"], "ecc_search": evaluation.get("ecc_search"),
        "unresolved_fars": evaluation.get("unresolved_fars", {}),
        "pairs": evaluation.get("pairs"), "impostor_pairs": evaluation.get("impostor_pairs"),
        "backfill": backfill["orderings"], "backfill_stored": backfill["stored"],
        "backfill_query": backfill["query"], "backfill_items": backfill.get("num_items"),
        "backfill_baseline": backfill.get("baseline"),
        "data": {k: v for k, v in stages.get("data", {}).items() if k not in ("outputs", "seconds")},
        "size": _size_dict(size),
        "seconds": seconds, "total_seconds": round(sum(s for s in seconds.values() if s), 1),
    }
    cert = evaluation.get("certificate") or {}
    report.update({k: cert[k] for k in CERTIFICATE_KEYS if k in cert})
    return report


def _size_dict(size: Any) -> dict | None:
    if size is None:
        return None
    fields = getattr(size, "__dataclass_fields__", None)
    if fields is None:
        return dict(size)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
            ((f, getattr(size, f)) for f in fields)}


# -------------------------------------------------------------------------------------- formatting
def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 100:.2f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(r) + " |" for r in [list(head), sep, *[list(r) for r in rows]]]


def _tar(report: dict, cell: str, far_key: str) -> float | None:
    return report["matrix"].get(cell, {}).get("1:1", {}).get("tar_at_far", {}).get(far_key)


def _rank1(report: dict, cell: str) -> float | None:
    return pooled_rank(report["matrix"], cell)


def _far_label(key: str) -> str:
    return key.replace("e-0", "e-")


def _verdict(holds: bool | None, fails: str = "fails") -> str:
    return {True: "holds", False: fails, None: "too close to call"}[holds]


def _margin(entry: dict | None) -> str:
    """``+1.23 [-0.40, +2.90]``: a margin and its 95% interval in points."""
    if not entry or entry.get("margin_ci") is None:
        return "–"
    lo, hi = entry["margin_ci"]
    return f"{entry['margin'] * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}]"


def _decision(report: dict, name: str) -> str:
    d = (report.get("decision") or {}).get(name)
    return d["decision"] if isinstance(d, dict) else (d or "–")


def verdict_lines(report: dict) -> list[str]:
    """One sentence per candidate: the decision, its 1:1 margin over old|old with the interval, 1:N."""
    first = report["ecc_fars"][0]
    lines = []
    for name, holds in report["ecc"].items():
        cell = report["cross_cell"][name]
        detail = report["ecc_detail"][name][first]
        gain = report["update_gain"].get(name)
        what = "the old gallery upgraded by FCT" if name == "fct" else "the old gallery"
        gain_text = "" if gain is None else f"; update gain {gain:+.2f}"
        search = (report.get("ecc_search") or {}).get(name)
        search_text = "" if search is None else (
            f" In 1:N search ECC {_verdict(search['holds'])}: rank-1 {_pct(search['cross'])}% against "
            f"old|old's {_pct(search['old'])}% (margin {_margin(search)} points).")
        lines.append(f"- **{name}: {_decision(report, name)}** — {cell} (its queries against {what}) reaches "
                     f"TAR {_pct(detail['cross'])}% at FAR {_far_label(first)} against old|old's "
                     f"{_pct(detail['old'])}%: margin {_margin(detail)} points, ECC {_verdict(holds)}"
                     f"{gain_text}.{search_text}")
    return lines


def compatibility_table(report: dict) -> list[str]:
    fars = report.get("fars", report["ecc_fars"])
    first = report["ecc_fars"][0]
    head = ["model", "cross test", *[f"TAR@{_far_label(f)}" for f in fars], f"old\\|old@{_far_label(first)}",
            "margin (points, 95%)", "ECC", "update gain", "self TAR", "rank-1 cross", "1:N ECC", "decision",
            "what it is"]
    rows = []
    for name in report["ecc"]:
        cell = report["cross_cell"][name]
        self_cell = "new|new" if name == "fct" else f"{name}|{name}"
        gain = report["update_gain"].get(name)
        rows.append([name, cell.replace("|", "\\|"), *[_pct(_tar(report, cell, f)) for f in fars],
                     _pct(_tar(report, "old|old", first)), _margin(report["ecc_detail"][name].get(first)),
                     _verdict(report["ecc"][name], "**fails**"), "–" if gain is None else f"{gain:+.3f}",
                     _pct(_tar(report, self_cell, first)), _pct(_rank1(report, cell)),
                     _search_verdict(report, name, "**fails**"), _decision(report, name),
                     report["models"].get(name, {}).get("description", "")])
    return _table(head, rows, "ll" + "r" * len(fars) + "rrlrrrlll")


def _search_verdict(report: dict, name: str, fails: str) -> str:
    search = (report.get("ecc_search") or {}).get(name)
    return "–" if search is None else _verdict(search["holds"], fails)


def matrix_table(report: dict, names: Sequence[str], value) -> list[str]:
    head = ["query \\ gallery", *names]
    rows = [[q, *[_pct(value(f"{q}|{g}")) for g in names]] for q in names]
    return _table(head, rows)


def backfill_table(report: dict, metric: str = "rank1") -> list[str]:
    curves = dict(report["backfill"])
    base = (report.get("backfill_baseline") or {}).get("orderings", {})
    columns = {f"{report['backfill_stored']}, {k}": c for k, c in curves.items()}
    columns.update({f"{report['backfill_baseline']['stored']}, {k}": c for k, c in base.items()})
    fractions = next(iter(columns.values()))["fractions"]
    rows = [[f"{f:.2f}", *[_pct(c["metric"][metric][i]) for c in columns.values()]]
            for i, f in enumerate(fractions)]
    sd = {name: f" ± {c['area_sd'][metric] * 100:.2f}" if "area_sd" in c else ""
          for name, c in columns.items()}
    rows.append(["**area**", *[_pct(c["area"][metric]) + sd[name] for name, c in columns.items()]])
    return _table(["backfilled", *columns], rows)


def format_report(report: dict) -> str:
    first = report["ecc_fars"][0]
    names = [n for n in ("old", "new", "bct", "l2", "mixbct") if n in report["models"]]
    data = report.get("data", {})
    ijbc, train = data.get("ijbc", {}), data.get("train", {})
    lines = ["# Model upgrade compatibility report", ""]
    if train:
        lines += [f"Synthetic data: {train.get('classes')} training identities ({train.get('images')} "
                  f"images); IJB-C-style test set of {ijbc.get('subjects')} subjects, "
                  f"{ijbc.get('templates')} templates, "
                  f"{report.get('pairs')} 1:1 pairs ({report.get('impostor_pairs')} impostor), "
                  f"{ijbc.get('probes')} 1:N probes. Total time {report['total_seconds']:.0f} s.", ""]
    lines += ["## Verdicts", "",
              "A new model is compatible (ECC) when its queries against the old gallery verify better than "
              "the old model against itself: TAR(new|old) > TAR(old|old) at the FAR below, with the whole "
              "95% interval of the margin above 0 (a bootstrap over subjects: pairs share subjects, so a "
              "count of pairs overstates certainty); an interval holding 0 is too close to call. The "
              "decision also needs the same in 1:N search (rank-1). The update gain puts the cross test on "
              "the scale from old|old (0) to the independent new model's own new|new (1). "
              f"FAR {_far_label(first)} is the smallest with at least 20 impostor pairs above the threshold "
              "on this test set.", "", *verdict_lines(report), "",
              "## Compatibility against the old gallery", "", *compatibility_table(report), "",
              *[f"- {line}" for line in variant_notes(report)], *([""] if variant_notes(report) else []),
              "Cross test: the first model embeds the probes (each pair's second template, the 1:N probes), "
              "the second model the enrolled side (each pair's first template, the 1:N galleries; "
              "the public cross-model evaluators' convention). *self TAR*: the model against itself "
              "(new|new for fct: what re-extracting the whole gallery would give). *rank-1 cross*: 1:N "
              "rank-1 of the cross test, galleries G1 and G2 pooled (hits over all mated probes).", "",
              f"## 1:1 TAR @ FAR {_far_label(first)} (%), every query × gallery", "",
              *matrix_table(report, names, lambda c: _tar(report, c, first)), "",
              "## 1:N rank-1 (%), G1 and G2 pooled", "",
              *matrix_table(report, names, lambda c: _rank1(report, c)), "",
              "![ROC of the self and cross tests](roc.png)", "",
              "## Backfilling the upgraded gallery", "",
              f"The gallery ({report.get('backfill_items')} faces) starts as stored ("
              f"{report['backfill_stored']}: h(old, side-info); old: old features) and is re-embedded with "
              f"the {report['backfill_query']} model a share at a time, in each order; 1:N rank-1 (%) of the "
              f"{report['backfill_query']} model's probes. Area = mean over the backfilled share.", "",
              *backfill_table(report), "", "![Backfill curves](backfill.png)", "",
              "## Models", ""]
    rows = []
    for name, m in report["models"].items():
        fit = "" if m.get("held_out_cos_h_new") is None else \
            f"held-out cos(h, new) {m['held_out_cos_h_new']:.3f} (old→new {m['held_out_cos_old_new']:.3f})"
        lfw = "" if m.get("lfw_accuracy") is None else f"{m['lfw_accuracy'] * 100:.1f}"
        rows.append([name, m.get("description", ""), str(m.get("network") or ""), str(m.get("steps") or ""),
                     "" if m.get("train_seconds") is None else f"{m['train_seconds']:.0f}", lfw, fit])
    lines += [*_table(["model", "what it is", "network", "steps", "seconds", "lfw acc %", "fit"], rows,
                      "lllrrrl"), ""]
    lines += ["Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()
                                             if v is not None), ""]
    lines += backfill_findings(report) + next_steps(report)
    return "\n".join(lines)


def backfill_findings(report: dict) -> list[str]:
    """What the backfill curves say against the literature: FastFill (Jaeckle et al. 2023) orders the
    backfill by h's predicted uncertainty and reports it above a random order; where this run finds the
    opposite it is said, with what was measured beside it."""
    curves = report.get("backfill") or {}
    if "uncertainty" not in curves or "random" not in curves:
        return []
    unc, rnd = curves["uncertainty"]["area"]["rank1"], curves["random"]["area"]["rank1"]
    sd = curves["random"].get("area_sd", {}).get("rank1")
    spread = "" if sd is None else f"; random orders vary by ±{sd * 100:.2f}"
    if unc >= rnd:
        return ["## Findings", "", f"- Backfilling in FastFill's uncertainty order beats a random order "
                f"(rank-1 area {_pct(unc)}% against {_pct(rnd)}%{spread}), as FastFill reports.", ""]
    fit = report.get("models", {}).get("fct", {}).get("held_out_cos_h_new")
    fit_text = "" if fit is None else f" h's held-out cosine to the new features is {fit:.3f};"
    return ["## Findings", "",
            f"- **Against the literature:** backfilling in FastFill's uncertainty order is *below* a random "
            f"order here (rank-1 area {_pct(unc)}% against {_pct(rnd)}%{spread}), where FastFill reports it "
            f"above. FastFill's order needs σ² to rank the items h maps worst first.{fit_text} a likely "
            "reason, not measured here, is that on a small generated set h's errors vary little between "
            "items, so σ² carries little ranking signal and the order re-embeds faces h already placed "
            "well. A measurement on generated data, not a refutation: compare the orders on your own "
            "gallery (tools/backfill.py) before choosing one.", ""]


def next_steps(report: dict) -> list[str]:
    """The report's last section: what to run next on these models and what this set cannot decide."""
    lines = ["## Next steps", ""]
    unresolved = report.get("unresolved_fars") or {}
    if unresolved:
        fars = ", ".join(_far_label(f) for f in unresolved)
        lines.append(f"- This test set cannot judge FAR {fars}: certify on a set with more impostor pairs "
                     "(IJB-C resolves 1e-5) before deploying at those.")
    close = [n for n, v in report.get("ecc", {}).items() if v is None]
    if close:
        lines.append(f"- Too close to call: {', '.join(close)}. More subjects narrow the intervals; the "
                     "verdict does not change by re-running the same set.")
    lines += ["- The certificate of these models, with thresholds, churn and ONNX parity: "
              "`python tools/certify.py --config <work dir>/eval_catalog.yaml --old old --new bct,mixbct,fct "
              "--independent new --parity --out <work dir>/certificate`.",
              "- A service must reproduce the evaluation's preprocessing for the thresholds to hold: "
              "docs/SERVING.md.", ""]
    return lines


def variant_notes(report: dict) -> list[str]:
    """One line per model trained with settings other than its recipe's: what ran is named."""
    return [f"{name}: variant {', '.join(m['variant'])} (not the recipe's settings)"
            for name, m in report.get("models", {}).items() if m.get("variant")]


def format_summary(report: dict) -> str:
    """The stdout view: the compatibility table as plain text (verdicts at ``ecc_fars[0]``)."""
    fars = report.get("fars", report["ecc_fars"])
    first = report["ecc_fars"][0]
    search = report.get("ecc_search") or {}
    head = ["model", "cross", *[f"TAR@{_far_label(f)}" for f in fars], f"old|old@{_far_label(first)}",
            "margin [95%]", "ECC", "gain", "self", *(["rank-1", "1:N ECC"] if search else []), "decision"]
    rows = [head]
    for name, holds in report["ecc"].items():
        cell = report["cross_cell"][name]
        gain = report["update_gain"].get(name)
        self_cell = "new|new" if name == "fct" else f"{name}|{name}"
        rows.append([name, cell, *[_pct(_tar(report, cell, f)) for f in fars],
                     _pct(_tar(report, "old|old", first)),
                     _margin(report["ecc_detail"][name].get(first)), _verdict(holds, "FAILS"),
                     "-" if gain is None else f"{gain:+.3f}", _pct(_tar(report, self_cell, first)),
                     *([_pct(search[name]["cross"]), _search_verdict(report, name, "FAILS")]
                       if search else []),
                     _decision(report, name)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]
    notes = ["margin: TAR(cross) - TAR(old|old) in points, 95% interval from a bootstrap over subjects; "
             "ECC holds when the interval is above 0, too close to call when it holds 0"]
    if report.get("unresolved_fars"):
        notes.append("not resolved by this test set (fewer than 20 impostor pairs above the threshold): FAR "
                     + ", ".join(_far_label(f) for f in report["unresolved_fars"]))
    notes += variant_notes(report)
    title = (f"compatibility with the old gallery (IJB-C-style 1:1, TAR %; ECC and gain at FAR "
             f"{_far_label(first)}")
    if search:
        own = next(iter(search.values()))["old"]
        title += f"; 1:N: rank-1 %, G1 and G2 pooled, ECC against old|old's {_pct(own)}"
    return "\n".join([title + "):", *text, *notes])


__all__ = ["CERTIFICATE_KEYS", "build_report", "format_report", "format_summary", "verdict_lines"]
