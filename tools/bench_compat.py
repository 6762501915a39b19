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
import json
import sys

from facecompat.cli import OneLineParser, positive_int


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
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC ρ (default 1.0)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="timed steps per method per round (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps before a method's first round (default 5)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--device", help="cpu, cuda (this process's GPU: LOCAL_RANK modulo the visible "
                        "GPUs) or cuda:N; default cuda when available")
    parser.add_argument("--threads", type=positive_int,
                        help="torch CPU threads (default: torch's; 1 is steadier on a busy machine)")
    parser.add_argument("--workdir", help="where the temporary bank is written (default: the temp directory)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
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
    methods = [name.strip() for name in text.split(",") if name.strip()]
    if methods == ["all"]:
        from facecompat.compat.registry import list_methods

        return ["none", *list_methods()]
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from facecompat.cli import resolve_device, run_collective

    try:  # this process's device (LOCAL_RANK is set before the group is joined)
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    from facecompat.train.bench_compat import bench_compat_step

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = selected_methods(args.methods)
    status, rank, result = run_collective(lambda: bench_compat_step(
        methods, network=args.network, embedding_size=args.embedding_size, batch_size=args.batch_size,
        num_classes=args.num_classes, num_records=args.num_records, sample_rate=args.sample_rate,
        precision=args.precision, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
        device=device, workdir=args.workdir), (ValueError,))
    if status:
        return status
    if rank == 0:
        print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
