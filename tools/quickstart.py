#!/usr/bin/env python
"""Run facecompat's main job end to end on generated data (no downloads): train an old model, an
independent new one, new models with BCT, L2 and MixBCT, FCT's side-information model and
transformation; evaluate every self and cross test on an IJB-C-style set (1:1 and 1:N); backfill the
upgraded gallery; write the compatibility report.

    bash tools/quickstart.sh                 # creates the env, then runs this
    python tools/quickstart.py --size tiny   # seconds per stage: a smoke test

Outputs in WORK_DIR (default work_dirs/quickstart): report.md (read this first), report.json
(DESIGN §8: models, matrix "<query>|<gallery>" with 1:1 and 1:N, ecc, update_gain, backfill),
roc.png, backfill.png; data/ (the generated sets), runs/<model>/ (training runs, model.pt),
eval/ (cached features, results.json, backfill.json), stages.json (what is done).
"""

from __future__ import annotations

import argparse
import logging
import sys

from facecompat.cli import OneLineParser

EPILOG = """\
stages: data, old, new, bct, l2, mixbct, side, fct, evaluate, backfill, report. A finished stage
is skipped on the next run (its time is shown); an interrupted training resumes from its last
checkpoint; --from STAGE redoes STAGE and everything after it; --force redoes everything.

sizes (--size; auto = small on CPU, large on CUDA; each a file, <configs>/quickstart_<size>.yaml):
  tiny   60 identities, r18-w0.0625, 64-d: about 2 minutes on 2 cores; the CI test's size
  small  300 identities, r18-w0.125, 128-d: about 12 minutes on 2 CPU cores
  large  2000 identities, r18-w0.5, 256-d: one GPU (DALI decode, bf16 autocast)

examples:
  bash tools/quickstart.sh
  python tools/quickstart.py --from evaluate          # re-evaluate with the trained models
  python tools/quickstart.py --size tiny --work-dir /tmp/qs --force
"""


def build_parser() -> argparse.ArgumentParser:
    from facecompat.pipelines.quickstart import SIZE_NAMES, STAGES

    parser = OneLineParser(prog="quickstart.py", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="work_dirs/quickstart", help="where everything goes")
    parser.add_argument("--size", default="auto", choices=["auto", *SIZE_NAMES],
                        help="how big everything is (default auto: small on CPU, large on GPU)")
    parser.add_argument("--from", dest="redo_from", choices=list(STAGES), metavar="STAGE",
                        help="redo this stage and every later one")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--device", help="cpu, cuda (this process's GPU) or cuda:N (default: cuda if any)")
    parser.add_argument("--workers", type=int, default=None, help="processes for rendering and decoding")
    parser.add_argument("--configs", default="configs",
                        help="folder of the synthetic_*.yaml recipes and quickstart_<size>.yaml sizes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or training logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from facecompat.cli import resolve_device

    try:  # before any work: a device that cannot be used is an argument error
        device = str(resolve_device(args.device))
    except ValueError as exc:
        parser.error(str(exc))

    from facecompat.errors import UserError
    from facecompat.eval.report import format_summary
    from facecompat.pipelines.quickstart import next_commands, run_quickstart

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        state = run_quickstart(args.work_dir, size=args.size, force=args.force, redo_from=args.redo_from,
                               workers=args.workers, progress=not args.quiet, device=device,
                               config_dir=args.configs, log=log)
    except UserError as exc:  # bad input the user can fix; anything else is a bug with its traceback
        print(f"quickstart: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nquickstart: interrupted; run the same command again to resume ({args.work_dir}/stages.json "
              "keeps what is done)", file=sys.stderr)
        return 130
    import json
    from pathlib import Path

    work = Path(args.work_dir)
    report = json.loads((work / "report.json").read_text())
    stages = state["stages"]
    print(f"\nquickstart ({state['size']}): "
          + ", ".join(f"{name} {r['seconds']:.0f} s" for name, r in stages.items())
          + f"; total {sum(r['seconds'] for r in stages.values()):.0f} s\n")
    print(format_summary(report))
    print(f"\nreport: {work / 'report.md'}  (JSON: {work / 'report.json'}; plots: {work / 'roc.png'}, "
          f"{work / 'backfill.png'})")
    print("\nnext, on these models (catalog: " + str(work / "eval_catalog.yaml") + "):")
    for command in next_commands(work):
        print(f"  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
