#!/usr/bin/env python
"""Evaluate models on LFW / CFP-FP / AgeDB-style verification .bin sets, self and cross-model.

Self test:   python tools/eval_verification.py --model work_dirs/synthetic_old --bins lfw.bin cfp_fp.bin
Cross test:  python tools/eval_verification.py --model work_dirs/synthetic_new \\
                 --gallery-model work_dirs/synthetic_old --bins lfw.bin
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from facecompat.cli import OneLineParser, add_device_arg, add_json_arg, positive_int, run_main
from facecompat.errors import UserError

if TYPE_CHECKING:  # nothing heavy at import time: --help stays fast
    import torch
    from torch import nn

EPILOG = """\
models:
  a run directory holding model.pt and config.yaml (network and embedding size come from the
  config), or a weights file PATH.pt with --network NAME [--embedding-size D]
  (--gallery-network / --gallery-embedding-size for --gallery-model).

protocol (insightface's): embedding f(x) + f(flip(x)) L2-normalised (--no-flip: f(x)), squared
L2 distance, 10-fold accuracy with the threshold chosen on the other nine folds.
With --gallery-model B, model A (--model) embeds the first image of every pair and B the second
(rows A/B); the self tests A/A and B/B are reported beside it.

output: a table on stdout; --json prints {set: {"A|B": {"accuracy", "accuracy_std",
"threshold", "auc", "num_pairs", "query", "gallery"}}} instead (--json OUT writes it to OUT
beside the table), with accuracies as fractions in [0, 1]. Bad input (a missing set or model, a
weights file without --network, weights that do not fit) stops with one line and exit status 2.

example:
  python tools/eval_verification.py --model ms1mv3_r50/model.pt --network r50 --bins data/lfw.bin
"""

class VerificationToolError(UserError, ValueError):
    """Bad input the tool reports in one line (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="eval_verification.py", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, metavar="PATH",
                        help="model A (query side): run directory or .pt weights")
    parser.add_argument("--network", help="backbone name of --model when it is a .pt (e.g. r50)")
    parser.add_argument("--embedding-size", type=positive_int, metavar="D",
                        help="embedding size of --model when it is a .pt (default 512)")
    parser.add_argument("--gallery-model", type=Path, metavar="PATH",
                        help="model B (gallery side) for the cross-model test")
    parser.add_argument("--gallery-network", help="backbone name of --gallery-model when it is a .pt")
    parser.add_argument("--gallery-embedding-size", type=positive_int, metavar="D",
                        help="embedding size of --gallery-model when it is a .pt (default 512)")
    parser.add_argument("--bins", required=True, nargs="+", type=Path, metavar="BIN",
                        help="verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...)")
    parser.add_argument("--batch-size", type=positive_int, default=256, metavar="N",
                        help="images per forward pass (default 256)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="no flip test-time augmentation")
    add_device_arg(parser)
    add_json_arg(parser, "the results")
    return parser


def load_model(path: str | Path, network: str | None = None, embedding_size: int | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """Build the backbone of :func:`resolve_model_spec`, load its weights strictly, move it to ``device``.

    Raises:
        UserError: a missing model (ModelPathError), a weights file without a network or an unknown
            network (ModelNameError), weights that do not fit it (WeightsError); each names the file.
    """
    from facecompat.models.spec import ModelSpec, load_model, resolve_model_spec

    network, embedding_size, weights = resolve_model_spec(path, network, embedding_size)
    return load_model(ModelSpec(str(path), network, embedding_size, weights, str(path)), device)


def evaluate_bins(models: dict, bins: list[Path], batch_size: int = 256, device: str | torch.device = "cpu",
                  flip: bool = True, progress=None) -> dict[str, dict[str, dict]]:
    """Self and cross tests of ``models`` (``{"A": model}`` or ``{"A": a, "B": b}``) on every set.

    Returns:
        ``{set name: {"A|A": result, ...}}`` with :func:`~facecompat.eval.verification.evaluate_pairs`'s
        dicts; with two models the rows are ``A|A``, ``B|B`` and ``A|B`` (A embeds the first image).
    """
    from facecompat.eval.verification import load_verification_set, verify, verify_cross

    stems = [p.stem for p in bins]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise VerificationToolError(f"--bins: verification sets must have distinct file names; repeated: "
                                    f"{', '.join(repeated)}")
    for path in bins:
        if not path.is_file():
            raise VerificationToolError(f"--bins {path}: verification set not found")
    results: dict[str, dict[str, dict]] = {}
    for index, path in enumerate(bins, 1):
        vset = load_verification_set(path)
        if progress:
            progress(f"[{index}/{len(bins)}] {vset.name}: {vset.num_pairs} pairs")
        rows = {}
        for name, model in models.items():
            rows[f"{name}|{name}"] = verify(model, vset, batch_size, device, flip)
        if "B" in models:
            rows["A|B"] = verify_cross(models["A"], models["B"], vset, batch_size, device, flip)
        results[vset.name] = rows
    return results


def format_table(results: dict[str, dict[str, dict]], labels: dict[str, str]) -> str:
    header = ("set", "query", "gallery", "accuracy", "threshold")
    rows = [header]
    for set_name, set_rows in results.items():
        for key, res in set_rows.items():
            query, gallery = key.split("|")
            accuracy = f"{res['accuracy'] * 100:.2f}% ± {res['accuracy_std'] * 100:.2f}"
            rows.append((set_name, query, gallery, accuracy, f"{res['threshold']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"{key} = {label}" for key, label in labels.items()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Check the sets, load the models, evaluate, report (table and/or JSON)."""
    from facecompat.cli import resolve_device, write_json

    device = resolve_device(args.device)
    for path in args.bins:  # before the (slow) model loading
        if not path.is_file():
            raise VerificationToolError(f"--bins {path}: verification set not found")
    specs = {"A": (args.model, args.network, args.embedding_size)}
    if args.gallery_model is not None:
        specs["B"] = (args.gallery_model, args.gallery_network, args.gallery_embedding_size)
    models = {key: load_model(*spec, device=device) for key, spec in specs.items()}
    results = evaluate_bins(models, args.bins, args.batch_size, device, args.flip,
                            progress=lambda line: print(line, file=sys.stderr, flush=True))
    for set_rows in results.values():
        for key, res in set_rows.items():
            query, gallery = key.split("|")
            res["query"], res["gallery"] = str(specs[query][0]), str(specs[gallery][0])
    write_json(results, args.json)
    if args.json is not None and str(args.json) == "-":
        return 0
    print(format_table(results, {key: str(spec[0]) for key, spec in specs.items()}))
    if args.json is not None:
        print(f"results: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("eval_verification.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
