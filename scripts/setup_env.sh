#!/usr/bin/env bash
# Create .venv with the project's dependencies. Without CUDA the CPU build of
# torch is installed first: a bare "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup_env.sh: creating .venv"
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        .venv/bin/pip install -q "torch>=2.11,<=2.14.1"
    else
        # Set TORCH_INDEX_URL to PyTorch's CPU wheel index where PyPI's default build is the CUDA one.
        .venv/bin/pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
fi
.venv/bin/pip install -q -r requirements.txt
if [ "${WITH_FLOAT8:-}" = 1 ] || .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    .venv/bin/pip install -q -r requirements-cuda.txt
fi
echo "setup_env.sh: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
