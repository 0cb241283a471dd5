#!/usr/bin/env bash
# Evaluate a checkpoint with NUM_PROCS processes per node through torchrun:
#     tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py options]
# One process per GPU; on a machine without a GPU, NUM_PROCS CPU processes over gloo.
# Several nodes: run it on each with NNODES, NODE_RANK, MASTER_ADDR (and PORT) set.
# The tool's checks run once first; a failed worker is reported in one line, with every
# rank's log under WORK_DIR/dist_logs/ (mmpvt/cli/dist_launch.py).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 CONFIG CHECKPOINT NUM_PROCS [test.py options]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
CONFIG=$1 CHECKPOINT=$2 NUM_PROCS=$3
shift 3
require_file 'config file' "$CONFIG"
require_file checkpoint "$CHECKPOINT"
run_torchrun "$NUM_PROCS" test.py "$CONFIG" "$CHECKPOINT" "$@"
