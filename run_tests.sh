#!/usr/bin/env bash
# The test suite (CPU; multi-process tests use gloo). GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
