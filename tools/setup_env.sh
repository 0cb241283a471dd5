#!/usr/bin/env bash
# Sets up .venv with the stack mmpvt runs on (what `make setup` runs):
#     bash tools/setup_env.sh [--plan] [--download DIR [--python-version X.Y] [--target-freeze FILE]]
# The logic, its options and its environment (PYTHON, VENV, MMPVT_CACHE, MMPVT_CUDA,
# TORCH_CUDA_ARCH_LIST, CUDA_HOME, WHEELHOUSE, MAX_JOBS) are in tools/setup_env.py, which needs
# only the standard library of PYTHON (default python3), the interpreter that makes the venv.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/setup_env.py" "$@"
