#!/usr/bin/env python
"""Store one model's features of an IJB-C / IJB-B face set as a versioned gallery feature store.

One process:  python tools/extract_gallery.py --config configs/eval_ijbc_synthetic.yaml --model old \\
                  --out work_dirs/gallery/old --gallery-only
Distributed:  torchrun --nproc_per_node=8 tools/extract_gallery.py --model old --out galleries/old
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from facecompat.cli import (
    OneLineParser,
    add_device_arg,
    add_json_arg,
    non_negative_int,
    output_dir,
    positive_int,
    run_collective,
)
from facecompat.errors import UserError

DEFAULT_CATALOG = Path("configs/eval_ijbc.yaml")

EPILOG = """\
model: a name from the catalog (--config, default configs/eval_ijbc.yaml when it exists) or a run
  directory / weights file path (--network NAME for a weights file), as for tools/eval_ijbc.py. An
  FCT transformation ({transform: DIR}) is not a model: store its old (and side-information)
  model's gallery here and upgrade it with tools/transform_gallery.py.

what is stored (facecompat/index/store.py): features.npy [N, D] float32 (f(img) + f(flip(img)),
  not normalised, not score-weighted, as evaluation uses them), ids.npy = the face rows (0-based
  line numbers of meta/<target>_name_5pts_score.txt), every row tagged with the model's version
  <network>-<weights sha1[:12]>; store.json's meta names the face list and the extraction cost.
  --gallery-only keeps only the faces of the 1:N gallery templates (G1 + G2, or S1 + S2), the
  items tools/backfill.py re-embeds. Extraction covers the whole face list and is cached
  (<cache_dir>/features/<model>/<target>.npy, shared with eval_ijbc.py): a second run, or a run
  after an evaluation of the same model, only reads the cache.

outputs: the store at --out (written atomically, store.json last; an existing store needs
  --overwrite); a summary on stdout; --json [OUT] prints it as JSON (or writes OUT).
bad input (unknown model, missing meta file or image, no 1:N files with --gallery-only, an
  existing store) stops with one line and exit status 2.

examples:
  python tools/extract_gallery.py --config configs/eval_ijbc_synthetic.yaml --model old \\
      --out work_dirs/gallery/old --gallery-only
  python tools/extract_gallery.py --config configs/eval_ijbc_synthetic.yaml \\
      --model work_dirs/synthetic_side --out work_dirs/gallery/side --gallery-only
  python tools/transform_gallery.py --transform work_dirs/synthetic_fct --old work_dirs/gallery/old \\
      --side work_dirs/gallery/side --out work_dirs/gallery/fct
