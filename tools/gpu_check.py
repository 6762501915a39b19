#!/usr/bin/env python
"""Check the project's whole GPU path in one command: at most 8 minutes on one H100/H200, without
DALI, faiss, the internet or a pip install (run it through tools/gpu_check.sh, which sets PYTHONPATH).

    bash tools/gpu_check.sh                      # the full check on this machine's GPU
    bash tools/gpu_check.sh --dry-run            # the same steps at tiny sizes on the CPU

Every step is timed and recorded as passed, failed (one-line reason; traceback in the log) or
skipped (with the reason); a failed step does not stop the others. Outputs in --out:
summary.json (rewritten atomically after every step, so a killed run keeps what it measured),
gpu_check.log (everything printed, with the subprocesses' output), logs/ (one file per
subprocess), data/, runs/, quickstart/. Exit status 1 when a step failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facecompat.cli import OneLineParser, comma_names

REPO = Path(__file__).resolve().parents[1]


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from facecompat.gpu_check import STEP_NAMES, STEPS

    steps = "\n".join(f"  {i:>2}. {name:<26} {STEPS[name]}" for i, name in enumerate(STEP_NAMES, 1))
    parser = OneLineParser(prog="gpu_check.py", description=__doc__,
                           epilog=f"steps, in the order they run:\n{steps}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="the same steps at tiny sizes; runs on the CPU (CUDA-only steps are skipped)")
    parser.add_argument("--out", type=Path, default=Path("work_dirs/gpu_check"),
                        help="where summary.json, gpu_check.log and the runs go "
                             "(default work_dirs/gpu_check)")
    parser.add_argument("--reference", type=Path, default=REPO / ".reference" / "arcface_torch",
                        help="a copy of insightface's recognition/arcface_torch (backbones/iresnet.py, "
                             "partial_fc_v2.py, losses.py) for the step_throughput comparison; never part "
                             "of this project (default <repo>/.reference/arcface_torch)")
    parser.add_argument("--only", type=lambda t: comma_names(t, "step names", STEP_NAMES), metavar="A,B",
                        help="run only these steps (the others are recorded as skipped)")
    parser.add_argument("--skip", type=lambda t: comma_names(t, "step names", STEP_NAMES), metavar="A,B",
                        help="skip these steps")
    parser.add_argument("--time-budget", type=positive_seconds, default=480.0, metavar="SECONDS",
                        help="a step that would start after this many seconds is skipped (default 480)")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        help="default cuda (refused without CUDA), cpu with --dry-run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from facecompat.gpu_check import GpuCheckError, resolve_check_device, run_gpu_check, select_steps

    try:
        steps = select_steps(args.only, args.skip)
        device = resolve_check_device(args.device, args.dry_run)
    except GpuCheckError as exc:
        print(f"gpu_check.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run_gpu_check(out=args.out, device=device, dry_run=args.dry_run, reference=args.reference,
                             steps=steps, time_budget_s=args.time_budget, repo=REPO,
                             command=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    except KeyboardInterrupt:
        print(f"\ngpu_check.py: interrupted; {args.out}/summary.json holds the steps done", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
