#!/usr/bin/env bash
# The project's test command: create/reuse the env, install, lint, run the test suite.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/tools/env.sh" | tail -n 1)"
cd "$repo"
echo "[test] ruff"
"$venv/bin/ruff" check facecompat tools tests
echo "[test] import layers"
# The layers of docs/ARCHITECTURE.md (pyproject.toml [tool.importlinter]), lazy imports included.
"$venv/bin/lint-imports" --no-cache
echo "[test] pytest"
# Two workers, a test file each at a time (module fixtures are built once), one math thread each:
# the many subprocess and torchrun tests wait on start-up while the other worker computes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$venv/bin/python" -m pytest -q -n "${FACECOMPAT_TEST_WORKERS:-2}" --dist loadfile "$@"
# Where a GPU is present, the gpu-marked tests in a second pass that sees it (tests/conftest.py hides
# CUDA from every other test, so those behave as on a CPU machine).
if "$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[test] pytest, GPU pass"
  status=0
  FACECOMPAT_TEST_GPU=1 "$venv/bin/python" -m pytest -q -m gpu "$@" || status=$?
  [ "$status" = 0 ] || [ "$status" = 5 ] || exit "$status"  # 5: the selection holds no gpu test
fi
