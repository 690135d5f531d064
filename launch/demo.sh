#!/usr/bin/env bash
# The README's main job: set up a fresh machine (launch/setup.sh), then run the whole system end to end on
# CPU (hart_train/demo.py): build the emoji dataset (a local directory, or with --s3 a local S3 server),
# train tokenizer-vq -> tokenizer-hybrid -> t2i with 2 DeepSpeed ranks, sample a grid, write a report.
# About 15 minutes on 2 cores; the last line printed is the path of the image grid.
#   bash launch/demo.sh [--s3] [--resume] [OUT_DIR]        (default OUT_DIR: demo_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_ARGS=() OUT=demo_out
while (($#)); do
  case "$1" in
    --s3|--resume) DEMO_ARGS+=("$1"); shift ;;
    -*) echo "demo.sh: unknown option $1 (usage: launch/demo.sh [--s3] [--resume] [OUT_DIR])" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
bash launch/setup.sh
exec .venv/bin/python -m hart_train.demo --out "$OUT" "${DEMO_ARGS[@]}"
