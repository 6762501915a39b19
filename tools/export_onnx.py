#!/usr/bin/env python
"""Export a model (a run directory, or backbone weights with --network) to ONNX.

MODEL is a run directory (what tools/train.py writes: its config.yaml names the network and the
embedding size, model.pt holds the weights) or a weights file (an insightface model.pt or our
checkpoint) with --network. Builds the network, loads the weights strictly, exports with a dynamic
batch axis (input "input" [B,3,112,112] float32 RGB in [-1,1], output "embedding" [B,D], not
normalised), and checks the file with onnxruntime against PyTorch at batch sizes 1 and 3 before
writing it. Prints one line (or JSON with --json). Exit status 0 on success; 2 with a one-line
reason on bad input (missing or unreadable weights, weights of another network, unknown network);
1 when the exported graph disagrees with PyTorch beyond --atol (nothing is written then).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facecompat.cli import OneLineParser, add_json_arg, output_file, positive_int, run_main

PROG = "export_onnx.py"
EPILOG = """\
examples:
  python tools/export_onnx.py work_dirs/r50 --output r50.onnx
  python tools/export_onnx.py ms1mv3_arcface_r50/model.pt --network r50 --output r50.onnx
  python tools/export_onnx.py work_dirs/old/model.pt --network mbf --output mbf.onnx --json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="run directory (model.pt + config.yaml) or a weights file (needs --network)")
    parser.add_argument("--weights", metavar="FILE",
                        help="the weights file, as MODEL (the older spelling; give one of the two)")
    parser.add_argument("--network",
                        help="backbone name (r18 r34 r50 r100 r200 mbf, or <name>-w<float>, a width "
                             "variant); needed for a weights file; replaces a run's model.network")
    parser.add_argument("--output", required=True, type=output_file, metavar="FILE",
                        help="the .onnx file to write (atomically)")
    parser.add_argument("--embedding-size", type=positive_int, metavar="D",
                        help="embedding length D (default: the run's model.embedding_size, or read from "
                             "the weights' embedding layer, else 512)")
    parser.add_argument("--opset", type=positive_int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest accepted |onnxruntime - PyTorch| difference (default 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    add_json_arg(parser, "the result")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.weights is None):
        parser.error("give the model once: a run directory or weights file as MODEL (or --weights FILE)")
    source = args.model or args.weights
    if Path(source).is_file() and not args.network:
        parser.error(f"{source}: a weights file needs its backbone name (--network, e.g. r50)")
    return run_main(PROG, lambda: export(args))


def export(args: argparse.Namespace) -> int:
    from facecompat.cli import write_json
    from facecompat.errors import UserError
    from facecompat.models import ModelNameError, get_model, load_backbone_weights, parse_model_name
    from facecompat.models.onnx_export import OnnxExportError, export_onnx
    from facecompat.models.spec import resolve_model_spec

    source = args.model or args.weights
    if args.network:
        try:
            parse_model_name(args.network)
        except ModelNameError as exc:  # unknown backbone name (lists the valid ones)
            raise UserError(f"--network: {exc}") from None
    network, dim, weights = resolve_model_spec(source, args.network, args.embedding_size)
    try:
        model = get_model(network, embedding_size=dim)
    except ModelNameError as exc:  # a run's config naming an unknown backbone
        raise UserError(f"{source}: {exc}") from None
    load_backbone_weights(model, weights)
    try:
        result = export_onnx(model, args.output, opset=args.opset, check=not args.no_check, atol=args.atol)
    except OnnxExportError as exc:  # the graph disagrees with PyTorch: exit status 1, nothing written
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    result = {"network": network, "embedding_size": dim, "model": str(source), **result}
    write_json(result, args.json)
    if str(args.json) != "-":
        diff = result["max_abs_diff"]
        checked = "not checked" if diff is None else f"max |onnx - torch| {diff:.2e}"
        print(f"wrote {result['path']} ({network}, D={dim}, opset {result['opset']}, {checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
