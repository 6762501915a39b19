#!/usr/bin/env python
"""Split a face rec into the old and new training sets of a compatibility protocol."""

from __future__ import annotations

import argparse
import sys

from facecompat.cli import OneLineParser, non_negative_int, output_dir, run_main

PROG = "split_dataset.py"

EPILOG = """\
protocols (DESIGN §6):
  opclass  old = first RATIO of the identities; new = the others, relabelled 0..k-1
  opdata   old = ~RATIO of each identity's images; new = the rest, same labels (a one-image
           identity goes to both parts: it cannot be split by images)
  exclass  old = as opclass; new = the full set
  exdata   old = as opdata; new = the full set

outputs in OUT:
  --format lists  old.lst, new.lst (header line + one record id per line of REC), split.json;
                  load a part with facecompat.data.splits.load_view(REC, OUT/old.lst)
  --format rec    old/ and new/, each train.rec/.idx/property + record_map.npy (new id,
                  source id) + label_map.npy (source class per label), split.json

example:
  python tools/split_dataset.py data/ms1mv3 --protocol opclass --ratio 0.3 --out work_dirs/opclass
"""


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rec", help="source .rec, or a folder holding train.rec/train.idx/property")
    parser.add_argument("--protocol", required=True, type=str.lower,
                        help="split protocol (see protocols below)")
    parser.add_argument("--ratio", type=_ratio, default=0.3, help="old share, in (0, 1) (default 0.3)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the per-identity image choice (opdata/exdata; default 0)")
    parser.add_argument("--out", required=True, type=output_dir, help="output folder")
    parser.add_argument("--format", choices=("lists", "rec"), default="lists",
                        help="record-id lists over REC (default) or new rec sets")
    parser.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    return parser


def format_table(summary: dict) -> str:
    rows = [("part", "images", "classes", "relabelled")]
    rows += [(part, str(info["images"]), str(info["classes"]), "yes" if info["relabel"] else "no")
             for part, info in summary["parts"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"source {summary['source']}: {summary['source_num_images']} images, "
                 f"{summary['source_num_classes']} classes; shared images {summary['shared_images']}, "
                 f"shared classes {summary['shared_classes']}")
    return "\n".join(lines)


def split(args: argparse.Namespace) -> None:
    from facecompat.data.faces import FaceRecords
    from facecompat.data.splits import make_split, write_split_lists, write_split_recs

    dataset = FaceRecords(args.rec, flip=False)
    split = make_split(dataset, args.protocol, args.ratio, args.seed)
    write = write_split_lists if args.format == "lists" else write_split_recs
    summary = write(dataset, split, args.out)
    print(f"{split.protocol} ratio={split.ratio} seed={split.seed} -> {args.out} ({args.format})")
    print(format_table(summary))
    print(f"summary: {args.out / 'split.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from facecompat.data.splits import list_protocols  # after parsing: --help stays light

    if args.protocol not in list_protocols():
        parser.error(f"argument --protocol: invalid choice: {args.protocol!r} "
                     f"(choose from {', '.join(list_protocols())})")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        parser.error(f"--out: {args.out} is not empty (use --force to write into it)")
    return run_main(PROG, lambda: split(args))


if __name__ == "__main__":
    sys.exit(main())
