#!/usr/bin/env python
"""Run facecompat's main job end to end on generated data (no GPU, no downloads).

Stages: generate synthetic data (training rec, IJB-C-style folder, lfw.bin), then read it
back through the training loader. Each finished stage is recorded in WORK_DIR/stages.json
and skipped on the next run; --force redoes everything. Later releases add training, BCT,
FCT and the IJB-C compatibility report as further stages.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  bash tools/quickstart.sh --size tiny")
    parser.add_argument("--work-dir", default="work_dirs/quickstart", help="where everything goes")
    parser.add_argument("--size", default="small", choices=["tiny", "small"],
                        help="data size (default small)")
    parser.add_argument("--config", default="configs/synthetic_data.yaml", help="data config read back")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: CPUs)")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    args = parser.parse_args(argv)

    from facecompat.config import ConfigError
    from facecompat.data.recordio import RecordIOError
    from facecompat.data.synthetic_sets import SyntheticError
    from facecompat.quickstart import run_quickstart

    try:
        results = run_quickstart(args.work_dir, size=args.size, config=args.config, force=args.force,
                                 workers=args.workers)
    except (ConfigError, RecordIOError, SyntheticError, OSError) as e:
        print(f"quickstart: error: {e}", file=sys.stderr)
        return 2
    print(f"\n{'stage':<10} {'seconds':>8}  result")
    for name, result in results.items():
        items = [(f"{k}.{kk}", vv) for k, v in result.items() if isinstance(v, dict) for kk, vv in v.items()]
        items += [(k, v) for k, v in result.items() if not isinstance(v, dict) and k != "seconds"]
        lines = [", ".join(f"{k}={v}" for k, v in items[i:i + 4]) for i in range(0, len(items), 4)]
        for i, line in enumerate(lines):
            print(f"{name if i == 0 else '':<10} {result['seconds'] if i == 0 else '':>8}  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
