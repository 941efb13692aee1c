#!/usr/bin/env bash
# Train a recipe with torchrun. With no arguments: configs/debug.toml on whatever device is present.
#   NGPU=8 CONFIG_FILE=configs/qwen3_1p7b_pp4.toml ./run_train.sh --training.steps 50
# NGPU: processes on this node (default: the GPU count, or 1 without CUDA).
# CONFIG_FILE: the recipe. LOG_RANK: whose output to show (default 0). Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")"

# First run on a fresh machine: make the virtual environment (see scripts/setup_env.sh).
if [ -z "${VIRTUAL_ENV:-}" ] && [ ! -x .venv/bin/python ]; then
    bash scripts/setup_env.sh
fi
PYTHON="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}"
PYTHON="${PYTHON:-.venv/bin/python}"

CONFIG_FILE="${CONFIG_FILE:-configs/debug.toml}"
if [ ! -f "$CONFIG_FILE" ]; then
    echo "run_train.sh: no recipe at CONFIG_FILE=$CONFIG_FILE (recipes are in configs/)" >&2
    exit 2
fi
if [ -z "${NGPU:-}" ]; then
    NGPU=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
case "$NGPU" in
    '' | *[!0-9]* | 0*)
        echo "run_train.sh: NGPU=$NGPU: expected the number of processes to start, a positive integer (e.g. NGPU=1)" >&2
        exit 2 ;;
esac
LOG_RANK="${LOG_RANK:-0}"

# scripts/torchrun.py is torchrun that hands SIGTERM/SIGUSR1 to the ranks (they save and exit 0, README
# "Preemption") instead of killing them and failing.
cmd=("$PYTHON" -m scripts.torchrun --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint="localhost:0"
     --local-ranks-filter "$LOG_RANK" --role rank --tee 3
     train.py --config "$CONFIG_FILE" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
