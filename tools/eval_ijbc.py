#!/usr/bin/env python
"""IJB-C / IJB-B 1:1 verification and 1:N identification, self and cross-model.

Cross test:  python tools/eval_ijbc.py --query new --gallery old
Matrix:      python tools/eval_ijbc.py --matrix old,new,bct,mixbct --json work_dirs/eval/matrix.json
Features:    python tools/eval_ijbc.py --query-features A.npy --gallery-features B.npy
Distributed extraction:  torchrun --nproc_per_node=8 tools/eval_ijbc.py --matrix old,new
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from facecompat.cli import (
    OneLineParser,
    add_device_arg,
    add_json_arg,
    comma_floats,
    comma_names,
    far_value,
    non_negative_int,
    output_dir,
    output_file,
    positive_int,
)

DEFAULT_CATALOG = Path("configs/eval_ijbc.yaml")

EPILOG = """\
models:
  a name from the catalog (--config, default configs/eval_ijbc.yaml: per name a run directory or
  a weights file with its network, or {transform: DIR}, an FCT transformation), or a run directory /
  weights file / transformation directory path (--network NAME for a weights file). A
  transformation's features are h(old, side-information) of each face: --query new --gallery fct
  is the new model against the old gallery upgraded by FCT. The catalog also gives data_root,
  target and cache_dir; the command line wins.
  Features are extracted once per model (f(img) + f(flip(img)), bf16 autocast on GPU, under
  torchrun split over the ranks) and cached as <cache_dir>/features/<name>/<target>.npy with a
  fingerprint (weights hash, network, flip, alignment, face list); a stale cache is re-extracted.

