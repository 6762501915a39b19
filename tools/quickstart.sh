#!/usr/bin/env bash
# The README's first command: create/reuse the env, install, run the main job on generated data.
#   bash tools/quickstart.sh [--size auto|tiny|small|large] [--from STAGE] [--force] [--work-dir DIR]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/tools/env.sh" | tail -n 1)"
cd "$repo"
exec "$venv/bin/python" tools/quickstart.py "$@"
