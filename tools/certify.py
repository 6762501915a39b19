#!/usr/bin/env python
"""The upgrade certificate: can the candidates' queries search the old gallery, at which threshold,
how sure, and what changes for users?

Models:    python tools/certify.py --old old --new bct,mixbct --independent new --out work_dirs/cert
Own faces: python tools/certify.py --old old --new bct --faces faces/ --out work_dirs/cert_faces
Features:  python tools/certify.py --old old --new bct --old-features OLD.npy --new-features BCT.npy
Distributed extraction:  torchrun --nproc_per_node=8 tools/certify.py --old old --new bct --out DIR
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
    comma_names,
    far_value,
    non_negative_int,
    output_dir,
    output_file,
    positive_int,
)

DEFAULT_CATALOG = Path("configs/eval_ijbc.yaml")

EPILOG = """\
what it does: evaluates old|old, each candidate's cross cell (candidate|old; an FCT gallery
transformation: independent|fct), candidate|candidate (after a full backfill) and, with
--independent, new*|new*, on an IJB-C / IJB-B folder, then for every FAR from 1e-6 to 1e-1:
  - TAR and the operating threshold of every cell, each with a 95% interval from a bootstrap over
    SUBJECTS (pairs share templates and subjects: a binomial over pairs overstates certainty);
  - ECC verdicts (margin cand|old - old|old: holds when its interval is above 0, fails below, too
    close to call when it holds 0) and update gains; 1:N rank-1 the same way (G1 and G2 pooled);
  - thresholds at cut-over: old|old's, the candidate's own, and the candidate's TAR if today's
    threshold is kept;
  - churn: genuine pairs old|old accepts and the candidate rejects (now and after a full backfill);
    1:N probes right at rank 1 before and wrong after.
A FAR the set cannot resolve (fewer than 20 impostor pairs above the threshold) is listed as such,
never judged. The decision at the operating FAR (--far, default the smallest resolved FAR):
compatible when 1:1 and 1:N ECC hold, incompatible when either fails, else too close to call.

