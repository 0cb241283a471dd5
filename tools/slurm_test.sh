#!/usr/bin/env bash
# Evaluate a checkpoint on a Slurm cluster, one task per GPU:
#     [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#         tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
PARTITION=$1 JOB_NAME=$2 CONFIG=$3 CHECKPOINT=$4
shift 4
require_file 'config file' "$CONFIG"
require_file checkpoint "$CHECKPOINT"
run_srun "$PARTITION" "$JOB_NAME" test.py "$CONFIG" "$CHECKPOINT" "$@"
