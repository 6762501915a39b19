#!/usr/bin/env python
"""Upgrade a stored gallery with FCT's transformation h(φ_old, ψ) instead of re-extracting it.

python tools/transform_gallery.py --transform work_dirs/synthetic_fct --old work_dirs/gallery/old \\
    --side work_dirs/gallery/side --out work_dirs/gallery/fct
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from facecompat.cli import OneLineParser, add_device_arg, add_json_arg, output_dir, positive_int, run_main
from facecompat.errors import UserError

EPILOG = """\
inputs (feature stores, facecompat/index/store.py; tools/extract_gallery.py writes them):
  --old    rows of the transformation's old model (the version of fct.json's models.old:
           <network>-<weights sha1[:12]>); rows already in its new model's space (a partially
           backfilled store) are copied unchanged with their version; any other version is refused
           (one line naming the version found and the one expected).
  --side   side-information of the same items (matched by item id, in any order; extra items are
           ignored), every row of the side model's version; required exactly when h was trained
           with side-information.

output (--out, built in a hidden temporary directory beside it and renamed into place: a failure
  leaves nothing behind): the same items in the same order, the transformed rows tagged with the
  transform version fct-<weights sha1[:12]> (from old, side, to new: comparable with new-model
  queries); uncertainty.npy [N] float32 = FastFill's predicted sigma^2 per row (NaN for copied
  rows) when h predicts it, named in store.json's meta.uncertainty (backfill reads it to order
  items by uncertainty).

