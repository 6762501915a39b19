#!/usr/bin/env python
"""Train FCT's transformation h(φ_old, ψ) -> φ_new on cached features of the new training set.

One process:   python tools/train_fct.py configs/synthetic_fct.yaml
One machine:   torchrun --nproc_per_node=8 tools/train_fct.py configs/ms1mv3_fct.yaml
"""

from __future__ import annotations

import argparse
import sys

from facecompat.cli import OneLineParser, add_device_arg, add_json_arg

EPILOG = """\
config keys (facecompat.compat.fct.FCTConfig):
  data.*        the NEW model's training view (rec, protocol, part, ...), as in training configs
  old / side / new: {checkpoint, network, embedding_size}: the three models (run directory or
                model.pt); side: null trains the variant without side-information
  transform:    {hidden: [512, 512], uncertainty: true}   (uncertainty: FastFill's log σ² output)
  train:        {epochs, batch_size (rows per rank), lr, weight_decay, warmup_epochs,
                 cosine_weight, nll_weight, val_ratio, seed}
  output:       the transformation's directory (transform.pt, fct.json, metrics.jsonl)
  bank_root:    feature banks go to <bank_root>/banks/<model>-<hash>, shared with BCT-style training
                (the old model's bank of the new view is the one they already built)

What it does: extracts (once, resumable, split over the ranks) the old, side-information and new
models' features of every record of the view, image and flip, float16; then trains h on three rows
per record (image, flip, fused) with gradients averaged over ranks, and reports how well it fits
records it never saw (cos(h, new) against the untransformed cos(old, new)) and what it cost
(extraction and training seconds, in fct.json).

examples:
  python tools/train_fct.py configs/synthetic_fct.yaml --set train.epochs=5
  python tools/train_fct.py configs/synthetic_fct.yaml --set side=null --set output=work_dirs/fct_noside
"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="train_fct.py", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="FCT config YAML (see below)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set train.epochs=5")
    add_device_arg(parser)
    add_json_arg(parser, "the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    from facecompat.cli import resolve_device, run_collective, write_json
    from facecompat.compat.fct import load_fct_config
    from facecompat.errors import UserError
    from facecompat.train.fct import train_transformation

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def work() -> dict:
        cfg = load_fct_config(args.config, args.overrides)
        device = resolve_device(args.device)
        return train_transformation(cfg, device=device, log=logging.getLogger("facecompat.fct"))

    status, rank, summary = run_collective(work, (UserError,))
    if status or rank != 0:
        return status
    write_json(summary, args.json)
    if str(args.json) == "-":
        return 0
    fit = summary["fit"].get("held_out", summary["fit"]["train"])
    cost = summary["cost"]
    print(f"transformation {args.config}: {summary['data']['rows']} rows, "
          f"{summary['training']['steps']} steps")
    print(f"  fit (held-out records): cos(h, new) {fit['cos']:.4f}  cos(old, new) {fit['cos_old']:.4f}  "
          f"mse {fit['mse']:.4f}")
    print(f"  cost: features {cost['extract_s']:.1f} s (extracted {cost['records_extracted']}), "
          f"training {cost['train_s']:.1f} s on {cost['device']} x {cost['world_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
