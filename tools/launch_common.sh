# Shared by the launchers (dist_*.sh, slurm_*.sh); sourced, not run.
# Sets ROOT (the repository) and PYTHON (the project's .venv if present, else python3 on
# PATH; a PYTHON set by the caller wins) and defines the checks the launchers run before
# starting anything heavy.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
# The tools import mmpvt from the repository even where it is not installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# require_file WHAT PATH: exit with "error: WHAT not found: PATH" unless PATH is a file.
require_file() {
  if [ ! -f "$2" ]; then
    echo "error: $1 not found: $2" >&2
    exit 1
  fi
}

# require_free_port PORT: torchrun's own message for a taken port is a long traceback, so
# the master node checks first, binding as torchrun's store does.
require_free_port() {
  if ! "$PYTHON" - "$1" <<'PYEOF'
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(('', int(sys.argv[1])))
    except OSError:
        sys.exit(1)
PYEOF
  then
    echo "error: port $1 is in use (another run?); set PORT to a free one, e.g. PORT=$(($1 + 1)) $0 ..." >&2
    exit 1
  fi
}

# run_torchrun NUM_PROCS SCRIPT ARGS...: NUM_PROCS processes per node of tools/SCRIPT with
# --launcher pytorch; several nodes through NNODES, NODE_RANK, MASTER_ADDR and PORT.
# mmpvt.cli.dist_launch runs SCRIPT's checks once (SCRIPT --check-only) before torchrun's
# agent starts the workers, keeps the other ranks' output under the work dir and reports a
# failed worker in one line.
run_torchrun() {
  local nprocs=$1 script=$2
  shift 2
  NNODES=${NNODES:-1}
  NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  PORT=${PORT:-29500}
  if [ "$NODE_RANK" = 0 ]; then require_free_port "$PORT"; fi
  exec "$PYTHON" -m mmpvt.cli.dist_launch \
    --nnodes="$NNODES" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" \
    --nproc="$nprocs" --port="$PORT" \
    "$ROOT/tools/$script" "$@"
}

# run_srun PARTITION JOB_NAME SCRIPT ARGS...: one task per GPU of tools/SCRIPT on Slurm, with
# --launcher slurm, after SCRIPT's checks (--check-only) passed on this machine. GPUS (8), GPUS_PER_NODE (min(GPUS, 8)), CPUS_PER_TASK (5) and SRUN_ARGS
# (extra srun options, e.g. "--time=2-00:00:00") come from the environment.
run_srun() {
  local partition=$1 job_name=$2 script=$3
  shift 3
  # The checks once, here, rather than in every task: one error, and no job queued for it.
  # --launcher=slurm: checks of what the job's nodes decide themselves (their GPUs) are left to them.
  "$PYTHON" "$ROOT/tools/$script" "$@" --launcher=slurm --check-only >/dev/null || exit 1
  GPUS=${GPUS:-8}
  GPUS_PER_NODE=${GPUS_PER_NODE:-$((GPUS < 8 ? GPUS : 8))}
  CPUS_PER_TASK=${CPUS_PER_TASK:-5}
  # SRUN_ARGS is split into words on purpose: it holds several srun options.
  # shellcheck disable=SC2086
  exec srun -p "$partition" --job-name="$job_name" \
    --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
    "$PYTHON" -u "$ROOT/tools/$script" "$@" --launcher=slurm
}
