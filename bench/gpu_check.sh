#!/usr/bin/env bash
# One-command GPU check: bash bench/gpu_check.sh [--skip-fullsize]
#
# Prints one JSON object (bench/gpu_check.py): every GPU-only kernel against the torch path, the tiny
# tokenizer and t2i stages in bf16 over NCCL on every visible GPU with a preemption and resume, sampling,
# and the full-size 1024px step at the largest micro-batch `hart-train plan` says fits, with samples/s,
# tokens/s, MFU and the planner's memory next to the measured peak. About 10 minutes on one H100.
# Exits 2 with a one-line reason where no CUDA device is visible. Installs nothing beyond
# launch/setup.sh, except a CUDA build of the same torch version when only the CPU build is present.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device visible (nvidia-smi lists none); nothing to check on this machine" >&2
  exit 2
fi
[ -x .venv/bin/python ] || bash launch/setup.sh >&2
PY=.venv/bin/python
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
  echo "gpu_check: installing the CUDA build of torch==$version (this venv has the CPU one)" >&2
  "$PY" -m pip install --quiet "torch==$version" --index-url https://download.pytorch.org/whl/cu128 >&2 || {
    echo "gpu_check: could not install a CUDA build of torch==$version" >&2; exit 2; }
fi
exec "$PY" bench/gpu_check.py "$@"
