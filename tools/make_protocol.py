#!/usr/bin/env python
"""Turn your own labelled faces, or a verification .bin, into an IJB-C-style test folder that
tools/certify.py (and tools/eval_ijbc.py) evaluate unchanged: meta/ijbc_* files, loose_crop/,
protocol.json (inputs, seed, split rules, counts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facecompat.cli import (
    OneLineParser,
    add_json_arg,
    non_negative_int,
    output_dir,
    positive_int,
    run_main,
    unit_fraction,
    write_json,
)

PROG = "make_protocol.py"

EPILOG = """\
face folder (--faces DIR: DIR/<identity>/<image>, aligned square faces, or any faces with
--landmarks FILE whose lines read 'identity/image.jpg x1 y1 ... x5 y5 [score]'):
  identities with 2+ images: --gallery-share of them enrolled, alternately in G1 and G2 (seeded
    order); the rest in neither gallery (non-mated probes); one-image identities: non-mated probes
  enrolled identity: a gallery template of min(--gallery-images, n // 2) images, then probe
    templates of --probe-images images, at most --probe-templates of them (extra images unused)
  1:1 pairs: each probe template with its identity's gallery template (genuine), and
    max(--min-impostors, --impostors-per-genuine x genuine) seeded (gallery, other identity's
    probe) impostor pairs, or all of them when the set has fewer
verification .bin (--bin FILE): each distinct image one template, the .bin's pairs, no 1:N files
the same inputs and seed give the same files; run again on the same --out, it verifies and reuses

example:
  python tools/make_protocol.py --faces my_faces/ --out data/my_protocol
  python tools/certify.py --old old --new bct --data-root data/my_protocol
"""

ROWS = (("identities", "identities (with images)"), ("enrolled_G1", "enrolled in G1"),
        ("enrolled_G2", "enrolled in G2"), ("not_enrolled", "in neither gallery (2+ images)"),
        ("single_image", "one-image identities (non-mated probes)"),
        ("empty_folders_skipped", "empty folders (skipped)"), ("images", "images in the .bin"),
        ("templates", "templates"), ("gallery_templates", "gallery templates"),
        ("probe_templates", "probe templates"), ("mated_probes_G1", "probes mated in G1"),
        ("mated_probes_G2", "probes mated in G2"), ("non_mated_probes", "probes mated in neither"),
        ("faces", "faces"), ("unused_images", "unused images (beyond --probe-templates)"),
        ("genuine_pairs", "genuine pairs"), ("impostor_pairs", "impostor pairs"),
        ("possible_impostor_pairs", "possible impostor pairs"))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--faces", type=Path, metavar="DIR", help="folder of <identity>/<image> files")
    source.add_argument("--bin", type=Path, metavar="FILE", help="verification .bin (lfw.bin, cfp_fp.bin)")
    p.add_argument("--landmarks", type=Path, metavar="FILE", help="5-point landmark file of --faces' images")
    p.add_argument("--out", required=True, type=output_dir, metavar="DIR", help="the IJB-C-style folder")
    p.add_argument("--seed", type=non_negative_int, default=0, help="split and impostor seed (default 0)")
    p.add_argument("--gallery-images", type=positive_int, default=3, metavar="K",
                   help="most images in a gallery template (default 3)")
    p.add_argument("--probe-images", type=positive_int, default=1, metavar="K",
                   help="images per probe template (default 1)")
    p.add_argument("--probe-templates", type=positive_int, default=10, metavar="N",
                   help="most probe templates per identity (default 10)")
    p.add_argument("--gallery-share", type=unit_fraction, default=0.8, metavar="F",
                   help="share of the 2+-image identities enrolled in G1 or G2, in (0, 1] (default 0.8)")
    p.add_argument("--impostors-per-genuine", type=non_negative_int, default=100, metavar="N",
                   help="impostor pairs per genuine pair (default 100)")
    p.add_argument("--min-impostors", type=non_negative_int, default=100_000, metavar="N",
                   help="at least this many impostor pairs when the set has them (default 100000)")
    p.add_argument("--copy", action="store_true", help="copy the images (default: hard links where possible)")
    p.add_argument("--workers", type=positive_int, default=4, help="image-reading threads (default 4)")
    p.add_argument("--force", action="store_true", help="replace a protocol of other inputs in --out")
    add_json_arg(p, "protocol.json's record")
    return p


def format_table(record: dict) -> str:
    counts = record["counts"]
    rows = [(label, f"{counts[key]:,}") for key, label in ROWS if key in counts]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def make(args: argparse.Namespace) -> None:
    from facecompat.data.protocol_sets import SplitParams, make_bin_protocol, make_face_folder_protocol

    if args.faces is not None:
        params = SplitParams(args.gallery_images, args.probe_images, args.probe_templates, args.gallery_share,
                             args.impostors_per_genuine, args.min_impostors)
        record = make_face_folder_protocol(args.faces, args.out, landmarks=args.landmarks, seed=args.seed,
                                           params=params, link=not args.copy, workers=args.workers,
                                           overwrite=args.force)
    else:
        record = make_bin_protocol(args.bin, args.out, overwrite=args.force)
    to_stdout = args.json is not None and str(args.json) == "-"
    if not to_stdout:
        verb = "verified (already there, nothing written)" if record["reused"] else "written"
        seed = f"; seed {record['inputs']['seed']}" if "seed" in record["inputs"] else ""
        print(f"{args.out}: {record['kind']} protocol {verb}{seed}")
        print(format_table(record))
        if record["kind"] == "bin":
            print("1:N: none (a .bin has no identities); the certificate's subjects: genuine-pair components")
        print(f"next: python tools/certify.py --old OLD --new NEW --data-root {args.out}")
    write_json(record, args.json)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.landmarks is not None and args.faces is None:
        parser.error("--landmarks goes with --faces")
    knobs = ("seed", "gallery_images", "probe_images", "probe_templates", "gallery_share",
             "impostors_per_genuine", "min_impostors", "copy", "workers")
    unused = [k for k in knobs if args.bin is not None and getattr(args, k) != parser.get_default(k)]
    if unused:
        print(f"{PROG}: warning: {', '.join('--' + k.replace('_', '-') for k in unused)} has no effect "
              f"with --bin (its pairs are the .bin's)", file=sys.stderr)
    return run_main(PROG, lambda: make(args))


if __name__ == "__main__":
    sys.exit(main())
