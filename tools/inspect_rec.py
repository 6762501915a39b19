#!/usr/bin/env python
"""Inspect and validate an MXNet RecordIO file (.rec + .idx) without mxnet.

Reads every record once. Prints counts, the layout (insightface with header and identity
records, or headerless im2rec), classes and images; with --dump, one JSON object per record
in index order instead:
  {"key", "flag", "label", "id", "id2", "payload_len", "payload_sha1"}
Exit status 0 when the whole file is valid, 2 with a one-line reason otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facecompat.cli import OneLineParser, add_json_arg, run_main

PROG = "inspect_rec.py"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python tools/inspect_rec.py data/ms1m-retinaface-t1/train.rec\n"
               "  python tools/inspect_rec.py train.rec --dump | head")
    parser.add_argument("rec", help=".rec file (its .idx beside it is used when present), or a folder "
                        "holding train.rec")
    parser.add_argument("--idx", type=Path,
                        help="index file (default: REC with .idx; without one: scan sequentially)")
    parser.add_argument("--dump", action="store_true", help="print one JSON line per record")
    add_json_arg(parser, "the summary")
    parser.add_argument("--decode", action="store_true", help="also decode every image (slower)")
    return parser


def inspect(args: argparse.Namespace) -> int:
    from facecompat.cli import write_json
    from facecompat.data.faces import resolve_rec, summarize_rec
    from facecompat.data.recordio import dump_records
    from facecompat.errors import UserError

    if args.idx is not None and not args.idx.is_file():
        raise UserError(f"--idx: {args.idx}: no such index file")
    try:
        if args.dump:
            rec, idx = resolve_rec(args.rec)
            for row in dump_records(rec, args.idx or idx):
                sys.stdout.write(json.dumps(row) + "\n")
            return 0
        summary = summarize_rec(args.rec, args.idx, decode=args.decode, progress=True)
    except BrokenPipeError:  # the reader (e.g. head) has what it wanted
        return 0
    write_json(summary, args.json)
    if str(args.json) != "-":
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: inspect(args))


if __name__ == "__main__":
    sys.exit(main())
