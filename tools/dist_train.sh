#!/usr/bin/env bash
# Train with NUM_PROCS processes per node through torchrun:
#     tools/dist_train.sh CONFIG NUM_PROCS [train.py options]
# One process per GPU; on a machine without a GPU, NUM_PROCS CPU processes over gloo.
# Several nodes: run it on each with NNODES, NODE_RANK, MASTER_ADDR (and PORT) set.
# The tool's checks run once first; a failed worker is reported in one line, with every
# rank's log under WORK_DIR/dist_logs/ (mmpvt/cli/dist_launch.py).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG NUM_PROCS [train.py options]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
CONFIG=$1 NUM_PROCS=$2
shift 2
require_file 'config file' "$CONFIG"
run_torchrun "$NUM_PROCS" train.py "$CONFIG" "$@"
