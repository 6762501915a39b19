#!/usr/bin/env python
"""Benchmark what each compatibility method adds to the training step, against plain ArcFace
(``none``) on the same backbone, head, optimiser and batches (synthetic images, a random
old-feature bank; the methods' host-side bank lookups are timed with the step). Methods run
interleaved for --rounds rounds; each figure is the method's median round.

  python tools/bench_compat.py --network r18-w0.25 --embedding-size 128 --batch-size 64 --num-classes 5000
  torchrun --nproc_per_node=8 tools/bench_compat.py --network r50 --num-classes 93431 --json
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
    writable_dir,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bench_compat.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all",
                        help="comma-separated method names; none is always measured (default: all, every "
                             "registered method, plug-ins included)")
    parser.add_argument("--network", default="r18", help="backbone name (default r18)")
    parser.add_argument("--embedding-size", type=positive_int, default=512)
    parser.add_argument("--batch-size", type=positive_int, default=128, help="per rank (default 128)")
    parser.add_argument("--num-classes", type=positive_int, default=20000,
                        help="head classes (default 20000)")
    parser.add_argument("--num-records", type=positive_int,
                        help="records in the random bank (default 5 x --num-classes)")
    parser.add_argument("--sample-rate", type=unit_fraction, default=1.0, help="Partial FC ρ (default 1.0)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="timed steps per method per round (default 20)")
    parser.add_argument("--warmup", type=non_negative_int, default=5,
                        help="untimed steps before a method's first round (default 5)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (default 3)")
    add_device_arg(parser)
    parser.add_argument("--threads", type=positive_int,
                        help="torch CPU threads (default: torch's; 1 is steadier on a busy machine)")
    parser.add_argument("--workdir", type=writable_dir, metavar="DIR",
                        help="existing folder where the temporary bank is written (default: the temp "
                        "directory)")
    add_json_arg(parser, "the result")
    return parser


def format_table(result: dict) -> str:
    lines = [f"{result['network']} D={result['embedding_size']} {result['precision']} "
             f"batch {result['batch_size']}x{result['world_size']} ρ={result['sample_rate']} "
             f"C={result['num_classes']} on {result['device_name']} ({result['threads']} threads), "
             f"median of {result['rounds']} rounds x {result['steps']} steps",
             f"{'method':<8} {'ms/step':>9} {'samples/s':>10} {'vs none':>8} {'paired':>7} {'host ms':>8}"]
    for name, m in result["methods"].items():
        lines.append(f"{name:<8} {m['ms_per_step']:>9.1f} {m['samples_per_s']:>10.1f} {m['ratio']:>7.3f}x "
                     f"{m['ratio_paired']:>6.3f}x {m['host_ms_per_step']:>8.2f}")
    return "\n".join(lines)


def selected_methods(text: str) -> list[str]:
    """``--methods``: the names given, or for ``all`` every registered method (plug-ins included)."""
    from facecompat.compat.registry import list_methods

    methods = [name.strip() for name in text.split(",") if name.strip()]
    if methods == ["all"]:
        return ["none", *list_methods()]
    unknown = [name for name in methods if name not in ("none", *list_methods())]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r}" if unknown else "no method named")
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from facecompat.cli import resolve_device, run_collective, write_json
    from facecompat.compat.registry import list_methods
    from facecompat.errors import UserError
    from facecompat.models import ModelNameError, parse_model_name

    try:
        methods = selected_methods(args.methods)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--methods: {exc} (valid: all, or some of none, {', '.join(list_methods())})")
    try:
        parse_model_name(args.network)
    except ModelNameError as exc:  # unknown backbone name (lists the valid ones)
        parser.error(f"--network: {exc}")
    num_records = 5 * args.num_classes if args.num_records is None else args.num_records
    if num_records < args.num_classes:
        parser.error(f"--num-records ({num_records}) must be >= --num-classes ({args.num_classes}): "
                     "every class needs a record in the bank")
    if args.batch_size > num_records:
        parser.error(f"--batch-size ({args.batch_size}) is larger than the bank ({num_records} records, "
                     "--num-records)")
    try:  # this process's device (LOCAL_RANK is set before the group is joined)
        device = resolve_device(args.device)
    except UserError as exc:
        parser.error(str(exc))
    from facecompat.train.bench_compat import bench_compat_step

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    status, rank, result = run_collective(lambda: bench_compat_step(
        methods, network=args.network, embedding_size=args.embedding_size, batch_size=args.batch_size,
        num_classes=args.num_classes, num_records=args.num_records, sample_rate=args.sample_rate,
        precision=args.precision, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
        device=device, workdir=args.workdir), (UserError,))
    if status:
        return status
    if rank == 0:
        write_json(result, args.json)
        if str(args.json) != "-":
            print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