report: rows transformed / copied, versions in and out, seconds, rows/s and seconds per 1M gallery
  items; --compare STORE adds the re-extraction cost recorded by extract_gallery.py in that store
  (e.g. the new model's gallery: what backfilling the whole gallery would cost), and the speed-up.
  --json [OUT] prints the summary as JSON (or writes OUT).
bad input stops with one line and exit status 2.

examples:
  python tools/transform_gallery.py --transform work_dirs/synthetic_fct --old work_dirs/gallery/old \\
      --side work_dirs/gallery/side --out work_dirs/gallery/fct --device cpu
  python tools/transform_gallery.py --transform work_dirs/fct_noside --old galleries/old \\
      --out galleries/fct --chunk-rows 262144 --device cuda --json report.json \\
      --compare galleries/new
"""


class GalleryToolError(UserError, ValueError):
    """Bad input the tool reports in one line (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="transform_gallery.py", description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transform", required=True, type=Path, metavar="DIR",
                   help="FCT transformation directory (tools/train_fct.py's output: transform.pt, fct.json)")
    p.add_argument("--old", required=True, type=Path, metavar="STORE", help="the stored old-model gallery")
    p.add_argument("--side", type=Path, metavar="STORE", help="the side-information store of the same items")
    p.add_argument("--out", required=True, type=output_dir, metavar="DIR", help="the upgraded store to write")
    p.add_argument("--chunk-rows", type=positive_int, default=65536, metavar="N",
                   help="rows read, transformed and written per step (default 65536)")
    add_device_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--compare", type=Path, metavar="STORE",
                   help="a store made by extract_gallery.py whose recorded extraction time to compare with")
    add_json_arg(p, "the summary (instead of the report)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _reextraction(path: Path) -> dict:
    """The extraction cost extract_gallery.py recorded in a store's meta."""
    from facecompat.index.store import FeatureStore

    store = FeatureStore.open(path, check_finite=False)
    ext = store.meta.get("extraction")
    if not isinstance(ext, dict):
        raise GalleryToolError(f"--compare {path}: its store.json records no extraction (not written by "
                               "tools/extract_gallery.py)")
    return {"store": str(path), "model": store.meta.get("model", {}).get("source"),
            "cached": bool(ext.get("cached")), "device": ext.get("device"),
            "s_per_1M_items": ext.get("s_per_1M_items")}


def transform(args: argparse.Namespace) -> dict:
    """Open the inputs, run :func:`facecompat.index.upgrade.transform_store` with a progress bar."""
    from tqdm import tqdm

    from facecompat.cli import resolve_device
    from facecompat.compat.fct import FCTransform
    from facecompat.index.store import FeatureStore
    from facecompat.index.upgrade import read_uncertainty, transform_store

    if (args.out / "store.json").exists() and not args.overwrite:  # before any work
        raise GalleryToolError(f"--out {args.out}: a feature store exists there (--overwrite replaces it)")
    device = resolve_device(args.device)
    fct = FCTransform.load(args.transform, device)
    old = FeatureStore.open(args.old)
    side = FeatureStore.open(args.side) if args.side is not None else None
    compare = _reextraction(args.compare) if args.compare is not None else None
    bar = tqdm(total=old.num_items, desc="transform", unit="row", unit_scale=True, disable=not args.progress,
               leave=False, file=sys.stderr)

    def progress(done: int) -> None:
        bar.update(done - bar.n)

    start = time.perf_counter()
    try:
        store = transform_store(fct, old, side, args.out, chunk_rows=args.chunk_rows, progress=progress,
                                overwrite=args.overwrite)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    up = store.meta["upgrade"]
    rate = up["rows_transformed"] / seconds if seconds > 0 and up["rows_transformed"] else None
    version = store.versions[0]
    summary = {"out": str(store.path), "transform": version["id"], "transform_dir": str(args.transform),
               "from": version["from"], "side": version["side"], "to": version["to"],
               "rows": store.num_items, "rows_transformed": up["rows_transformed"],
               "rows_copied": up["rows_copied"], "dim_in": old.dim, "dim_out": store.dim,
               "versions_in": old.version_counts(),
               "side_versions": side.version_counts() if side is not None else None,
               "versions_out": store.version_counts(), "uncertainty": read_uncertainty(store) is not None,
               "device": str(device), "seconds": round(seconds, 4),
               "rows_per_s": round(rate, 1) if rate else None,
               "s_per_1M_items": round(1e6 / rate, 2) if rate else None}
    if compare is not None:
        per_1m = compare["s_per_1M_items"]
        compare["speedup"] = round(per_1m / summary["s_per_1M_items"], 1) \
            if per_1m and summary["s_per_1M_items"] else None
        summary["reextraction"] = compare
    return summary


def report(s: dict) -> str:
    def counts(c: dict | None) -> str:
        return ", ".join(f"{k} {v}" for k, v in (c or {}).items()) or "none"

    rate = (f"{s['rows_per_s']:,.0f} rows/s, {s['s_per_1M_items']:.2f} s per 1M items" if s["rows_per_s"]
            else "no rows transformed")
    lines = [f"upgraded gallery {s['out']}  ({s['rows']} rows, {s['dim_in']}-d -> {s['dim_out']}-d)",
             f"  transform   {s['transform']}: {s['from']}" + (f" + side {s['side']}" if s["side"] else "")
             + f" -> {s['to']}  ({s['transform_dir']})",
             f"  rows        {s['rows_transformed']} transformed, {s['rows_copied']} copied "
             "(already in the new space)",
             f"  versions in {counts(s['versions_in'])}" + (f"; side {counts(s['side_versions'])}"
                                                           if s["side_versions"] else ""),
             f"  versions out {counts(s['versions_out'])}",
             "  uncertainty " + ("uncertainty.npy (sigma^2 per row)" if s["uncertainty"]
                                 else "none (h has no sigma^2 output)"),
             f"  time        {s['seconds']:.2f} s on {s['device']}: {rate}"]
    re = s.get("reextraction")
    if re is not None:
        if re["s_per_1M_items"]:
            faster = f", transformation {re['speedup']}x faster" if re.get("speedup") else ""
            lines.append(f"  re-extraction ({re['model']}, {re['device']}): {re['s_per_1M_items']:.0f} s per "
                         f"1M items{faster}")
        else:
            lines.append(f"  re-extraction: unknown ({re['store']} was filled from the feature cache)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from facecompat.cli import write_json

    summary = transform(args)
    write_json(summary, args.json)
    if args.json is None or str(args.json) != "-":
        print(report(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("transform_gallery.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
