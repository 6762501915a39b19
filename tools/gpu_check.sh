#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py): every GPU path of the project in one command, at most 8 minutes
# on one H100/H200. Needs no install: the repo's .venv when it has one, else python3, with the repo
# on PYTHONPATH.
#   bash tools/gpu_check.sh [--dry-run] [--out DIR] [--only A,B | --skip A,B] [--reference DIR]
#                           [--time-budget SECONDS] [--device cuda|cpu]      (--help lists the steps)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py="python3"; fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$py" "$repo/tools/gpu_check.py" "$@"
