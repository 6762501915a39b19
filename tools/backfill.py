#!/usr/bin/env python
"""Partial backfilling on the IJB-C-style 1:N protocol: how identification improves as a growing share
of the gallery is re-embedded with the new model, for each order of re-embedding.

    python tools/backfill.py --config configs/eval_ijbc_synthetic.yaml --query new --stored fct \\
        --json work_dirs/backfill/fct.json --png work_dirs/backfill/fct.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facecompat.cli import (
    OneLineParser,
    add_device_arg,
    add_json_arg,
    comma_floats,
    comma_names,
    non_negative_int,
    output_file,
    positive_int,
    run_main,
)
from facecompat.errors import UserError

EPILOG = """\
what is compared:
  --query MODEL embeds the 1:N probes and, at fraction f, the first f of the gallery faces in the
  chosen order; the other gallery faces keep what --stored holds: the old model's features, or an
  FCT transformation's (a catalog {transform: DIR} entry or a transformation directory), whose
  features are h(old, side-information). Models are catalog names (--config, default
  configs/eval_ijbc.yaml) or paths, features cached as in tools/eval_ijbc.py.

orderings (--orderings, default: every one that applies):
  random       seeded permutations (--seed, --seed + 1, ...): the curve is the mean over
               --random-runs of them (default 5), with the standard deviation of its area
  uncertainty  the faces FCT is least sure of first (FastFill; needs a transformation that predicts
               its uncertainty)
  distance     the faces whose stored feature lies farthest from their subject's mean first

