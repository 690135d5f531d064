#!/usr/bin/env bash
# Set up a fresh machine for hart-train: Debian packages the demo and tests need, a virtualenv in
# .venv, torch first (the CPU wheel; an unpinned torch would pull a multi-GB CUDA build), then this
# package with its pinned dependencies. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fonts-noto-color-emoji unicode-data g++)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e '.[test,demo]' 2>&1 | grep -v -e "is ignored" -e "^ *!!" -e "^\s*$" -e "wheel_obj" || true
# DeepSpeed JIT-compiles its CPU ops on first use (the shared-memory comm op every CPU rank loads, cpu_adam
# for optimizer offload: about 25 s and 45 s here): compile them now, into the venv, where launch/ and the
# tests point TORCH_EXTENSIONS_DIR by default. Already built: only loaded.
if ! built=$(DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" .venv/bin/python -c "
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)
CPUAdamBuilder().load(verbose=False)" 2>&1); then
  echo "$built" >&2
  echo "setup: compiling DeepSpeed's CPU ops failed (see above)" >&2
  exit 1
fi
.venv/bin/python -c "import torch, deepspeed, data_tools, hart_train, tokenizer; print('setup: ok, torch', torch.__version__)"
