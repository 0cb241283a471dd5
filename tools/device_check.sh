#!/usr/bin/env bash
# Checks a GPU machine in one command: the setup (mmcv's CUDA ops for its GPU; offline from a
# wheelhouse), the `cuda` tests, a user's day with the zoo's detectors, the backbone harness:
#     bash tools/device_check.sh [--wheelhouse DIR] [--setup-only | --skip-setup] [--dry-run]
#                                [--budget SECONDS] [--repeat N] [--warmup N]
# PYTHON (default python3) is the machine's interpreter: the setup makes the venv ($VENV,
# default .venv) from it, reusing its CUDA torch. Writes one Markdown file (the tables, then
# the raw log) under $OUT (default work_dirs/device_check/) and prints the tables at the end.
# The logic is in tools/analysis/device_check.py (standard library only: it runs before the
# venv exists).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "${PYTHON:-python3}" "$ROOT/tools/analysis/device_check.py" "$@"