metrics: 1:N CMC rank-1/5/10 and TPIR at FPIR 1e-2 / 1e-1 (DESIGN §5) over the galleries G1 and
G2 as the public cross-model evaluator reports them: rank-k pooled (hits over all their mated
probes), TPIR the mean of the two galleries' TPIRs (each has its own threshold);
area = the plain mean of the metric over the evenly spaced fractions (FastFill's definition).
Outputs: a table per metric on stdout; --json prints {"query", "stored", "orderings": {name:
{"fractions", "metric": {name: [..]}, "area": {name: x}, "per_gallery", ...}}} instead (--json OUT
writes it to OUT beside the table); --png the curves of --metric.
Bad input stops with one line and exit status 2, before any extraction.

examples:
  python tools/backfill.py --config configs/eval_ijbc_synthetic.yaml --query new --stored old
  python tools/backfill.py --query new --stored fct --orderings random,uncertainty \
      --fractions 0,0.25,0.5,0.75,1
"""

ORDERINGS = ("random", "uncertainty", "distance")


class BackfillToolError(UserError, ValueError):
    """Bad input the tool reports in one line (exit status 2)."""


def _orderings(text: str) -> list[str]:
    return comma_names(text, "orderings", ORDERINGS)


def _fractions(text: str) -> list[float]:
    return comma_floats(text, "fractions")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="backfill.py", description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--query", required=True, metavar="MODEL", help="the new model (probes, backfilled faces)")
    p.add_argument("--stored", required=True, metavar="MODEL",
                   help="what the gallery holds before backfilling: the old model or an FCT transformation")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="model catalog (default configs/eval_ijbc.yaml)")
    p.add_argument("--data-root", type=Path, metavar="DIR", help="holds <target>/meta and loose_crop")
    p.add_argument("--target", choices=("IJBC", "IJBB"), help="benchmark (default from the catalog)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="feature cache root (catalog's cache_dir)")
    p.add_argument("--orderings", type=_orderings, metavar="A,B",
                   help="orderings to run (default: all that apply)")
    p.add_argument("--fractions", type=_fractions, metavar="F,...",
                   help="backfilled fractions, evenly spaced from 0 to 1 (default 0, 0.1, ..., 1)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="first seed of the random orderings (default 0)")
    p.add_argument("--random-runs", type=positive_int, default=5, metavar="N",
                   help="random orderings averaged (default 5): one seed decides little on small galleries")
    p.add_argument("--metric", default="rank1", help="metric of the PNG (default rank1; e.g. tpir@fpir=0.01)")
    add_json_arg(p, "the curves")
    p.add_argument("--png", type=output_file, metavar="OUT", help="plot the curves of --metric")
    add_device_arg(p)
    p.add_argument("--no-faiss", dest="faiss", action="store_false", help="1:N search with numpy instead")
    return p


def run(args: argparse.Namespace, log) -> dict:
    import numpy as np

    from facecompat.cli import resolve_device
    from facecompat.eval import ijb
    from facecompat.eval.catalog import TransformSpec, load_catalog
    from facecompat.eval.extract import read_face_list
    from facecompat.eval.features import model_features, resolve_models
    from facecompat.index import backfill

    if args.metric not in backfill.metric_names():
        raise BackfillToolError(f"--metric {args.metric}: choose among {', '.join(backfill.metric_names())}")
    if args.query == args.stored:
        raise BackfillToolError(f"--query and --stored are both {args.query!r}: backfilling changes nothing")
    try:
        fractions = backfill.check_fractions(args.fractions if args.fractions is not None
                                             else backfill.DEFAULT_FRACTIONS)
    except ValueError as exc:
        raise BackfillToolError(f"--fractions: {exc}") from None
    device = resolve_device(args.device)
    default = Path("configs/eval_ijbc.yaml")
    catalog_path = args.config or (default if default.is_file() else None)
    catalog = load_catalog(catalog_path)
    source = str(catalog_path) if catalog_path else "the default catalog (no --config)"
    try:
        specs = resolve_models([args.query, args.stored], catalog, source)
    except UserError as exc:  # name the flags the models came from
        raise BackfillToolError(f"--query {args.query} / --stored {args.stored}: {exc}") from None
    if isinstance(specs[args.query], TransformSpec):
        raise BackfillToolError(f"--query {args.query}: a transformation cannot embed images; "
                                "give the new model")
    target = args.target or catalog.target
    ijb_dir = ijb.find_target_dir(args.data_root or Path(catalog.data_root), target)
    meta = ijb.load_ijb_meta(ijb_dir, target, cache_dir=args.cache_dir or Path(catalog.cache_dir))
    if not meta.has_1n:
        raise BackfillToolError(f"{ijb_dir / 'meta'}: no 1:N gallery/probe files: nothing to backfill")
    faces = read_face_list(ijb_dir, target)
    uncertainty: dict = {}
    feats = model_features(specs, catalog, ijb_dir, target, faces, cache_dir=args.cache_dir,
                           device=device, log=log, uncertainty=uncertainty)
    var = uncertainty.get(args.stored)
    orderings = args.orderings or [o for o in ORDERINGS if o != "uncertainty" or var is not None]
    if "uncertainty" in orderings and var is None:
        raise BackfillToolError(f"--orderings uncertainty: --stored {args.stored} predicts no uncertainty "
                         "(it is not an FCT transformation trained with transform.uncertainty)")
    new = np.asarray(feats[args.query])
    curves = backfill.ordering_curves(meta, new, feats[args.stored], new, orderings, fractions,
                                      uncertainty=var, seed=args.seed, random_runs=args.random_runs,
                                      use_faiss=args.faiss, progress=log)
    names = {role: (s.source if hasattr(s, "source") else str(s)) for role, s in
             (("query", specs[args.query]), ("stored", specs[args.stored]))}
    return {"target": target, "query": args.query, "stored": args.stored, "sources": names,
            "num_items": next(iter(curves.values()))["num_items"], "orderings": curves}


def report(out: dict) -> str:
    """One table per headline metric: a row per fraction, a column per ordering, the areas last."""
    curves = out["orderings"]
    first = next(iter(curves.values()))
    lines = [f"partial backfill on {out['target']} 1:N: query {out['query']}, gallery stored as "
             f"{out['stored']} ({out['num_items']} gallery faces); metric in %, mean over "
             f"{', '.join(first['galleries'])}"]
    for metric in ("rank1", "tpir@fpir=0.01"):
        if metric not in first["metric"]:
            continue
        head = ["fraction", *curves]
        rows = [[f"{f:.2f}", *(f"{c['metric'][metric][i] * 100:.2f}" for c in curves.values())]
                for i, f in enumerate(first["fractions"])]
        rows.append(["area", *(f"{c['area'][metric] * 100:.2f}" for c in curves.values())])
        if any("area_sd" in c for c in curves.values()):
            rows.append(["area sd", *(f"{c['area_sd'][metric] * 100:.2f}" if "area_sd" in c else "-"
                                      for c in curves.values())])
        widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
        lines += ["", metric]
        lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [head, *rows]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("backfill.py", lambda: _run_and_report(args))


def _run_and_report(args: argparse.Namespace) -> int:
    from facecompat.cli import write_json
    from facecompat.index import backfill

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    out = run(args, log)
    write_json(out, args.json)
    if args.png:
        backfill.plot_backfill(out["orderings"], args.png, args.metric,
                               title=f"{out['target']} 1:N, query {out['query']}, stored {out['stored']}")
    if args.json is not None and str(args.json) == "-":
        return 0
    print(report(out))
    for label, path in (("results", args.json), ("plot", args.png)):
        if path is not None:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
