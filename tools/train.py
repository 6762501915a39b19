#!/usr/bin/env python
"""Train a face-embedding model (backbone + Partial FC ArcFace head) from a config.

One process:       python tools/train.py configs/synthetic_old.yaml
One machine:       torchrun --nproc_per_node=8 tools/train.py configs/ms1mv3_r50.yaml
Several machines:  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
                       --rdzv-endpoint=HOST:29500 --rdzv-id=JOB tools/train.py configs/ms1mv3_r50.yaml
"""

from __future__ import annotations

import argparse
import sys

from facecompat.cli import OneLineParser, add_json_arg, output_dir

EPILOG = """\
outputs in <train.output>/<train.exp_name or the config's stem>/:
  model.pt       the backbone's state_dict (insightface-compatible), after every epoch
  checkpoints/   step_XXXXXXXX/ (all state, head shards re-shardable to another world size)
  config.yaml    the resolved config; train.log; metrics.jsonl; tensorboard/

resuming: train.resume=auto (default) continues from the newest complete checkpoint of the
run directory; --set train.resume=PATH from a given one; --set train.resume=none starts over.
Under torchrun --max-restarts=N a failed worker restarts the job from its last checkpoint.

examples:
  python tools/train.py configs/synthetic_old.yaml --set train.epochs=2
  torchrun --nproc_per_node=2 tools/train.py configs/synthetic_old.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    from facecompat.config import add_config_args

    parser = OneLineParser(prog="train.py", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--output", metavar="DIR", type=output_dir,
                        help="parent of the run directory (train.output)")
    add_json_arg(parser, "the run summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from facecompat.cli import run_collective, write_json
    from facecompat.config import config_from_args
    from facecompat.errors import UserError
    from facecompat.train import run_dir_for, train

    if args.output:
        args.overrides = [f"train.output={args.output}", *args.overrides]

    def work() -> dict:
        cfg = config_from_args(args)
        return train(cfg, run_dir_for(cfg, args.config))

    status, rank, summary = run_collective(work, (UserError,))
    if status:
        return status
    if rank == 0:
        if args.json:
            write_json(summary, args.json)
        if str(args.json) != "-":
            acc = ", ".join(f"{k} {v * 100:.2f}%" for k, v in summary["verification"].items())
            print(f"done: {summary['step']} steps, loss {summary['loss']:.4f}"
                  f"{'; ' + acc if acc else ''}; model {summary['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