"""


class GalleryToolError(UserError, ValueError):
    """Bad input the tool reports in one line (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="extract_gallery.py", description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="catalog name or run directory / weights file")
    p.add_argument("--out", required=True, type=output_dir, metavar="DIR", help="the feature store to write")
    p.add_argument("--gallery-only", action="store_true",
                   help="keep only the faces of the 1:N gallery templates (needs the 1:N CSVs)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help=f"model catalog and defaults (default {DEFAULT_CATALOG} when it exists)")
    p.add_argument("--data-root", type=Path, metavar="DIR", help="holds <target>/meta and loose_crop")
    p.add_argument("--target", choices=("IJBC", "IJBB"), help="face set (default from the catalog: IJBC)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="feature cache root (catalog's cache_dir)")
    p.add_argument("--network", help="backbone of a weights-file model given by path (e.g. r50)")
    p.add_argument("--allow-missing", action="store_true",
                   help="leave out (and count) faces whose image is missing instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    add_device_arg(p)
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="faces per forward pass")
    p.add_argument("--workers", type=non_negative_int, metavar="N",
                   help="DataLoader workers for image decoding")
    add_json_arg(p, "the summary (instead of the report)")
    return p


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def extract(args: argparse.Namespace, log) -> dict | None:
    """Extract (or read cached) features, keep the chosen faces, write the store on rank 0."""
    import numpy as np

    from facecompat import dist
    from facecompat.cli import resolve_device
    from facecompat.eval.catalog import TransformSpec, load_catalog, resolve_model
    from facecompat.eval.extract import cache_paths, read_face_list
    from facecompat.eval.features import model_features
    from facecompat.eval.ijb import find_target_dir
    from facecompat.fileio import file_sha1
    from facecompat.index.upgrade import store_model_features

    if (args.out / "store.json").exists() and not args.overwrite:  # before any work
        raise GalleryToolError(f"--out {args.out}: a feature store exists there (--overwrite replaces it)")
    device = resolve_device(args.device)
    catalog_path = args.config or (DEFAULT_CATALOG if DEFAULT_CATALOG.is_file() else None)
    catalog = load_catalog(catalog_path)
    source = str(catalog_path) if catalog_path else "the default catalog (no --config)"
    target = args.target or catalog.target
    ijb_dir = find_target_dir(args.data_root or Path(catalog.data_root), target)
    cache_dir = args.cache_dir or Path(catalog.cache_dir)
    try:
        spec = resolve_model(args.model, catalog, source, args.network)
    except UserError as exc:  # name the flag the model came from
        raise GalleryToolError(f"--model: {exc}") from None
    if isinstance(spec, TransformSpec):
        raise GalleryToolError(
            f"--model {args.model}: an FCT transformation ({spec.directory}), not a model; store its old "
            f"model's gallery (and its side-information model's) here, then run tools/transform_gallery.py "
            f"--transform {spec.directory} --old STORE [--side STORE] --out DIR")
    faces = read_face_list(ijb_dir, target, allow_missing=args.allow_missing)
    items = faces.rows
    if args.gallery_only:
        from facecompat.eval.ijb import load_ijb_meta
        from facecompat.index.backfill import gallery_items

        meta = load_ijb_meta(ijb_dir, target, allow_missing=args.allow_missing, cache_dir=cache_dir)
        try:
            items = np.intersect1d(gallery_items(meta), faces.rows)
        except ValueError as exc:  # no 1:N files, or inconsistent ones: the data's fault
            raise GalleryToolError(f"--gallery-only: {exc}") from None
        if items.size == 0:
            raise GalleryToolError(f"{ijb_dir}: no gallery face has an image")
    npy = cache_paths(cache_dir, spec.name, target)[0]
    before = _mtime(npy)
    start = time.perf_counter()
    feats = model_features({spec.name: spec}, catalog, ijb_dir, target, faces, cache_dir=cache_dir,
                           batch_size=args.batch_size, num_workers=args.workers, device=device,
                           log=log)[spec.name]
    seconds = time.perf_counter() - start
    if dist.get_rank() != 0:
        return None
    fresh = _mtime(npy) != before  # the cache file was (re)written: this run extracted
    num_faces = len(faces)
    extraction = {"cached": not fresh, "seconds": round(seconds, 3), "faces": num_faces,
                  "device": str(device), "world_size": dist.get_world_size(),
                  "s_per_1M_items": round(seconds / num_faces * 1e6, 1) if fresh and num_faces else None}
    whole = items.size == feats.shape[0]  # every face kept: the (memory-mapped) array as is, no copy
    store_meta = {"items": f"face rows of {faces.source.name}", "target": target, "ijb_dir": str(ijb_dir),
                  "face_list": str(faces.source), "face_list_sha1": file_sha1(faces.source),
                  "gallery_only": bool(args.gallery_only), "flip": bool(catalog.flip),
                  "model": {"name": spec.name, "source": spec.source, "weights": str(spec.weights)},
                  "extraction": extraction}
    fingerprint = spec.fingerprint()
    store = store_model_features(args.out, feats if whole else np.asarray(feats[items]), items, fingerprint,
                                 meta=store_meta, overwrite=args.overwrite)
    return {"out": str(store.path), "model": spec.source, "version": store.versions[0]["id"],
            "rows": store.num_items, "dim": store.dim, "faces": num_faces,
            "faces_missing": faces.num_missing, "gallery_only": bool(args.gallery_only),
            "target": target, "extraction": extraction}


def report(summary: dict) -> str:
    ext = summary["extraction"]
    cost = (f"read from the cache in {ext['seconds']:.1f} s" if ext["cached"] else
            f"extracted in {ext['seconds']:.1f} s on {ext['device']} x {ext['world_size']} "
            f"({ext['s_per_1M_items']:.0f} s per 1M faces)")
    what = "gallery faces" if summary["gallery_only"] else "faces"
    lines = [f"gallery store {summary['out']}",
             f"  model    {summary['model']}  version {summary['version']}",
             f"  rows     {summary['rows']} {what} of {summary['faces']} in the {summary['target']} "
             f"face list, {summary['dim']}-d" + (f" ({summary['faces_missing']} missing images left out)"
                                      if summary["faces_missing"] else ""),
             f"  features {cost}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from facecompat.cli import write_json

    rank = int(os.environ.get("RANK", "0"))

    def log(line: str) -> None:
        if rank == 0:
            print(line, file=sys.stderr, flush=True)

    status, rank, summary = run_collective(lambda: extract(args, log), (UserError,))
    if status or summary is None:
        return status
    write_json(summary, args.json)
    if args.json is None or str(args.json) != "-":
        print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
