#!/usr/bin/env bash
# The README's main job. Sets up a fresh machine, then builds the offline demo dataset (Noto Color
# Emoji rendered with Pillow, captions from Unicode's emoji names) as webdataset shards, verifies
# every shard and sample, and prints its statistics.
#   bash launch/demo.sh [OUT_DIR]        (default: demo_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s)
hart-data shard emoji "$OUT/emoji-shards" --resolution 64 --format png --samples-per-shard 512 --workers 2 --overwrite
hart-data verify "$OUT/emoji-shards" --workers 2
hart-data stats "$OUT/emoji-shards" --plot "$OUT/emoji-stats.png"
echo "demo: dataset at $OUT/emoji-shards, stats plot at $OUT/emoji-stats.png ($(( $(date +%s) - start )) s)"
