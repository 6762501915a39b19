"""Throughput of the CPU training data path, against an mxnet/insightface-style reference.

    python tools/bench_data.py REC_DIR [--n N] [--json] [--make [N] | --make-only] [--dali] [--stages]

One process, one thread, the same --n images of REC_DIR in random order, best of --rounds
interleaved rounds (see facecompat.data.bench). Rows, and the keys of --json:

  images_per_s               facecompat's CPU path: read + decode + flip + normalise to float32 CHW
  reference_images_per_s     insightface MXFaceDataset over mxnet MXIndexedRecordIO, emulated
  decode_only_images_per_s   cv2.imdecode alone (the ceiling)
  ratio                      images_per_s / reference_images_per_s
  dali_cpu_images_per_s      with --dali: DALI's CPU decoder (dali_gpu_images_per_s with a GPU)
  stages_us                  with --stages: µs per image of read, decode, decode+split, flip
                             (per flipped image), normalize and full (the loader's whole batch read)

--make [N] writes N (default 20,000) synthetic 112x112 JPEGs (quality 90, ~5-6 KB like MS1M
crops) into REC_DIR first when it holds no train.rec. Exit status 2 with a one-line reason on
bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from facecompat.cli import OneLineParser, add_json_arg, non_negative_int, positive_int, run_main

PROG = "bench_data.py"

_RATE_ROWS = (("facecompat CPU path (TorchLoader, 1 thread)", "images_per_s"),
              ("reference (mxnet-style read + insightface transforms)", "reference_images_per_s"),
              ("cv2.imdecode alone (ceiling)", "decode_only_images_per_s"),
              ("DALI CPU decode ({dali_threads} threads)", "dali_cpu_images_per_s"),
              ("DALI mixed (GPU) decode", "dali_gpu_images_per_s"))
_STAGE_ROWS = (("read (read_raw_many + header/label check)", "read"),
               ("decode (cv2.imdecode to RGB)", "decode"),
               ("decode + split to uint8 CHW batch", "decode+split"),
               ("flip (cv2.flip, per flipped image)", "flip"),
               ("normalize (cv2.LUT to float32)", "normalize"),
               ("full (_BatchReader.__getitems__)", "full"))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("rec_dir", type=Path, help="folder with train.rec/train.idx (or to create with --make)")
    p.add_argument("--n", type=positive_int, default=5000, help="images per measurement (default 5000)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; best is reported")
    add_json_arg(p, "the results (one object, instead of a table)")
    p.add_argument("--make", type=positive_int, nargs="?", const=20000, default=None, metavar="N",
                   help="generate N synthetic images into REC_DIR if it has no train.rec (default 20000)")
    p.add_argument("--make-only", action="store_true", help="generate (as --make) and exit")
    p.add_argument("--dali", action="store_true", help="also measure DALI (CPU; GPU when present)")
    p.add_argument("--stages", action="store_true", help="also time the CPU path stage by stage")
    p.add_argument("--seed", type=non_negative_int, default=0)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with what can be checked before any work checked (one-line errors, exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < args.batch_size and not args.make_only:
        parser.error(f"--n ({args.n}) is smaller than --batch-size ({args.batch_size}): "
                     "need at least one batch")
    making = (args.make is not None or args.make_only) and not (args.rec_dir / "train.rec").is_file()
    if making:
        near = next((q for q in (args.rec_dir, *args.rec_dir.parents) if q.exists()), Path("."))
        if not near.is_dir() or not os.access(near, os.W_OK):
            parser.error(f"rec_dir: cannot write {args.rec_dir} (--make) under {near}")
    elif args.rec_dir.exists() and not args.rec_dir.is_dir():
        parser.error(f"rec_dir: {args.rec_dir} is not a folder")
    return args


def format_table(result: dict) -> str:
    lines = [f"{result['n']} images of {result['rec']} (mean JPEG {result['mean_jpeg_bytes']:.0f} B), "
             f"batch {result['batch_size']}, best of {result['rounds']} rounds, {result['cpu']} "
             f"x{result['cpu_count']}"]
    for name, key in _RATE_ROWS:
        if key in result:
            lines.append(f"  {name.format(**result):<56} {result[key]:>10,.0f} img/s")
    lines.append(f"  {'ratio facecompat / reference':<56} {result['ratio']:>10.2f} x")
    for name, key in _STAGE_ROWS if "stages_us" in result else ():
        lines.append(f"  {'stage: ' + name:<56} {result['stages_us'][key]:>10,.1f} us/img")
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> None:
    from facecompat.cli import write_json
    from facecompat.data.bench import make_bench_rec, measure
    from facecompat.data.dali import dali_available
    from facecompat.data.faces import FaceRecords
    from facecompat.errors import UserError

    if args.dali and not dali_available():
        raise UserError("--dali: DALI is not installed (nvidia.dali cannot be imported)")
    if (args.make is not None or args.make_only) and not (args.rec_dir / "train.rec").is_file():
        make_bench_rec(args.rec_dir, 20000 if args.make is None else args.make, seed=args.seed)
    if args.make_only:
        return
    if not (args.rec_dir / "train.rec").is_file():
        raise UserError(f"{args.rec_dir}: no train.rec (create one with --make N)")
    num_images = FaceRecords(args.rec_dir, flip=False).num_images
    if min(args.n, num_images) < args.batch_size:
        raise UserError(f"{args.rec_dir}: {min(args.n, num_images)} images to measure on, need at least one "
                        f"batch of --batch-size {args.batch_size} (lower it)")
    result = measure(args.rec_dir, args.n, batch_size=args.batch_size, rounds=args.rounds,
                     seed=args.seed, dali=args.dali, stages=args.stages)
    write_json(result, args.json)
    if str(args.json) != "-":
        print(format_table(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(PROG, lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
