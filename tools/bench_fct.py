#!/usr/bin/env python
"""What upgrading a gallery costs: FCT's transformation h against re-extracting every item with the
new backbone, in seconds per 1M gallery items, measured in the same run on the same device.

    python tools/bench_fct.py --network r50 --json            # the MS1Mv3 setting (512-d, side 128-d)
    python tools/bench_fct.py --network r18-w0.125 --old-dim 128 --new-dim 128 --hidden 512,512
"""

from __future__ import annotations

import argparse
import sys
import time

from facecompat.cli import (
    OneLineParser,
    add_device_arg,
    add_json_arg,
    non_negative_int,
    positive_int,
    run_main,
)

PROG = "bench_fct.py"

EPILOG = """\
transformation: h = Transformation(old_dim, side_dim, new_dim, hidden) in eval mode on --rows
  random rows in chunks of --chunk (float32; bf16 autocast on CUDA), after one warm-up chunk.
re-extraction: the new backbone --network on random 112x112 images, each image and its flip (as
  evaluation and gallery extraction do), --batch images per forward, --images images after one
  warm-up batch (fp32 on CPU, bf16 autocast on CUDA). Image reading, decoding and alignment are
  NOT counted, so the ratio understates what re-extraction really costs.
Both are timed with the device synchronised; the ratio is re-extraction / transformation time.

examples:
  python tools/bench_fct.py --network r50 --rows 1000000 --images 512 --device cuda --json
"""


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, got {text!r}") from None
    if any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be > 0, got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="r50", help="the new backbone (default r50)")
    p.add_argument("--old-dim", type=positive_int, default=512, help="old feature size (default 512)")
    p.add_argument("--side-dim", type=non_negative_int, default=128,
                   help="side-information size, 0 for none (default 128)")
    p.add_argument("--new-dim", type=positive_int, default=512, help="new feature size (default 512)")
    p.add_argument("--hidden", type=_widths, default=(2048, 2048), metavar="W,W",
                   help="hidden widths of h (default 2048,2048, as configs/ms1mv3_fct.yaml)")
    p.add_argument("--rows", type=positive_int, default=200_000, help="rows transformed (default 200000)")
    p.add_argument("--chunk", type=positive_int, default=65_536, help="rows per transformation chunk")
    p.add_argument("--images", type=positive_int, default=64, help="images re-extracted (default 64)")
    p.add_argument("--batch", type=positive_int, default=32, help="images per backbone forward (default 32)")
    add_device_arg(p)
    add_json_arg(p, "the result")
    return p


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from facecompat.cli import resolve_device
    from facecompat.compat.fct import FCTransform, Transformation
    from facecompat.errors import UserError
    from facecompat.features import fuse_flip
    from facecompat.models import ModelNameError, get_model, parse_model_name

    try:
        parse_model_name(args.network)
    except ModelNameError as exc:  # unknown backbone name (lists the valid ones)
        raise UserError(f"--network: {exc}") from None
    device = resolve_device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    module = Transformation(args.old_dim, args.side_dim, args.new_dim, args.hidden, uncertainty=True)
    fct = FCTransform(module.to(device), {"weights_sha1": "0" * 40}, None)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    old = rng.standard_normal((args.rows, args.old_dim), dtype=np.float32)
    side = rng.standard_normal((args.rows, args.side_dim), dtype=np.float32) if args.side_dim else None
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        fct.apply(old[:args.chunk], None if side is None else side[:args.chunk], batch_size=args.chunk)
        sync()
        start = time.perf_counter()
        fct.apply(old, side, batch_size=args.chunk)
        sync()
    transform_s = time.perf_counter() - start

    model = get_model(args.network, args.new_dim).to(device).eval()
    images = torch.rand(args.batch, 3, 112, 112, generator=torch.Generator().manual_seed(1)).mul_(2).sub_(1)
    images = images.to(device)
    batches = -(-args.images // args.batch)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        fuse_flip(model, images)
        sync()
        start = time.perf_counter()
        for _ in range(batches):
            fuse_flip(model, images)
        sync()
    extract_s = time.perf_counter() - start
    n_images = batches * args.batch
    per_m_transform = transform_s / args.rows * 1e6
    per_m_extract = extract_s / n_images * 1e6
    return {"device": str(device), "threads": torch.get_num_threads(), "network": args.network,
            "transform": {"old_dim": args.old_dim, "side_dim": args.side_dim, "new_dim": args.new_dim,
                          "hidden": list(args.hidden), "rows": args.rows, "seconds": round(transform_s, 6),
                          "rows_per_s": round(args.rows / transform_s, 1),
                          "s_per_1m": round(per_m_transform, 3)},
            "reextract": {"images": n_images, "batch": args.batch, "seconds": round(extract_s, 6),
                          "images_per_s": round(n_images / extract_s, 2),
                          "s_per_1m": round(per_m_extract, 1)},
            "ratio": round(per_m_extract / per_m_transform, 2)}


def report(args: argparse.Namespace) -> None:
    from facecompat.cli import write_json

    out = run(args)
    write_json(out, args.json)
    if str(args.json) == "-":
        return
    t, r = out["transform"], out["reextract"]
    print(f"device {out['device']} ({out['threads']} threads)")
    print(f"{'':24}{'per second':>14}{'s per 1M items':>16}")
    print(f"{'FCT h ' + str(t['hidden']):24}{t['rows_per_s']:>10.0f} rows{t['s_per_1m']:>16.1f}")
    print(f"{'re-extract ' + out['network']:24}{r['images_per_s']:>8.1f} images{r['s_per_1m']:>16.1f}")
    print(f"re-extraction / transformation: {out['ratio']:.1f}x")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
