#!/usr/bin/env python
"""Memory of two processes reading one old-feature bank: memory-mapped (one copy in the page cache,
shared) versus one full in-RAM copy per process (what "load the bank in every rank" costs).

    python tools/bench_bank.py                       # 200000 x 2 x 512 float16 (~410 MB)
    python tools/bench_bank.py --rows 1000000 --json

Each process touches every row once through FeatureBank.lookup in random order (batches of
--batch ids, random flips), then both report PSS and RSS from /proc/self/smaps_rollup while both are
alive (PSS divides a shared page between the processes mapping it). "baseline" is PSS after the
imports, before the bank is opened.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from facecompat.cli import OneLineParser, add_json_arg, positive_int, run_main, writable_dir

PROG = "bench_bank.py"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=positive_int, default=200_000, help="records in the bank (default 200000)")
    p.add_argument("--dim", type=positive_int, default=512, help="embedding size (default 512)")
    p.add_argument("--batch", type=positive_int, default=128, help="ids per lookup (default 128)")
    p.add_argument("--dir", type=writable_dir, metavar="DIR",
                   help="existing folder where the bank is written, in a temporary sub-folder (default: the "
                   "temp directory)")
    add_json_arg(p, "the results")
    return p


def _memory_mb() -> dict[str, float]:
    """Pss and Rss of this process in MB (Linux /proc/self/smaps_rollup)."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            out[key.lower() + "_mb"] = int(rest.split()[0]) / 1024
    return out


def _reader(mode: str, directory: str, batch: int, seed: int, barrier, results) -> None:
    """One process: open the bank (memmap, or a full copy), look up every row, report memory."""
    import numpy as np

    from facecompat.features import FeatureBank

    baseline = _memory_mb()["pss_mb"]
    bank = FeatureBank.open(directory)
    if mode == "copy":
        bank.features = np.load(Path(directory) / "features.npy")  # the whole array in this process's RAM
    rng = np.random.default_rng(seed)
    ids = np.asarray(bank.record_ids)[rng.permutation(len(bank))]
    flipped = rng.random(len(bank)) < 0.5
    start = time.perf_counter()
    checksum = 0.0
    for i in range(0, len(ids), batch):
        checksum += float(bank.lookup(ids[i:i + batch], flipped[i:i + batch])[:, 0].sum())
    seconds = time.perf_counter() - start
    # the other row of each record too: the whole bank resident, as after a few epochs
    for i in range(0, len(ids), batch):
        checksum += float(bank.lookup(ids[i:i + batch], ~flipped[i:i + batch])[:, 0].sum())
    barrier.wait()  # both processes hold the bank now
    mem = _memory_mb()
    results.put({"mode": mode, "seed": seed, "baseline_pss_mb": baseline, **mem,
                 "rows_per_s": len(ids) / seconds, "checksum": checksum})
    barrier.wait()  # keep the mapping alive until the other process has measured too


def _run_pair(ctx, mode: str, directory: Path, batch: int) -> list[dict]:
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(mode, str(directory), batch, seed, barrier, results))
             for seed in range(2)]
    for p in procs:
        p.start()
    out = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{mode} reader exited with status {p.exitcode}")
    return sorted(out, key=lambda r: r["seed"])


def _write_bank(directory: Path, rows: int, dim: int) -> float:
    """A bank of random float16 features; returns the features file's size in MB."""
    import numpy as np

    from facecompat.features import FeatureBank

    rng = np.random.default_rng(0)
    feats = np.empty((rows, 2, dim), np.float16)
    for start in range(0, rows, 1 << 14):
        part = feats[start:start + (1 << 14)]
        part[...] = rng.standard_normal(part.shape, dtype=np.float32)
    ids = np.arange(1, rows + 1, dtype=np.int64)
    FeatureBank.from_arrays(directory, ids, ids % 1000, feats, model={"name": "bench-random"})
    del feats
    return (directory / "features.npy").stat().st_size / 2**20


def _summary(runs: list[dict]) -> dict:
    pss = [round(r["pss_mb"], 1) for r in runs]
    return {"pss_mb": pss, "pss_total_mb": round(sum(pss), 1),
            "rss_mb": [round(r["rss_mb"], 1) for r in runs],
            "baseline_pss_mb": [round(r["baseline_pss_mb"], 1) for r in runs],
            "bank_pss_total_mb": round(sum(r["pss_mb"] - r["baseline_pss_mb"] for r in runs), 1),
            "rows_per_s": [round(r["rows_per_s"]) for r in runs]}


def bench(args: argparse.Namespace) -> None:
    import multiprocessing as mp

    from facecompat.cli import write_json
    from facecompat.errors import UserError

    if not Path("/proc/self/smaps_rollup").is_file():
        raise UserError("/proc/self/smaps_rollup not available (Linux 4.14+ only)")
    with tempfile.TemporaryDirectory(prefix="bench_bank_", dir=args.dir) as tmp:
        directory = Path(tmp) / "bank"
        bank_mb = _write_bank(directory, args.rows, args.dim)
        ctx = mp.get_context("spawn")
        result = {"rows": args.rows, "dim": args.dim, "bank_mb": round(bank_mb, 1),
                  "memmap": _summary(_run_pair(ctx, "memmap", directory, args.batch)),
                  "copy": _summary(_run_pair(ctx, "copy", directory, args.batch))}
    write_json(result, args.json)
    if str(args.json) == "-":
        return
    print(f"bank: {args.rows} x 2 x {args.dim} float16 = {bank_mb:.1f} MB; 2 processes, every row looked up")
    print(f"{'approach':<22}{'proc':>5}{'RSS MB':>9}{'PSS MB':>9}{'PSS-baseline':>14}{'lookup rows/s':>15}")
    for mode, label in (("memmap", "memmap (page cache)"), ("copy", "full copy per process")):
        s = result[mode]
        for i in range(2):
            print(f"{label if i == 0 else '':<22}{i:>5}{s['rss_mb'][i]:>9.1f}{s['pss_mb'][i]:>9.1f}"
                  f"{s['pss_mb'][i] - s['baseline_pss_mb'][i]:>14.1f}{s['rows_per_s'][i]:>15,}")
        print(f"{'':<22}{'sum':>5}{'':>9}{s['pss_total_mb']:>9.1f}{s['bank_pss_total_mb']:>14.1f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
