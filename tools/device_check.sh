#!/usr/bin/env bash
# Checks a GPU machine in one command: the `cuda` tests, then the backbone harness on CUDA
# (PVTv2-b2 against mmdet's and timm's, ViTDet-B against timm's), within 8 minutes on one GPU
# once the venv exists:
#     bash tools/device_check.sh [--dry-run] [--budget SECONDS] [--repeat N] [--warmup N]
# Creates .venv with tools/setup_env.sh when it is missing and reuses it when present
# (PYTHON=... runs another interpreter instead). Writes one Markdown file (the tables, then
# the raw log) under $OUT (default work_dirs/device_check/) and prints the tables at the end.
# --dry-run lists every command and what it measures, and runs none. The logic is in
# tools/analysis/device_check.py (standard library only: it runs before the venv exists).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  RUNNER=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  RUNNER=$ROOT/.venv/bin/python
else
  RUNNER=python3
fi
exec "$RUNNER" "$ROOT/tools/analysis/device_check.py" "$@"
