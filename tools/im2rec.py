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

from facecompat.data.image_folder import ImageFolderError, pack_image_folder
from facecompat.data.recordio import RecordIOError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python tools/im2rec.py faces/ data/myset --align faces_5pts.txt --workers 8")
    parser.add_argument("root", help="folder with one sub-folder of images per identity")
    parser.add_argument("out", help="output folder for train.rec/.idx/property")
    parser.add_argument("--align", metavar="LANDMARKS", help="5-point landmark file; align loose crops")
    parser.add_argument("--size", type=int, default=112, help="aligned image size (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when encoding (default 95)")
    parser.add_argument("--reencode", action="store_true", help="re-encode aligned JPEGs too")
    parser.add_argument("--workers", type=int, default=4, help="decode/encode threads (default 4)")
    args = parser.parse_args(argv)
    if not 1 <= args.quality <= 100 or args.size <= 0 or args.workers <= 0:
        parser.error("--quality must be 1..100, --size and --workers positive")
    try:
        result = pack_image_folder(args.root, args.out, landmarks=args.align, size=args.size,
                                   quality=args.quality, workers=args.workers, reencode=args.reencode)
    except (ImageFolderError, RecordIOError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
