#!/usr/bin/env bash
# One node's share of a multi-node run: start torchrun here, meeting the other nodes at the head node.
# scripts/multinode.slurm runs this once per node through srun; it reads only environment variables,
# so it also runs by hand without Slurm (tests/test_launch.py starts two "nodes" on one machine):
#   SLURM_NNODES=2 SLURM_NODEID=0 SLURM_JOB_ID=1 SLURM_JOB_NODELIST=127.0.0.1 GPUS_PER_NODE=2 \
#     CONFIG_FILE=configs/debug.toml scripts/slurm_launch.sh --training.steps 4
# Slurm sets:  SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE, SLURM_CPUS_PER_TASK.
# You may set: CONFIG_FILE (default configs/llama3_8b.toml), GPUS_PER_NODE (default SLURM_GPUS_ON_NODE),
#   MASTER_PORT (the rendezvous port on the head node), LOG_DIR (per-rank logs, default outputs/logs/<job id>),
#   LOG_RANK (which local rank of each node is shown on the console, default 0), PYTHON,
#   DRY_RUN=1 (check the recipe as `train.py --dry_run` does for the job's world size, print the command,
#   start nothing). Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "slurm_launch.sh: $*" >&2; exit 2; }

: "${SLURM_NNODES:?slurm_launch.sh: SLURM_NNODES is not set (run under srun, or set it by hand)}"
: "${SLURM_NODEID:?slurm_launch.sh: SLURM_NODEID is not set}"
: "${SLURM_JOB_ID:?slurm_launch.sh: SLURM_JOB_ID is not set}"
: "${SLURM_JOB_NODELIST:?slurm_launch.sh: SLURM_JOB_NODELIST is not set}"

CONFIG_FILE="${CONFIG_FILE:-configs/llama3_8b.toml}"
[ -f "$CONFIG_FILE" ] || die "no recipe at CONFIG_FILE=$CONFIG_FILE (recipes are in configs/; paths are relative to the repository root)"

GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
[ -n "$GPUS_PER_NODE" ] || die "GPUS_PER_NODE is not set and Slurm gave no SLURM_GPUS_ON_NODE (sbatch --gpus-per-node=N)"
positive() { case "$1" in '' | *[!0-9]* | 0*) return 1 ;; esac; }
positive "$GPUS_PER_NODE" || die "GPUS_PER_NODE=$GPUS_PER_NODE: expected the processes per node, a positive integer (e.g. 8)"
positive "$SLURM_NNODES" || die "SLURM_NNODES=$SLURM_NNODES: expected the number of nodes, a positive integer"

PYTHON="${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}"
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null || \
    die "no Python at $PYTHON: run scripts/setup_env.sh once on the shared filesystem, or set PYTHON"

# The first host of the allocation hosts the rendezvous. Without scontrol (tests, a container without
# Slurm's tools) expand the first entry of the compressed list by hand: "gpu[07-09,12],cpu1" -> "gpu07".
head_node() {
    if command -v scontrol >/dev/null; then
        scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1
        return
    fi
    local list="$SLURM_JOB_NODELIST"
    local prefix="${list%%[\[,]*}"
    if [ "${list:${#prefix}:1}" = "[" ]; then
        local range="${list#"${prefix}["}"
        echo "$prefix${range%%[-,\]]*}"
    else
        echo "$prefix"
    fi
}
HEAD_NODE="$(head_node)"
# Derived from the job id so that two jobs sharing a head node do not collide on one port.
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"

# Worker processes share the task's cores (srun --cpus-per-task); torchrun would otherwise set 1.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    threads=$(( ${SLURM_CPUS_PER_TASK:-1} / GPUS_PER_NODE ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi
# NVLink multicast (NVLS) stays off: where the fabric manager / IMEX setup is not right, using it can
# take a node's GPUs out of service, and the FSDP collectives here do not need it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# Console lines carry the global rank (torchrun fills in ${rank}): with c10d rendezvous, global rank 0
# may be on any node.
# shellcheck disable=SC2016
export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank${rank}]:'

LOG_DIR="${LOG_DIR:-outputs/logs/$SLURM_JOB_ID}"
# scripts/torchrun.py is torchrun that hands SIGTERM/SIGUSR1 to the ranks (they save and exit 0, README
# "Preemption") instead of killing them and failing.
cmd=("$PYTHON" -m scripts.torchrun
     --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE"
     --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID"
     # Node 0 hosts the rendezvous store; saying so beats torchrun's guess from hostnames, which fails
     # where the head node's name in the node list is not one of its own names.
     --rdzv_conf "is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)"
     # Every rank's stdout and stderr in LOG_DIR/node<N>/<job id>_*/attempt_0/<local rank>/; the console
     # (the job's .out file) gets local rank LOG_RANK of each node.
     --log-dir "$LOG_DIR/node$SLURM_NODEID" --tee 3 --local-ranks-filter "${LOG_RANK:-0}"
     train.py --config "$CONFIG_FILE" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    # The run's own checks (keys, layout, tokenizer, data files, output folders) and its memory prediction,
    # for the whole job's world; a mistake is the one line the run would print.
    "$PYTHON" train.py --config "$CONFIG_FILE" "$@" --dry_run --world_size $((SLURM_NNODES * GPUS_PER_NODE)) || exit $?
fi
echo "[node $SLURM_NODEID/$SLURM_NNODES $(hostname)] $(env | grep -E '^(NCCL_|OMP_NUM_THREADS=)' | sort | tr '\n' ' ')"
echo "[node $SLURM_NODEID/$SLURM_NNODES $(hostname)] + ${cmd[*]}"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
exec "${cmd[@]}"
