#!/usr/bin/env python
"""IJB-C / IJB-B 1:1 verification and 1:N identification, self and cross-model.

Cross test:  python tools/eval_ijbc.py --query new --gallery old
Matrix:      python tools/eval_ijbc.py --matrix old,new,bct,mixbct --json work_dirs/eval/matrix.json
Features:    python tools/eval_ijbc.py --query-features A.npy --gallery-features B.npy
Distributed extraction:  torchrun --nproc_per_node=8 tools/eval_ijbc.py --matrix old,new
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from facecompat.cli import OneLineParser, comma_floats, comma_names, positive_int

if TYPE_CHECKING:  # nothing heavy at import time: --help stays fast
    import numpy as np

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
protocol (insightface's eval_ijbc.py): face feature x detector score, media mean, template sum,
L2, cosine; TAR at the ROC point nearest each FAR (and the strict best TAR with FAR <= target).

precomputed features: --query-features A.npy [--gallery-features B.npy], [N, D] float rows in
the order of meta/<target>_name_5pts_score.txt, flip already fused, not score-weighted.

outputs: tables on stdout; --json OUT ({"1:1": {"tar_at_far": {"1e-06": ...}, ...}, "1:N": ...,
"matrix": {"A|B": ...}, "ecc", "update_gain", "models", "skipped"}, fractions in [0, 1]);
--roc PNG; --save-scores DIR (pairs.npy = [M, 3] t1, t2, label in pair-file order, and
<query>__<gallery>.npy per cell: the score of gallery-model t1 against query-model t2).
bad input (missing meta file or image, malformed line, unknown template, dimension or row-count
mismatch) stops with one line and exit status 2; --allow-missing skips and counts instead.

examples:
  python tools/eval_ijbc.py --config configs/eval_ijbc_synthetic.yaml --matrix old,new --roc roc.png
  python tools/eval_ijbc.py --query work_dirs/ms1mv3_r50 --gallery zoo/r18.pth --network r18 --no-1n
"""


