#!/usr/bin/env python
"""Pack root/<identity>/<image> into an insightface-layout training rec (no mxnet).

Writes OUT/train.rec, OUT/train.idx, OUT/property (num_classes,H,W) and OUT/identities.txt
(label<TAB>folder name). Identities are numbered in sorted folder order. Images must be
aligned SIZE x SIZE crops, or pass --align with a landmark file whose lines read
'identity/image.jpg x1 y1 x2 y2 ... x5 y5 [score]' to align them to the ArcFace template.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facecompat.cli import OneLineParser, output_dir, positive_int, run_main

PROG = "im2rec.py"


def _quality(text: str) -> int:
    value = positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be 1..100, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python tools/im2rec.py faces/ data/myset --align faces_5pts.txt --workers 8")
    parser.add_argument("root", help="folder with one sub-folder of images per identity")
    parser.add_argument("out", type=output_dir, help="output folder for train.rec/.idx/property")
    parser.add_argument("--align", metavar="LANDMARKS", type=Path,
                        help="5-point landmark file; align loose crops")
    parser.add_argument("--size", type=positive_int, default=112, help="aligned image size (default 112)")
    parser.add_argument("--quality", type=_quality, default=95, help="JPEG quality when encoding, 1..100 "
                        "(default 95)")
    parser.add_argument("--reencode", action="store_true", help="re-encode aligned JPEGs too")
    parser.add_argument("--workers", type=positive_int, default=4, help="decode/encode threads (default 4)")
    return parser


def pack(args: argparse.Namespace) -> None:
    from facecompat.data.image_folder import pack_image_folder
    from facecompat.errors import UserError

    if args.align is not None and not args.align.is_file():
        raise UserError(f"--align: {args.align}: no such landmark file")
    result = pack_image_folder(args.root, args.out, landmarks=args.align, size=args.size,
                               quality=args.quality, workers=args.workers, reencode=args.reencode)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: pack(args))


if __name__ == "__main__":
    sys.exit(main())
