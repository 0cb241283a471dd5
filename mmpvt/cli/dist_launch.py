"""torchrun for mmpvt's tools: the checks once, then the workers, and one report of a failure.

    python -m mmpvt.cli.dist_launch --nproc N [--nnodes 1 --node-rank 0 --master-addr ADDR
                                     --port PORT] tools/train.py CONFIG [options]

tools/dist_train.sh and tools/dist_test.sh call this (they read NNODES, NODE_RANK,
MASTER_ADDR and PORT from the environment). Run directly, torchrun would start N copies of
the tool, each of which checks the config and the data and prints the same error, followed
by torchrun's failure report for every rank. Here:

1. The tool runs once with ``--check-only`` in this process's child: the config, the
   ``--cfg-options`` keys, the checkpoint and the dataset paths. A failure prints the
   tool's one ``error:`` block and ends the launch with the tool's exit code (1); no worker
   starts. On success the tool prints the run's work dir.
2. torchrun's agent (``torch.distributed.launcher.elastic_launch``, with the options
   ``python -m torch.distributed.run`` would get) starts the workers, each with
   ``--launcher pytorch``. Local rank 0 writes to the console as a single process would
   (its stderr is copied to a file too); the other ranks' output and the agent's own log
   go to files under ``WORK_DIR/dist_logs/<time>/``.
3. If workers fail, the console shows rank 0's error once (it is rank 0's own output; if
   rank 0 printed none, the end of the first failed rank's log is shown instead), then one
   line: how many of the processes failed, how, and where the full logs are.

Without CUDA the workers are CPU processes over gloo; one line says how many run on how
many cores, and each gets an equal share of the cores as OpenMP threads (torchrun's
default is one thread each).
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .launch import CHECKED_WORK_DIR

__all__ = ['main', 'precheck']

# The lines of a failed rank's log shown on the console at most; the rest stays in the file.
MAX_SHOWN_LINES = 40


def precheck(script: str, script_args: Sequence[str]) -> str:
    """Runs ``script --check-only`` once and returns the work dir it reports.

    The tool's stderr (the ``error:`` block) goes to the console; its stdout, which repeats
    what the workers print again, is kept back. Exits with the tool's exit code on failure.
    """
    done = subprocess.run([sys.executable, script, *script_args, '--check-only'],
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.stdout.write(done.stdout)  # whatever the tool printed before its error
        sys.exit(done.returncode)
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHECKED_WORK_DIR)]
    if not lines:
        sys.exit(f'error: {script} --check-only did not report its work dir (it printed: {done.stdout!r})')
    return lines[-1][len(CHECKED_WORK_DIR):]


def usable_cores() -> int:
    """The cores this process may run on (what ``nproc`` prints)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def plan_threads(nproc: int, cuda: bool) -> str:
    """Sets OMP_NUM_THREADS for the workers unless the user did; returns a description.

    With CUDA, one thread each, as torchrun sets (without its banner); on the CPU, the
    usable cores shared equally, at least one each.
    """
    if 'OMP_NUM_THREADS' not in os.environ and nproc > 1:
        os.environ['OMP_NUM_THREADS'] = str(1 if cuda else max(1, usable_cores() // nproc))
    threads = os.environ.get('OMP_NUM_THREADS', str(usable_cores()))
    return f'{threads} OpenMP thread{"" if threads == "1" else "s"} each'


def cpu_notice(nproc: int, nnodes: int, threads: str) -> str:
    """The one line a launch without CUDA prints: processes, backend, cores and threads."""
    cores = usable_cores()
    where = f' (this node; {nnodes} nodes in all)' if nnodes > 1 else ''
    crowded = (f'; {nproc} processes share {cores} cores, so each runs slower than it would alone'
               if nproc > cores else '')
    return (f'mmpvt: no CUDA: {nproc} CPU processes over gloo on {cores} cores{where}, '
            f'{threads}{crowded}')


def _stderr_log(log_dir: Path, local_rank: int) -> Path | None:
    """The stderr file torchrun kept for ``local_rank`` under ``log_dir`` (the last attempt's)."""
    found = sorted(glob.glob(str(log_dir / '*' / 'attempt_*' / str(local_rank) / 'stderr.log')))
    return Path(found[-1]) if found else None


# How a tool's error (sys.exit('error: ...')) and an uncaught exception begin.
ERROR_STARTS = ('error: ', 'Traceback (most recent call last)')


def _error_starts(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if line.startswith(ERROR_STARTS)]


def has_error(text: str) -> bool:
    """Whether ``text`` holds a tool's ``error:`` line or a traceback."""
    return bool(_error_starts(text.splitlines()))


def last_error(text: str, max_lines: int = MAX_SHOWN_LINES) -> str:
    """The end of a worker's stderr that explains its failure.

    From the last ``error:`` line a tool printed or the last traceback, whichever comes
    later, to the end (without either: the end); at most ``max_lines`` lines (the last ones).
    """
    lines = text.rstrip('\n').splitlines()
    starts = _error_starts(lines)
    shown = lines[starts[-1]:] if starts else lines
    return '\n'.join(shown[-max_lines:])


class ConsoleStderr:
    """This process's stderr (file descriptor 2, which local rank 0 inherits), passed on to
    the console as before and copied to ``path``, so that the report knows whether rank 0
    has shown an error already and rank 0's log is kept with the others'.

    Stdout stays the console itself: progress lines keep their terminal.
    """

    def __init__(self, path: Path) -> None:
        self.console = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.path = path
        self.copy = open(path, 'wb')  # closed in close(), once the pump has ended
        self.pump = threading.Thread(target=self._pass_on, args=(read_end,), daemon=True)
        self.pump.start()

    def _pass_on(self, read_end: int) -> None:
        while chunk := os.read(read_end, 1 << 16):
            os.write(self.console, chunk)
            self.copy.write(chunk)
            self.copy.flush()
        os.close(read_end)

    def close(self) -> str:
        """Gives file descriptor 2 back to the console; returns what went through."""
        sys.stderr.flush()
        os.dup2(self.console, 2)  # closes the pipe's last write end once the workers are gone
        os.close(self.console)
        self.pump.join(timeout=10)  # a leftover grandchild may hold the pipe: do not wait for it
        self.copy.close()
        return self.path.read_text(errors='replace')


def _how(failure) -> str:
    """How one worker failed, in torchrun's words for a signal (``Signal 9 (SIGKILL)``)."""
    if failure.exitcode < 0:
        return f'Signal {-failure.exitcode} ({failure.signal_name()})'
    return f'exit code {failure.exitcode}'


def report_failure(failures: dict, nproc: int, log_dir: Path, console_text: str = '') -> str:
    """Prints the first failed worker's error unless the console shows an error of rank 0
    already (``console_text``: local rank 0's stderr); returns the one-line summary.

    ``failures`` maps global ranks to torchrun's ProcessFailure records of this node's
    workers. Once one worker fails the agent ends the others with SIGTERM, and those are
    listed too: they count as stopped, not failed, unless SIGTERM ended all of them (a
    scheduler's, or the user's). A rank that failed at the same time as the first (the same
    error on every rank) may be listed as stopped: it was still exiting when the agent looked.
    """
    stopped = sorted(rank for rank, failure in failures.items() if failure.exitcode == -signal.SIGTERM)
    failed = sorted(rank for rank in failures if rank not in stopped) or stopped
    if failed == stopped:
        stopped = []
    first = min(failed, key=lambda rank: (failures[rank].timestamp, rank))
    if not has_error(console_text) and failures[first].local_rank != 0:
        log = _stderr_log(log_dir, failures[first].local_rank)
        text = log.read_text(errors='replace') if log else ''
        if text.strip():
            print(f'rank {first} ({log}):\n{last_error(text)}', file=sys.stderr, flush=True)
    how = ', '.join(f'rank {rank}: {_how(failures[rank])}' for rank in failed)
    others = f'; the agent then stopped {len(stopped)} more (SIGTERM)' if stopped else ''
    return (f'error: {len(failed)} of {nproc} worker processes failed ({how}){others}; '
            f'full logs in {log_dir}/')


def _log_agent_to(path: Path) -> None:
    """Sends the torchrun agent's own log (worker starts, stops and failures) to ``path``
    instead of the console, where torch's logging setup sends it."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    for name in ('torch.distributed.elastic', 'torch.distributed.launcher', 'torch.distributed.run'):
        agent_logger = logging.getLogger(name)
        agent_logger.addHandler(handler)
        agent_logger.propagate = False


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m mmpvt.cli.dist_launch',
                                     description=__doc__.splitlines()[0])
    parser.add_argument('--nproc', type=int, required=True, help='worker processes on this node')
    parser.add_argument('--nnodes', type=int, default=1)
    parser.add_argument('--node-rank', type=int, default=0)
    parser.add_argument('--master-addr', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=29500)
    parser.add_argument('script', help='the tool the workers run: tools/train.py or tools/test.py')
    parser.add_argument('script_args', nargs=argparse.REMAINDER, help="the tool's arguments")
    args = parser.parse_args(argv)
    if args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        parser.error(f'need NUM_PROCS >= 1, NNODES >= 1 and 0 <= NODE_RANK < NNODES; got {args.nproc}, '
                     f'{args.nnodes} and {args.node_rank}')
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    work_dir = precheck(args.script, args.script_args)

    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args
    from torch.distributed.run import parse_args as torchrun_args

    cuda = torch.cuda.is_available()
    threads = plan_threads(args.nproc, cuda)
    if not cuda:
        print(cpu_notice(args.nproc, args.nnodes, threads), flush=True)
    stamp = time.strftime('%Y%m%d_%H%M%S')
    log_dir = Path(work_dir) / 'dist_logs' / (stamp if args.nnodes == 1 else f'{stamp}_node{args.node_rank}')
    log_dir.mkdir(parents=True, exist_ok=True)
    _log_agent_to(log_dir / 'agent.log')
    # Local rank 0 keeps the console; 3 = stdout and stderr to files, for every other rank.
    redirects = ','.join(f'{rank}:3' for rank in range(1, args.nproc)) or '0'
    config, entrypoint, entrypoint_args = config_from_args(torchrun_args([
        f'--nnodes={args.nnodes}', f'--node_rank={args.node_rank}', f'--master_addr={args.master_addr}',
        f'--master_port={args.port}', f'--nproc_per_node={args.nproc}', f'--log_dir={log_dir}',
        f'--redirects={redirects}', args.script, *args.script_args, '--launcher', 'pytorch']))
    console = ConsoleStderr(log_dir / 'local_rank_0_stderr.log')
    try:
        elastic_launch(config, entrypoint)(*entrypoint_args)
    except ChildFailedError as exc:
        sys.exit(report_failure(exc.failures, args.nproc, log_dir, console.close()))
    except SignalException as exc:  # Ctrl-C or a scheduler's SIGTERM: the agent stopped the workers
        console.close()
        sys.exit(f'error: stopped by {exc.sigval.name}; logs in {log_dir}/')
    console.close()


if __name__ == '__main__':
    main()
