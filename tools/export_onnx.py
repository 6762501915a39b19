#!/usr/bin/env python
"""Export backbone weights (an insightface model.pt or our checkpoint) to ONNX.

Builds the network, loads the weights strictly, exports with a dynamic batch axis
(input "input" [B,3,112,112] float32 RGB in [-1,1], output "embedding" [B,D], not normalised),
and checks the file with onnxruntime against PyTorch at batch sizes 1 and 3 before writing it.
Prints one line (or JSON with --json). Exit status 0 on success; 2 with a one-line reason on bad
input (missing or unreadable weights, weights of another network, unknown network); 1 when the
exported graph disagrees with PyTorch beyond --atol (nothing is written then).
"""

from __future__ import annotations

import argparse
import json
import sys

from facecompat.models import WeightsError, get_model, list_models, load_backbone_weights
from facecompat.models.onnx_export import OnnxExportError, export_onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python tools/export_onnx.py --network r50 --weights ms1mv3_arcface_r50/model.pt "
               "--output r50.onnx\n"
               "  python tools/export_onnx.py --network mbf --weights work_dirs/old/model.pt "
               "--output mbf.onnx --json")
    parser.add_argument("--network", required=True,
                        help=f"backbone name: {', '.join(list_models())}, or <name>-w<float> (width variant)")
    parser.add_argument("--weights", required=True,
                        help="insightface model.pt (a state dict) or our checkpoint with a 'backbone' entry")
    parser.add_argument("--output", required=True, help="the .onnx file to write (atomically)")
    parser.add_argument("--embedding-size", type=int, default=512, help="embedding length D (default 512)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest accepted |onnxruntime - PyTorch| difference (default 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        model = get_model(args.network, embedding_size=args.embedding_size)
        load_backbone_weights(model, args.weights)
        result = export_onnx(model, args.output, opset=args.opset, check=not args.no_check, atol=args.atol)
    except (WeightsError, ValueError, OSError) as e:  # bad network name, bad or unfitting weights
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OnnxExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {"network": args.network, "embedding_size": args.embedding_size, **result}
    if args.json:
        print(json.dumps(result))
    else:
        diff = result["max_abs_diff"]
        checked = "not checked" if diff is None else f"max |onnx - torch| {diff:.2e}"
        print(f"wrote {result['path']} ({args.network}, D={args.embedding_size}, opset {result['opset']}, "
              f"{checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