cells (DESIGN §5): "A|B" = query model A embeds every pair's second template (the probes) and the
1:N probes; gallery model B embeds every pair's first template (IJB-C's enrolled side, the G1 and G2
gallery templates) and the 1:N galleries, as the public cross-model evaluator does
(verification_11(gallery feats, ..., query feats, ..., p1, p2)). A transformation (FCT) is a gallery:
it upgrades the enrolled side. --query A --gallery B reports A|B, B|A, A|A and B|B;
--matrix a,b,c every combination, plus ECC verdicts and update gains against --old (default
"old") with --independent (default "new") as the reference new model.
verdicts (the certificate's rules, tools/certify.py): at every FAR the set resolves (at least 20
impostor pairs above the threshold; the others are listed, never judged), the margin TAR(m|old) -
TAR(old|old) with a 95% interval from a bootstrap over subjects: ECC holds when the interval is above
0, fails below, is too close to call when it holds 0; the decision at the operating FAR (--far,
default the smallest resolved) also needs 1:N rank-1.
protocol (insightface's eval_ijbc.py): face feature x detector score, media mean, template sum,
L2, cosine; TAR at the ROC point nearest each FAR (and the strict best TAR with FAR <= target).

precomputed features: --query-features A.npy [--gallery-features B.npy], [N, D] float rows in
the order of meta/<target>_name_5pts_score.txt, flip already fused, not score-weighted.

outputs: tables on stdout; --json [OUT] ({"1:1": {"tar_at_far": {"1e-06": ...}, ...}, "1:N": ...,
"matrix": {"A|B": ...}, "ecc", "update_gain", "models", "skipped"}, fractions in [0, 1]; --json
alone: on stdout instead of the tables);
--roc PNG; --save-scores DIR (pairs.npy = [M, 3] t1, t2, label in pair-file order, and
<query>__<gallery>.npy per cell: the score of gallery-model t1 against query-model t2).
bad input (missing meta file or image, malformed line, unknown template, dimension or row-count
mismatch) stops with one line and exit status 2; --allow-missing skips and counts instead. Output
paths (--json, --roc, --save-scores) are checked before the evaluation starts.

examples:
  python tools/eval_ijbc.py --config configs/eval_ijbc_synthetic.yaml --matrix old,new --roc roc.png
  python tools/eval_ijbc.py --query work_dirs/ms1mv3_r50 --gallery zoo/r18.pth --network r18 --no-1n
"""


def _names(text: str) -> list[str]:
    return comma_names(text, "model names")


def _fars(text: str) -> list[float]:
    fars = comma_floats(text, "FARs")
    if not fars or not all(0.0 < f < 1.0 for f in fars):
        raise argparse.ArgumentTypeError(f"FARs must be in (0, 1), got {text!r}")
    return fars


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="eval_ijbc.py", description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to evaluate (one of)")
    what.add_argument("--query", metavar="MODEL", help="query model (catalog name or path); alone: self test")
    what.add_argument("--gallery", metavar="MODEL", help="gallery model for the cross test")
    what.add_argument("--matrix", type=_names, metavar="A,B,...", help="every query x gallery combination")
    what.add_argument("--query-features", type=Path, metavar="NPY",
                      help="precomputed features of the query model (it embeds the probes)")
    what.add_argument("--gallery-features", type=Path, metavar="NPY",
                      help="precomputed features of the gallery model (it embeds the enrolled side)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help=f"model catalog and defaults (default {DEFAULT_CATALOG} when it exists)")
    p.add_argument("--data-root", type=Path, metavar="DIR", help="holds <target>/meta and loose_crop")
    p.add_argument("--target", choices=("IJBC", "IJBB"), help="benchmark (default from the catalog: IJBC)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="feature cache root (catalog's cache_dir)")
    p.add_argument("--network", help="backbone of a weights-file model given by path (e.g. r50)")
    p.add_argument("--old", default="old", help="old model of --matrix verdicts (default: old)")
    p.add_argument("--independent", default="new",
                   help="independently trained new model for update gains (default: new; 'none' to skip)")
    p.add_argument("--ecc-fars", type=_fars, metavar="F,...",
                   help="FARs of the ECC verdicts (default 1e-6 .. 1e-1); those the set cannot resolve are "
                        "listed, never judged")
    p.add_argument("--far", type=far_value, metavar="F",
                   help="operating FAR of the ECC column and the decision (default: the smallest resolved)")
    p.add_argument("--replicates", type=positive_int, default=1000, metavar="N",
                   help="bootstrap replicates of the verdicts' intervals (default 1000)")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="bootstrap seed (default 0)")
    p.add_argument("--no-1n", dest="one_to_n", action="store_false", help="skip 1:N identification")
    p.add_argument("--no-1to1", dest="one_to_one", action="store_false", help="skip 1:1 verification")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip (and count) faces, images, pairs and templates that are missing")
    add_json_arg(p)
    p.add_argument("--roc", type=output_file, metavar="PNG", help="write the 1:1 ROC curves of every cell")
    p.add_argument("--save-scores", type=output_dir, metavar="DIR", help="write per-pair 1:1 scores (.npy)")
    add_device_arg(p)
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="faces per forward pass")
    p.add_argument("--workers", type=non_negative_int, metavar="N",
                   help="DataLoader workers for image decoding")
    p.add_argument("--no-faiss", dest="faiss", action="store_false", help="1:N search with numpy instead")
    return p


# ------------------------------------------------------------------------------------------- main
def _mode(args: argparse.Namespace) -> tuple[list[str], dict[str, Path] | None, list | None, dict]:
    """What to evaluate: (models, precomputed features, cells, verdict arguments) from the flags."""
    from facecompat.eval import matrix

    if args.query_features is not None:
        names = [args.query_features.stem]
        if args.gallery_features is not None:
            stem = args.gallery_features.stem
            names.append(stem if stem != names[0] else stem + "_2")
        features = dict(zip(names, [args.query_features, args.gallery_features]))
        models = []
    elif args.matrix:
        names, features, models = args.matrix, None, args.matrix
    else:
        names = [args.query] if args.gallery in (None, args.query) else [args.query, args.gallery]
        features, models = None, names
    if args.matrix:  # every combination; verdicts against --old, gains against --independent
        return models, features, None, {"old": args.old, "independent": args.independent}
    cells = matrix.pair_cells(names[0], names[-1])
    if len(names) == 2:  # cross test: is the query compatible with the gallery?
        return models, features, cells, {"old": names[1], "independent": None, "candidates": [names[0]]}
    return models, features, cells, {"old": None}


def run(args: argparse.Namespace, log):
    """The whole evaluation (:func:`facecompat.pipelines.evaluate.evaluate_ijb`); the Evaluation on
    rank 0, None on the other ranks."""
    from facecompat.cli import resolve_device
    from facecompat.eval.catalog import load_catalog
    from facecompat.pipelines.evaluate import evaluate_ijb

    device = resolve_device(args.device)  # before anything is read: a device that cannot be used fails first
    catalog_path = args.config or (DEFAULT_CATALOG if DEFAULT_CATALOG.is_file() else None)
    catalog = load_catalog(catalog_path)
    models, features, cells, verdicts = _mode(args)
    return evaluate_ijb(
        catalog, models, features=features, cells=cells, **verdicts, ecc_fars=args.ecc_fars, far=args.far,
        replicates=args.replicates, seed=args.seed,
        data_root=args.data_root, target=args.target, cache_dir=args.cache_dir,
        catalog_source=str(catalog_path) if catalog_path else "the default catalog (no --config)",
        network=args.network, one_to_one=args.one_to_one, one_to_n=args.one_to_n, use_faiss=args.faiss,
        allow_missing=args.allow_missing, batch_size=args.batch_size, workers=args.workers, device=device,
        scores_dir=args.save_scores, log=log)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = [args.query is not None, args.matrix is not None, args.query_features is not None]
    if sum(modes) != 1:
        parser.error("give exactly one of --query MODEL, --matrix A,B,... or --query-features NPY")
    if args.gallery is not None and args.query is None:
        parser.error("--gallery needs --query")
    if args.gallery_features is not None and args.query_features is None:
        parser.error("--gallery-features needs --query-features")
    if args.independent == "none":
        args.independent = None

    from facecompat.cli import run_collective, write_json
    from facecompat.errors import UserError

    rank = int(os.environ.get("RANK", "0"))

    def log(line: str) -> None:
        if rank == 0:
            print(line, file=sys.stderr, flush=True)

    status, rank, ev = run_collective(lambda: run(args, log), (UserError,))
    if status or ev is None:
        return status
    if args.roc and args.one_to_one:
        from facecompat.eval import matrix

        matrix.plot_roc(ev.curves, args.roc, f"{ev.target} 1:1 ROC")
    write_json(ev.to_dict(), args.json)
    if str(args.json) == "-":
        return 0
    print(ev.tables(args.matrix))
    for label, path in (("results", args.json), ("ROC", args.roc), ("scores", args.save_scores)):
        if path is not None:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