class EvalError(ValueError):
    """Bad input the tool reports in one line (exit status 2)."""


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
    p.add_argument("--ecc-fars", type=_fars, default=[1e-4], metavar="F,...",
                   help="ECC must hold at each of these FARs (default 1e-4; the first gives the update gain)")
    p.add_argument("--no-1n", dest="one_to_n", action="store_false", help="skip 1:N identification")
    p.add_argument("--no-1to1", dest="one_to_one", action="store_false", help="skip 1:1 verification")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip (and count) faces, images, pairs and templates that are missing")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    p.add_argument("--roc", type=Path, metavar="PNG", help="write the 1:1 ROC curves of every cell")
    p.add_argument("--save-scores", type=Path, metavar="DIR", help="write per-pair 1:1 scores (.npy)")
    p.add_argument("--device", help="torch device for extraction (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="faces per forward pass")
    p.add_argument("--workers", type=int, metavar="N", help="DataLoader workers for image decoding")
    p.add_argument("--no-faiss", dest="faiss", action="store_false", help="1:N search with numpy instead")
    return p


# ---------------------------------------------------------------------------------------- helpers
def _load_features(path: Path, num_faces: int, what: str) -> np.ndarray:
    import numpy as np

    if not path.is_file():
        raise EvalError(f"{path}: {what} features not found")
    try:
        feats = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise EvalError(f"{path}: cannot read {what} features as .npy ({exc})") from None
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
        raise EvalError(f"{path}: {what} features must be a 2-D float array [faces, dim], got "
                        f"{feats.dtype} {tuple(feats.shape)}")
    if feats.shape[0] != num_faces:
        raise EvalError(f"{path}: {feats.shape[0]} {what} feature rows, the face list has {num_faces} faces "
                        "(rows follow meta/*_name_5pts_score.txt)")
    return feats


def _extract(specs: dict, args: argparse.Namespace, catalog, ijb_dir: Path, target: str, device,
             log) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of every model (cached), full face order; also the rows of faces whose image is missing."""
    from facecompat.eval.extract import read_face_list
    from facecompat.eval.features import model_features

    faces = read_face_list(ijb_dir, target, allow_missing=args.allow_missing)
    feats = model_features(specs, catalog, ijb_dir, target, faces, cache_dir=args.cache_dir,
                           batch_size=args.batch_size, num_workers=args.workers, device=device, log=log)
    return feats, faces.missing_rows


def _specs(args: argparse.Namespace, catalog, catalog_source: str, names: list[str]) -> dict:
    from facecompat.eval.features import resolve_models

    try:
        return resolve_models(names, catalog, catalog_source, args.network)
    except ValueError as exc:
        if "different embedding sizes" in str(exc):
            raise EvalError(str(exc)) from None
        raise


def run(args: argparse.Namespace, log) -> dict | None:
    """The whole evaluation; returns the results on rank 0 (None on other ranks)."""
    import numpy as np

    from facecompat import dist
    from facecompat.eval import ijb, matrix
    from facecompat.eval.catalog import load_catalog

    catalog_path = args.config or (DEFAULT_CATALOG if DEFAULT_CATALOG.is_file() else None)
    catalog = load_catalog(catalog_path)
    catalog_source = str(catalog_path) if catalog_path else "the default catalog (no --config)"
    target = args.target or catalog.target
    data_root = args.data_root or Path(catalog.data_root)
    ijb_dir = ijb.find_target_dir(data_root, target)  # IJBMetaError naming the folder looked at
    by_features = args.query_features is not None
    if by_features:
        names = [args.query_features.stem]
        if args.gallery_features is not None:
            stem = args.gallery_features.stem
            names.append(stem if stem != names[0] else stem + "_2")
        cells = matrix.pair_cells(names[0], names[-1])
    elif args.matrix:
        names = args.matrix
        cells = matrix.matrix_cells(names)
    else:
        names = [args.query] if args.gallery in (None, args.query) else [args.query, args.gallery]
        cells = matrix.pair_cells(names[0], names[-1])

    rank, world = dist.init_distributed()
    meta, problem = None, None
    if rank == 0:  # parse the meta files before the long extraction; every rank learns if it failed
        try:
            meta = ijb.load_ijb_meta(ijb_dir, target, allow_missing=args.allow_missing,
                                     cache_dir=args.cache_dir or Path(catalog.cache_dir))
        except ijb.IJBMetaError as exc:
            problem = str(exc)
    if world > 1:
        problem = dist.broadcast_object(problem)
    if problem is not None:
        raise EvalError(problem if rank == 0 else f"[rank {rank}] meta files failed on rank 0")

    specs: dict = {}
    missing_rows = np.zeros(0, np.int64)
    if by_features:
        if rank != 0:  # nothing to extract: rank 0 evaluates alone
            return None
        paths = [args.query_features] + ([args.gallery_features] if args.gallery_features else [])
        feats = {n: _load_features(p, meta.num_faces, what)
                 for n, p, what in zip(names, paths, ("query", "gallery"))}
        dims = {n: f.shape[1] for n, f in feats.items()}
        if len(set(dims.values())) > 1:
            raise EvalError(f"query features are {dims[names[0]]}-d ({paths[0]}), gallery features "
                            f"{dims[names[-1]]}-d ({paths[-1]}): they cannot be compared")
    else:
        specs = _specs(args, catalog, catalog_source, names)
        from facecompat.cli import resolve_device

        device = resolve_device(args.device)
        feats, missing_rows = _extract(specs, args, catalog, ijb_dir, target, device, log)
        if rank != 0:
            return None
        sizes = {n: f.shape[0] for n, f in feats.items()}
        bad = {n: s for n, s in sizes.items() if s != meta.num_faces}
        if bad:
            raise EvalError(f"features of {', '.join(bad)} have {sorted(set(bad.values()))} rows, the face "
                            f"list has {meta.num_faces} faces")

    skipped = {"faces_not_in_both_face_files": meta.num_missing_faces,
               "pairs_without_faces": meta.num_missing_pairs}
    if missing_rows.size:
        meta, dropped = matrix.drop_faces(meta, missing_rows)
        skipped.update({"images_missing": dropped["faces"], "templates_without_images": dropped["templates"],
                        "pairs_without_images": dropped["pairs"], "probes_without_images": dropped["probes"],
                        "gallery_templates_without_images": dropped["gallery_templates"]})
    if any(skipped.values()):
        counts = [f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if v]
        log("skipped (--allow-missing): " + ", ".join(counts))

    one_to_n = args.one_to_n and meta.has_1n
    if args.one_to_n and not meta.has_1n:
        log(f"no 1:N files in {ijb_dir / 'meta'}: 1:1 only")
    if not args.one_to_one and not one_to_n:
        raise EvalError("nothing to evaluate: --no-1to1 and no 1:N (files missing or --no-1n)")
    pooled = {}
    for name in names:
        start = time.perf_counter()
        pooled[name] = ijb.pool(meta, feats.pop(name))
        if not np.isfinite(pooled[name].feats).all():
            raise EvalError(f"{specs[name].source if name in specs else name}: features hold NaN or inf")
        log(f"pooled {name}: {pooled[name].templates.size} templates ({time.perf_counter() - start:.1f} s)")
    results, curves = matrix.evaluate_cells(meta, pooled, cells, one_to_one=args.one_to_one,
                                            one_to_n=one_to_n, use_faiss=args.faiss,
                                            scores_dir=args.save_scores, progress=log)
    out: dict = {"target": target, "data_root": str(data_root),
                 "models": {n: ({"source": s.source, "network": s.network, "embedding_size": s.embedding_size,
                                 "weights": str(s.weights)} if (s := specs.get(n)) else
                                {"features": str(p)}) for n, p in zip(names, _feature_paths(args, names))},
                 "skipped": skipped}
    first = matrix.cell_key(*cells[0])
    out.update({"query": cells[0][0], "gallery": cells[0][1], **results[first], "matrix": results})
    if args.matrix:
        old = args.old if args.old in names else None
        independent = args.independent if args.independent in names else None
        if old is None:
            log(f"no ECC verdicts: --old {args.old} is not in --matrix")
        elif args.one_to_one:
            # A transformation (FCT) upgrades a gallery; it never embeds queries: no verdict of its own.
            queries = [n for n in names if getattr(specs.get(n), "network", None) != "fct"]
            out.update(matrix.compatibility(results, queries, old, independent, args.ecc_fars))
    elif len(names) == 2 and args.one_to_one:  # cross test: is the query compatible with the gallery?
        out.update(matrix.compatibility(results, [names[0]], names[1], None, args.ecc_fars))
    if args.roc and args.one_to_one:
        matrix.plot_roc(curves, args.roc, f"{target} 1:1 ROC")
    return out


def _feature_paths(args: argparse.Namespace, names: list[str]) -> list:
    if args.query_features is None:
        return [None] * len(names)
    return [args.query_features, args.gallery_features][:len(names)]


def report(out: dict, names_in_matrix: list[str] | None) -> str:
    from facecompat.eval import matrix

    parts = [matrix.format_cells(out["matrix"], out["target"])]
    if names_in_matrix:
        parts.append(matrix.format_matrix(out["matrix"], names_in_matrix, out["target"]))
    if out.get("ecc_detail"):
        parts.append(matrix.format_verdicts(out))
    return "\n\n".join(parts)


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

    from facecompat import dist
    from facecompat.compat.fct import FCTError
    from facecompat.config import ConfigError
    from facecompat.eval.extract import ExtractError
    from facecompat.eval.ijb import IJBMetaError
    from facecompat.fileio import atomic_write
    from facecompat.models import WeightsError

    rank = int(os.environ.get("RANK", "0"))

    def log(line: str) -> None:
        if rank == 0:
            print(line, file=sys.stderr, flush=True)

    try:
        out = run(args, log)
        if out is not None and args.json:
            with atomic_write(args.json, "w") as f:
                    json.dump(out, f, indent=1)
    except (EvalError, ConfigError, ExtractError, IJBMetaError, WeightsError, FCTError, ValueError,
            OSError) as exc:
        if rank == 0 or not isinstance(exc, EvalError):
            print(f"{'' if rank == 0 else f'[rank {rank}] '}error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy()
    if out is None:
        return 0
    print(report(out, args.matrix))
    for label, path in (("results", args.json), ("ROC", args.roc), ("scores", args.save_scores)):
        if path is not None:
            print(f"{label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
