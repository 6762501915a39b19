#!/usr/bin/env python
"""Peak memory of one Partial FC rank, measured on the CPU, against the formula
(facecompat.heads.head_memory_bytes). One configuration per process (the peak is the process's).

  python tools/bench_head_memory.py --num-classes 2000000 --world-size 8 --sample-rate 0.1
  python tools/bench_head_memory.py --num-classes 10000000 --world-size 8 --sample-rate 0.1 --json
"""

from __future__ import annotations

import argparse
import sys

from facecompat.cli import OneLineParser, add_json_arg, positive_int, unit_fraction


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bench_head_memory.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=positive_int, default=2_000_000, help="all ranks' classes")
    parser.add_argument("--world-size", type=positive_int, default=8, help="ranks sharing them (default 8)")
    parser.add_argument("--sample-rate", type=unit_fraction, default=0.1, help="Partial FC ρ (default 0.1)")
    parser.add_argument("--global-batch", type=positive_int, default=1024,
                        help="all ranks' batch (default 1024)")
    parser.add_argument("--embedding-size", type=positive_int, default=512)
    add_json_arg(parser, "the result")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from facecompat.cli import write_json
    from facecompat.train.bench import bench_head_memory

    result = bench_head_memory(args.num_classes, args.world_size, args.sample_rate, args.global_batch,
                               args.embedding_size)
    write_json(result, args.json)
    if str(args.json) != "-":
        print(f"Partial FC rank: {result['num_local']:,} classes x {result['embedding_size']}, "
              f"ρ={result['sample_rate']}, global batch {result['global_batch']}: "
              f"measured peak {result['measured_gib']:.2f} GiB, formula {result['formula_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
