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
import json
import sys
from pathlib import Path

from facecompat.data.bench import make_bench_rec, measure
from facecompat.data.recordio import RecordIOError

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("rec_dir", type=Path, help="folder with train.rec/train.idx (or to create with --make)")
    p.add_argument("--n", type=int, default=5000, help="images per measurement (default 5000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is reported")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--make", type=int, nargs="?", const=20000, default=None, metavar="N",
                   help="generate N synthetic images into REC_DIR if it has no train.rec (default 20000)")
    p.add_argument("--make-only", action="store_true", help="generate (as --make) and exit")
    p.add_argument("--dali", action="store_true", help="also measure DALI (CPU; GPU when present)")
    p.add_argument("--stages", action="store_true", help="also time the CPU path stage by stage")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    has_rec = (args.rec_dir / "train.rec").is_file()
    try:
        if (args.make is not None or args.make_only) and not has_rec:
            make_bench_rec(args.rec_dir, 20000 if args.make is None else args.make, seed=args.seed)
        if args.make_only:
            return 0
        if not (args.rec_dir / "train.rec").is_file():
            raise ValueError(f"{args.rec_dir}: no train.rec (create one with --make N)")
        result = measure(args.rec_dir, args.n, batch_size=args.batch_size, rounds=args.rounds,
                         seed=args.seed, dali=args.dali, stages=args.stages)
    except (ValueError, RecordIOError, OSError, ImportError) as e:
        print(f"bench_data: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
