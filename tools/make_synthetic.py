"""Render synthetic face data in the real formats: an MS1M-style training rec, an IJB-C-style
folder and an LFW-style lfw.bin, so training and evaluation run without the real data sets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from facecompat.cli import OneLineParser, non_negative_int, output_dir, positive_int, run_main

PROG = "make_synthetic.py"

EPILOG = """example:
  python tools/make_synthetic.py out/synth                      # 1000 ids x 20 imgs, 200 IJB-C subjects
  python tools/make_synthetic.py out/small --num-ids 100 --imgs-per-id 5:15 --ijbc-subjects 30 --workers 2

writes OUT/train/{train.rec,train.idx,property}, OUT/IJBC/{loose_crop,meta}, OUT/lfw.bin and
OUT/manifest.json (last). The output depends only on the sizes and --seed, not on --workers.
A folder whose manifest records the same request is left alone; --force regenerates."""


def _imgs_per_id(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}")
    if not 1 <= values[0] <= values[-1]:
        raise argparse.ArgumentTypeError(f"must be N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return values[0], values[-1]


def _at_least(low: int, why: str = "") -> Callable[[str], int]:
    """argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        value = positive_int(text) if low >= 1 else non_negative_int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{why}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=output_dir, help="output folder")
    p.add_argument("--num-ids", type=positive_int, default=1000, help="training identities (default 1000)")
    p.add_argument("--imgs-per-id", type=_imgs_per_id, default=(20, 20), metavar="N|MIN:MAX",
                   help="images per training identity, fixed or uniform in [MIN, MAX] (default 20)")
    p.add_argument("--ijbc-subjects", type=_at_least(3, " (G1, G2 and non-mated subjects)"), default=200,
                   help="IJB-C-style subjects (default 200)")
    p.add_argument("--lfw-pairs", type=_at_least(2, " (a genuine and an impostor pair)"), default=300,
                   help="pairs in lfw.bin (default 300)")
    p.add_argument("--impostors-per-genuine", type=positive_int, default=30,
                   help="IJB-C 1:1 impostor template pairs per genuine pair (default 30)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="root seed (default 0)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="render processes (default: one per CPU)")
    p.add_argument("--force", action="store_true", help="regenerate even if OUT already holds data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def generate(args: argparse.Namespace) -> None:
    from facecompat.data.synthetic.sets import SyntheticSpec, generate_synthetic

    spec = SyntheticSpec(num_ids=args.num_ids, imgs_per_id=args.imgs_per_id,
                         ijbc_subjects=args.ijbc_subjects, lfw_pairs=args.lfw_pairs,
                         impostors_per_genuine=args.impostors_per_genuine, seed=args.seed)
    manifest, generated = generate_synthetic(args.out, spec, args.workers, force=args.force,
                                             progress=not args.quiet)
    counts = manifest["counts"]
    print(f"{'generated' if generated else 'up to date (same spec; --force regenerates)'}: {args.out}")
    rows = [("train", f"{counts['train']['classes']} identities, {counts['train']['images']} images"),
            ("IJBC", f"{counts['ijbc']['subjects']} subjects, {counts['ijbc']['templates']} templates, "
                     f"{counts['ijbc']['faces']} faces, {counts['ijbc']['pairs']} pairs "
                     f"({counts['ijbc']['genuine']} genuine)"),
            ("lfw.bin", f"{counts['lfw']['pairs']} pairs ({counts['lfw']['genuine']} genuine)")]
    for name, text in rows:
        print(f"  {name:<8} {text}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
