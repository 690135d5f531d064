#!/usr/bin/env bash
# Training on one node or many. Everything after the launcher options goes to `hart-train run`
# (--config FILE [--set key=value ...]). One node, and one node of many (--no_ssh), run this node's ranks
# under hart_train.launcher, which turns preemption (SIGTERM or SIGUSR1) into a checkpoint and exit 0;
# many nodes from one (pdsh/ssh) go through DeepSpeed's runner.
#
#   One node, N ranks:            launch/train.sh --num_gpus 8 --config configs/t2i_1024.yaml
#   Many nodes over pdsh/ssh:     launch/train.sh --hostfile launch/hostfile.example --config ...
#   One node of many (no ssh;     launch/train.sh --hostfile H --no_ssh --node_rank $R --master_addr $ADDR \
#     Kubernetes, Slurm):           --config ...            (run it once on every node)
#
# Environment handled here: DS_ACCELERATOR and the backend (cuda+nccl when a GPU is visible, else
# cpu+gloo: set HART_DEVICE=cpu|cuda to force), OMP_NUM_THREADS (cores / ranks per node unless set),
# LOCAL_SIZE on CPU (the CPU accelerator's rank count), NCCL error handling, the master port, and
# .deepspeed_env so pdsh-launched nodes get the same variables. The run directory is the config's
# run.out_dir/run.name; HART_RUN_ROOT overrides run.out_dir.
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTFILE="" NUM_GPUS="" NODE_RANK="" MASTER_ADDR="" MASTER_PORT="${MASTER_PORT:-29500}" NO_SSH=0
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --num_gpus) NUM_GPUS=$2; shift 2 ;;
    --node_rank) NODE_RANK=$2; shift 2 ;;
    --master_addr) MASTER_ADDR=$2; shift 2 ;;
    --master_port) MASTER_PORT=$2; shift 2 ;;
    --no_ssh) NO_SSH=1; shift ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) TRAIN_ARGS+=("$1"); shift ;;
  esac
done

PY=${HART_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${HART_DEVICE:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)}

if [ -n "$HOSTFILE" ]; then
  [ -f "$HOSTFILE" ] || { echo "train.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
  SLOTS=$(awk '!/^ *#/ && NF {for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) {split($i, a, "="); print a[2]; exit}}' "$HOSTFILE")
  RANKS_PER_NODE=${NUM_GPUS:-${SLOTS:-1}}
else
  RANKS_PER_NODE=${NUM_GPUS:-1}
fi

export DS_ACCELERATOR=$DEVICE
# DeepSpeed's JIT-built ops, cached per Python environment (another venv sharing ~/.cache would rebuild them)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PY" -c 'import sys; print(sys.prefix)')/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / RANKS_PER_NODE > 0 ? $(nproc) / RANKS_PER_NODE : 1 ))}
export WANDB_MODE=${WANDB_MODE:-offline}
if [ "$DEVICE" = cpu ]; then
  export LOCAL_SIZE=$RANKS_PER_NODE
  TRAIN_ARGS+=(--set run.device=cpu)
else
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the others
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  TRAIN_ARGS+=(--set run.device=cuda)
fi
[ -n "${HART_RUN_ROOT:-}" ] && TRAIN_ARGS+=(--set "run.out_dir=$HART_RUN_ROOT")

if [ -n "$HOSTFILE" ] && ((! NO_SSH)); then
  # Many nodes from this one over pdsh/ssh: DeepSpeed's runner starts DeepSpeed's launcher on every node,
  # which kills its ranks on SIGTERM (no checkpoint). Under a scheduler, run one per-node launcher on
  # every node instead (--no_ssh, as launch/slurm.sbatch does), which checkpoints on preemption.
  # pdsh/ssh nodes inherit these through DeepSpeed's .deepspeed_env file
  env | grep -E '^(DS_ACCELERATOR|OMP_NUM_THREADS|LOCAL_SIZE|WANDB_MODE|TORCH_NCCL_ASYNC_ERROR_HANDLING|NCCL_[A-Z_]+|GLOO_[A-Z_]+|AWS_DEFAULT_REGION|AWS_ENDPOINT_URL[A-Z_]*|HF_HUB_OFFLINE)=' > .deepspeed_env || true
  LAUNCH=(-m deepspeed.launcher.runner --no_local_rank --master_port "$MASTER_PORT" --hostfile "$HOSTFILE")
  [ -n "$NUM_GPUS" ] && LAUNCH+=(--num_gpus "$NUM_GPUS")
  [ -n "$MASTER_ADDR" ] && LAUNCH+=(--master_addr "$MASTER_ADDR")
  exec "$PY" "${LAUNCH[@]}" --module hart_train.cli run "${TRAIN_ARGS[@]}"
fi

# This node's ranks under hart_train.launcher: SIGTERM or SIGUSR1 (to the launcher or to the whole job)
# makes every rank save a checkpoint and exit 0, and the launcher exit 0; the same command resumes.
LAUNCH=(-m hart_train.launcher --master_port "$MASTER_PORT")
[ -n "$NUM_GPUS" ] && LAUNCH+=(--nproc_per_node "$NUM_GPUS")
if ((NO_SSH)); then
  [ -n "$NODE_RANK" ] || { echo "train.sh: --no_ssh needs --node_rank" >&2; exit 2; }
  [ -n "$MASTER_ADDR" ] || { echo "train.sh: --no_ssh needs --master_addr" >&2; exit 2; }
  [ -n "$HOSTFILE" ] || { echo "train.sh: --no_ssh needs --hostfile" >&2; exit 2; }
  LAUNCH+=(--hostfile "$HOSTFILE" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
fi
exec "$PY" "${LAUNCH[@]}" hart_train.cli run "${TRAIN_ARGS[@]}"
