#!/usr/bin/env bash
# The project's test command: create/reuse the env, install, lint, run the test suite.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/tools/env.sh" | tail -n 1)"
cd "$repo"
echo "[test] ruff"
"$venv/bin/ruff" check facecompat tools tests
echo "[test] pytest"
"$venv/bin/python" -m pytest -q "$@"
