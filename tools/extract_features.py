#!/usr/bin/env python
"""Extract the old model's features of a training view into an old-feature bank (before training).

One process:   python tools/extract_features.py configs/mixbct.yaml
One machine:   torchrun --nproc_per_node=8 tools/extract_features.py configs/mixbct.yaml --credible 0.9
"""

from __future__ import annotations

import argparse
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
    unit_fraction,
)

EPILOG = """\
The view is the one the trainer reads (data.rec, data.subset, data.protocol/part); the old model is
compat.old (checkpoint, network, embedding_size). The bank goes to --out, else compat.bank_dir, else
<train.output>/banks/<old model>-<hash>: where training with the same config looks for it.
A complete bank is reused when it matches (same weights, every record of the view with its class);
a mismatching bank is an error, never silently rebuilt. An interrupted extraction resumes, also
under another number of ranks. Class statistics (and --credible masks) are computed at the end.

examples:
  python tools/extract_features.py configs/synthetic_mixbct.yaml --device cpu --json
  python tools/extract_features.py configs/ms1mv3_mixbct.yaml --set compat.old.checkpoint=work_dirs/r18
"""


def build_parser() -> argparse.ArgumentParser:
    from facecompat.config import add_config_args

    parser = OneLineParser(prog="extract_features.py", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", metavar="DIR", type=output_dir,
                        help="bank directory (default: compat.bank_dir or under train.output/banks)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help="images per forward "
                        "(default: eval.batch_size)")
    parser.add_argument("--workers", type=non_negative_int, metavar="N",
                        help="DataLoader workers (default: data.num_workers)")
    add_device_arg(parser)
    parser.add_argument("--credible", type=unit_fraction, action="append", default=[], metavar="RATIO",
                        help="also compute the MixBCT credible mask for this keep ratio (repeatable)")
    add_json_arg(parser, "the summary")
    return parser


def run(cfg, args: argparse.Namespace) -> dict:
    """Build or reuse the bank; the summary (every rank)."""
    import torch

    from facecompat.cli import resolve_device
    from facecompat.compat.build import resolve_old_model
    from facecompat.data.loader import build_dataset
    from facecompat.features import default_bank_dir, ensure_bank

    device = resolve_device(args.device)
    view = build_dataset(cfg.data)
    spec, _, _ = resolve_old_model(cfg)
    directory = Path(args.out or cfg.compat.bank_dir or default_bank_dir(cfg.train.output, spec, view))
    start = time.perf_counter()
    bank = ensure_bank(view, spec, directory, credible_ratios=tuple(args.credible),
                       batch_size=args.batch_size or cfg.eval.batch_size,
                       num_workers=cfg.data.num_workers if args.workers is None else args.workers,
                       device=device, autocast_dtype=torch.float16 if device.type == "cuda" else None)
    seconds = time.perf_counter() - start
    return {"path": str(directory), "records": len(bank), "dims": bank.embedding_size,
            "extracted": bank.num_extracted, "seconds": round(seconds, 3),
            "images_per_s": round(2 * bank.num_extracted / seconds, 1) if bank.num_extracted else None,
            "model": spec.source, "view_records": view.num_images}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from facecompat.cli import run_collective, write_json
    from facecompat.config import config_from_args
    from facecompat.errors import UserError

    status, rank, summary = run_collective(lambda: run(config_from_args(args), args), (UserError,))
    if status:
        return status
    if rank == 0:
        write_json(summary, args.json)
        if str(args.json) != "-":
            speed = f" in {summary['seconds']:.1f} s ({summary['images_per_s']:.0f} images/s)" \
                if summary["extracted"] else " (reused)"
            print(f"bank {summary['path']}: {summary['records']} records x 2 x {summary['dims']} float16, "
                  f"{summary['extracted']} extracted{speed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
