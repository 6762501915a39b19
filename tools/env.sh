#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install facecompat into it.
# Idempotent: a second run only re-checks what is installed.
#   FACECOMPAT_VENV   where the env lives (default: <repo>/.venv)
#   FACECOMPAT_EXTRAS pip extras (default: cpu,dev without a GPU; gpu,dev with one)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FACECOMPAT_VENV:-$repo/.venv}"
py="${PYTHON:-python3}"

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[env] creating virtual env at $venv"
  if [ "$has_gpu" = 1 ]; then
    # A GPU machine's image ships the PyTorch its driver and cluster were built for: reuse it.
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
vpy="$venv/bin/python"
"$vpy" -m pip install --quiet --upgrade pip setuptools wheel >/dev/null

# torch first, so the project's 'torch>=…' requirement is already satisfied.
if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
  if [ "$has_gpu" = 1 ]; then
    "$vpy" -m pip install --quiet torch
  else
    # The CPU build (a local wheel on these machines); a bare 'torch' would pull CUDA.
    "$vpy" -m pip install --quiet "torch==${FACECOMPAT_TORCH_VERSION:-2.13.0}"
  fi
fi

if [ "$has_gpu" = 1 ]; then extras_default="gpu,dev"; else extras_default="cpu,dev"; fi
extras="${FACECOMPAT_EXTRAS:-$extras_default}"
stamp="$venv/.facecompat-installed"
want="$(cat "$repo/setup.py" | sha1sum | cut -c1-40) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing facecompat[$extras]"
  "$vpy" -m pip install --quiet -e "$repo[$extras]"
  echo "$want" > "$stamp"
fi
echo "$venv"
