#!/usr/bin/env python
"""Benchmark the training step: forward, backward and optimiser on synthetic tensors (no I/O).

  python tools/bench_train.py --network r18-w0.125 --batch-size 64 --num-classes 1000
  torchrun --nproc_per_node=8 tools/bench_train.py --network r50 --precision bf16 --sample-rate 0.1
"""

from __future__ import annotations

import argparse
import sys

from facecompat.cli import (
    OneLineParser,
    add_device_arg,
    add_json_arg,
    non_negative_int,
    positive_int,
    unit_fraction,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bench_train.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="r50", help="backbone name (default r50)")
    parser.add_argument("--embedding-size", type=positive_int, default=512)
    parser.add_argument("--batch-size", type=positive_int, default=128, help="per rank (default 128)")
    parser.add_argument("--num-classes", type=positive_int, default=93431,
                        help="head classes (default MS1Mv3's 93431)")
    parser.add_argument("--sample-rate", type=unit_fraction, default=1.0, help="Partial FC ρ (default 1.0)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--channels-last", action="store_true", help="channels_last layout (CUDA only)")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps first (default 5)")
    add_device_arg(parser)
    add_json_arg(parser, "the result")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from facecompat.cli import resolve_device, run_collective, write_json
    from facecompat.errors import UserError
    from facecompat.models import ModelNameError, parse_model_name

    try:
        parse_model_name(args.network)
    except ModelNameError as exc:  # unknown backbone name (lists the valid ones)
        parser.error(f"--network: {exc}")
    try:  # this process's device (LOCAL_RANK is set before the group is joined)
        device = resolve_device(args.device)
    except UserError as exc:
        parser.error(str(exc))
    from facecompat.train.bench import StepBenchSpec, bench_train_step

    spec = StepBenchSpec(network=args.network, embedding_size=args.embedding_size, batch_size=args.batch_size,
                         num_classes=args.num_classes, sample_rate=args.sample_rate, precision=args.precision,
                         channels_last=args.channels_last, steps=args.steps, warmup=args.warmup)
    status, rank, result = run_collective(lambda: bench_train_step(spec, device), (UserError,))
    if status:
        return status
    if rank == 0:
        write_json(result, args.json)
        if str(args.json) != "-":
            print(f"{result['network']} {result['precision']} "
                  f"batch {result['batch_size']}x{result['world_size']} "
                  f"ρ={result['sample_rate']} C={result['num_classes']} on {result['device_name']}: "
                  f"{result['samples_per_s']:.1f} samples/s, {result['ms_per_step']:.1f} ms/step, "
                  f"peak {result['peak_memory_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
