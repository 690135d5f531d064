#!/usr/bin/env bash
# The torchrun equivalent of launch/train.sh (no DeepSpeed launcher; DeepSpeed still runs the engine).
#   launch/torchrun.sh --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr ADDR -- --config FILE [--set k=v]
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=1 NODE_RANK=0 NPROC=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29500}
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --nnodes) NNODES=$2; shift 2 ;;
    --node_rank) NODE_RANK=$2; shift 2 ;;
    --nproc_per_node) NPROC=$2; shift 2 ;;
    --master_addr) MASTER_ADDR=$2; shift 2 ;;
    --master_port) MASTER_PORT=$2; shift 2 ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) TRAIN_ARGS+=("$1"); shift ;;
  esac
done
PY=${HART_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${HART_DEVICE:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)}
export DS_ACCELERATOR=$DEVICE WANDB_MODE=${WANDB_MODE:-offline}
# DeepSpeed's JIT-built ops, cached per Python environment (another venv sharing ~/.cache would rebuild them)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PY" -c 'import sys; print(sys.prefix)')/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
[ "$DEVICE" = cuda ] && export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
[ -n "${HART_RUN_ROOT:-}" ] && TRAIN_ARGS+=(--set "run.out_dir=$HART_RUN_ROOT")
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m hart_train.cli run --set "run.device=$DEVICE" "${TRAIN_ARGS[@]}"