deployment parity (--parity, models only): each candidate exported to ONNX (tools/export_onnx.py's
export; FCT's h as its own graph) and run by onnxruntime on the evaluation faces: the largest cosine
deviation from the PyTorch features and the TAR change at each FAR (a CPU provider takes ~0.1 s per
face for an r18 on 2 cores: use --providers CUDAExecutionProvider for IJB-C).
outputs: the decision table on stdout; --out DIR: certificate.json (DESIGN §8), certificate.md,
scores_<candidate>.png; --json [OUT], --md OUT to put them elsewhere (--json alone: JSON on stdout).
models: catalog names (--config, default configs/eval_ijbc.yaml) or run directories / weights files
(--network for a weights file) / FCT transformation directories, extracted once and cached.
precomputed features: --old-features and --new-features (one file per candidate, in --new's order;
--independent-features with --independent), rows in the order of meta/<target>_name_5pts_score.txt.
bad input stops with one line and exit status 2; outputs are checked before the evaluation.
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="certify.py", description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, metavar="MODEL", help="the deployed model (its gallery is stored)")
    p.add_argument("--new", required=True, type=lambda t: comma_names(t, "candidate models"),
                   metavar="MODEL[,MODEL...]", help="candidates to certify against the old gallery")
    p.add_argument("--independent", metavar="MODEL",
                   help="independently trained new model: update gains, and the queries of an FCT gallery")
    p.add_argument("--old-features", type=Path, metavar="NPY", help="precomputed features of --old")
    p.add_argument("--new-features", type=lambda t: [Path(v) for v in comma_names(t, "feature files")],
                   metavar="NPY[,NPY...]", help="precomputed features of each --new model, in order")
    p.add_argument("--independent-features", type=Path, metavar="NPY",
                   help="precomputed features of --independent")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help=f"model catalog and defaults (default {DEFAULT_CATALOG} when it exists)")
    p.add_argument("--data-root", type=Path, metavar="DIR", help="holds <target>/meta and loose_crop")
    p.add_argument("--faces", type=Path, metavar="DIR",
                   help="your own labelled faces, DIR/<identity>/<image>: made into a test set under --out")
    p.add_argument("--landmarks", type=Path, metavar="FILE",
                   help="5-point landmarks of --faces that are not aligned (as tools/im2rec.py takes them)")
    p.add_argument("--bin", type=Path, metavar="FILE",
                   help="a verification .bin (LFW, CFP, AgeDB) as the test set")
    p.add_argument("--protocol-seed", type=non_negative_int, default=0, metavar="N",
                   help="seed of the --faces split into templates, galleries and pairs (default 0)")
    p.add_argument("--target", choices=("IJBC", "IJBB"), help="benchmark (default from the catalog: IJBC)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="feature cache root (catalog's cache_dir)")
    p.add_argument("--network", help="backbone of a weights-file model given by path (e.g. r50)")
    p.add_argument("--far", type=far_value, metavar="F",
                   help="operating FAR (default: the smallest resolved)")
    p.add_argument("--replicates", type=positive_int, default=1000, metavar="N",
                   help="bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="bootstrap seed (default 0)")
    p.add_argument("--out", type=output_dir, metavar="DIR", help="certificate.json, certificate.md, plots")
    add_json_arg(p, "the certificate")
    p.add_argument("--md", type=output_file, metavar="OUT", help="write certificate.md here")
    p.add_argument("--parity", action="store_true",
                   help="export each candidate to ONNX and compare onnxruntime with PyTorch on the faces")
    p.add_argument("--providers", type=lambda t: comma_names(t, "onnxruntime providers"), metavar="P,...",
                   help="onnxruntime providers for --parity (default CPUExecutionProvider)")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip (and count) faces, images, pairs and templates that are missing")
    add_device_arg(p)
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="faces per forward pass")
    p.add_argument("--workers", type=non_negative_int, metavar="N", help="DataLoader workers for decoding")
    p.add_argument("--no-faiss", dest="faiss", action="store_false", help="1:N similarity with numpy")
    return p


def _features(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Path] | None:
    given = [args.old_features, args.new_features, args.independent_features]
    if all(g is None for g in given):
        return None
    if args.old_features is None or args.new_features is None:
        parser.error("precomputed features need both --old-features and --new-features")
    if len(args.new_features) != len(args.new):
        parser.error(f"--new-features: {len(args.new_features)} files for {len(args.new)} --new models")
    if args.independent and args.independent_features is None:
        parser.error("--independent with precomputed features needs --independent-features")
    out = {args.old: args.old_features, **dict(zip(args.new, args.new_features))}
    if args.independent:
        out[args.independent] = args.independent_features
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    features = _features(args, parser)
    sets = [args.data_root is not None, args.faces is not None, args.bin is not None]
    if sum(sets) > 1:
        parser.error("give one test set: --data-root, --faces or --bin")
    if (args.faces is not None or args.bin is not None) and args.out is None:
        parser.error("--faces / --bin need --out DIR (the test set is written under DIR/protocol)")
    if args.landmarks is not None and args.faces is None:
        parser.error("--landmarks goes with --faces")
    if (args.faces is not None or args.bin is not None) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--faces / --bin under torchrun: write the test set first (tools/make_protocol.py), "
                     "then give it as --data-root")

    from facecompat.cli import resolve_device, run_collective, write_json
    from facecompat.errors import UserError

    rank = int(os.environ.get("RANK", "0"))

    def log(line: str) -> None:
        if rank == 0:
            print(line, file=sys.stderr, flush=True)

    def work():
        from facecompat.eval.catalog import load_catalog
        from facecompat.pipelines.certify import certify, protocol_set

        device = resolve_device(args.device)
        data_root, cache_dir, target = args.data_root, args.cache_dir, args.target
        if args.faces is not None or args.bin is not None:
            target = "IJBC"  # the layout protocol_set writes
            data_root = protocol_set(args.out, faces=args.faces, landmarks=args.landmarks, bin_path=args.bin,
                                     seed=args.protocol_seed, log=log)
            cache_dir = cache_dir or args.out / "cache"  # its own feature cache: no other set's features
        catalog_path = args.config or (DEFAULT_CATALOG if DEFAULT_CATALOG.is_file() else None)
        source = str(catalog_path) if catalog_path else "the default catalog (no --config)"
        return certify(load_catalog(catalog_path), old=args.old, candidates=args.new,
                       independent=args.independent, features=features, out_dir=args.out,
                       json_path=None if args.json is None or str(args.json) == "-" else args.json,
                       md_path=args.md, far=args.far, replicates=args.replicates, seed=args.seed,
                       data_root=data_root, target=target, cache_dir=cache_dir,
                       catalog_source=source,
                       network=args.network, allow_missing=args.allow_missing, batch_size=args.batch_size,
                       workers=args.workers, device=device, use_faiss=args.faiss, parity=args.parity,
                       providers=args.providers, log=log)

    status, rank, cert = run_collective(work, (UserError,))
    if status or cert is None:
        return status
    if args.json is not None and str(args.json) == "-":
        write_json(cert, args.json)
        return 0
    from facecompat.eval.certificate_report import summary_table

    print(summary_table(cert))
    for label, path in (("out", args.out), ("json", args.json), ("md", args.md)):
        if path is not None:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
