"""Checks a GPU machine in one command: the ``cuda`` tests, then the backbone harness on CUDA.

    bash tools/device_check.sh [--dry-run] [--budget SECONDS] [--repeat N] [--warmup N]

In order:

1. The interpreter: ``$PYTHON`` if set, else the repository's ``.venv``, reused as it is
   when present and created by ``tools/setup_env.sh`` (what ``make setup`` runs) when not.
2. A machine without CUDA stops here, with one line.
3. ``pytest tests -m cuda``: every test marked ``cuda`` (tests/test_cuda.py).
4. ``tools/analysis/benchmark_backbone.py --device cuda``: PVTv2-b2 inference at 1x3x800x1344
   in fp32 and fp16, its training step at 2x3x512x512 with peak memory, the same with
   ``with_cp``, each against mmdet's and timm's in the same run; ViTDet-B at 1x3x1024x1024
   against timm's SAM encoder, inference and training step.
5. One Markdown file under ``$OUT`` (default ``work_dirs/device_check/``): a table of the
   steps and one of every measurement, then the raw log of everything that ran. The tables
   are printed at the end.

The steps share a time budget (``--budget``, after the setup): each is stopped at its own
limit or when the budget runs out, and a step the budget no longer covers is listed as not
run, so the report is always written. With the venv in place the whole check takes at most
8 minutes on one GPU. ``--dry-run`` prints every command and what it measures, and runs
nothing. Exit status: 0 when every step passed, 1 otherwise, 2 for bad arguments.

Standard library only: it runs before the venv exists, under any python3.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROG = 'tools/device_check.sh'
HARNESS = 'tools/analysis/benchmark_backbone.py'
VENV_PYTHON = ROOT / '.venv' / 'bin' / 'python'
DEFAULT_OUT = 'work_dirs/device_check'
# Seconds for the steps after the setup: with the setup's checks and the interpreter's
# start, a run on a machine with its venv stays within the 8 minutes.
DEFAULT_BUDGET_S = 420
# A step is not started with less than this left of the budget: it could not finish.
MIN_STEP_S = 15
# The harness columns, in its table's order (tools/analysis/benchmark_backbone.py run()).
HARNESS_COLUMNS = ('implementation', 'median (s)', 'min - max (s)', 'time / first row', 'GFLOP/s',
                   '% of GEMM ceiling', 'peak memory (MB)')

# Run by the interpreter the steps use: whether it sees a GPU, and what it runs on.
CUDA_PROBE = '''
import json, torch
info = dict(available=torch.cuda.is_available(), torch=torch.__version__, cuda=torch.version.cuda)
if info['available']:
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    try:
        from mmcv.ops import get_compiling_cuda_version
        info['mmcv_cuda'] = get_compiling_cuda_version()
    except Exception as exc:  # reported, not fatal: the tests say what it breaks
        info['mmcv_cuda'] = f'unknown ({type(exc).__name__}: {exc})'
print(json.dumps(info))
'''


@dataclass(frozen=True)
class Step:
    """One thing the check runs: the interpreter with ``args``, in the repository root.

    ``limit_s`` is the most it may take (the remaining budget may cut it shorter);
    ``benchmark`` steps print the harness' table, which the report collects.
    """

    name: str
    what: str
    args: tuple[str, ...]
    limit_s: int
    benchmark: bool = True


@dataclass
class Result:
    """What became of a step: ``status`` is ok, failed, incomplete, timed out or not run."""

    step: Step
    status: str
    detail: str
    seconds: float
    command: str = ''
    output: str = ''


def plan(repeat: int = 20, warmup: int = 5) -> list[Step]:
    """The steps after the setup, in the order they run (the tests first)."""
    timing = ('--device', 'cuda', '--repeat', str(repeat), '--warmup', str(warmup))
    b2_train = ('--arch', 'b2', '--shape', '2', '3', '512', '512', '--mode', 'train', '--memory')
    vit = ('--arch', 'vitdet_base', '--shape', '1', '3', '1024', '1024')
    return [
        Step('cuda tests', 'the tests marked cuda: every backbone family on CUDA against the CPU '
             '(fp32 forward and backward), fp16/bf16 autocast, with_cp, channels-last; mmcv\'s CUDA ops; '
             'RetinaNet and Mask R-CNN trained 20 iterations with --amp, then tested; dist_train.sh on NCCL',
             ('-m', 'pytest', 'tests', '-m', 'cuda', '-q', '-rs'), 300, benchmark=False),
        Step('PVTv2-b2 inference', 'fp32 and fp16 autocast at 1x3x800x1344; mmpvt, mmdet, timm',
             (HARNESS, '--arch', 'b2', '--shape', '1', '3', '800', '1344', '--dtype', 'fp32', 'fp16',
              *timing), 120),
        Step('PVTv2-b2 training step', 'forward + backward at 2x3x512x512, fp32, peak memory; '
             'mmpvt, mmdet, timm', (HARNESS, *b2_train, *timing), 150),
        Step('PVTv2-b2 training step, with_cp', 'the same with activation checkpointing (mmdet has '
             'none): peak memory; mmpvt, timm', (HARNESS, *b2_train, '--with-cp', *timing), 120),
        Step('ViTDet-B inference', 'fp32 and fp16 autocast at 1x3x1024x1024; mmpvt, timm\'s SAM encoder',
             (HARNESS, *vit, '--dtype', 'fp32', 'fp16', *timing), 120),
        Step('ViTDet-B training step', 'forward + backward at 1x3x1024x1024, fp32, peak memory; '
             'mmpvt, timm\'s SAM encoder', (HARNESS, *vit, '--mode', 'train', '--memory', *timing), 150),
    ]


# -- reading the steps' output ----------------------------------------------------------------------
def harness_rows(output: str) -> list[list[str]]:
    """The rows of the harness' timing table in ``output``, one list of cells per row, with
    a '-' where a row has no peak memory."""
    rows: list[list[str]] = []
    lines = iter(output.splitlines())
    for line in lines:
        if line.startswith('| implementation |'):
            break
    for line in lines:
        if line.startswith('|---'):
            continue
        if not line.startswith('| '):
            break
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        rows.append(cells + ['-'] * (len(HARNESS_COLUMNS) - len(cells)))
    return rows


def harness_setting(output: str) -> str:
    """The harness' line naming the input, mode, repeats, GFLOP per step and GEMM ceiling."""
    return next((line for line in output.splitlines() if ' interleaved runs after ' in line), '')


def pytest_summary(output: str) -> str:
    """pytest's last summary line without its '=' frame, e.g. '21 passed in 95.1s'."""
    summaries = [m[1] for m in re.finditer(r'^=+ (.+ in [\d.]+s.*?) =+$', output, re.M)]
    if summaries:
        return summaries[-1]
    # -q prints the counts unframed
    bare = [line for line in output.splitlines() if re.match(r'^\d+ \w+.* in [\d.]+s', line)]
    return bare[-1] if bare else ''


# -- running ----------------------------------------------------------------------------------------
def run_step(python: str, step: Step, deadline: float, echo: Callable[[str], None] = print) -> Result:
    """Runs ``step`` with ``python``, its output shown as it comes, stopped at its limit or
    at ``deadline`` (time.monotonic), whichever comes first."""
    command = shlex.join([python, *step.args])
    left = deadline - time.monotonic()
    if left < MIN_STEP_S:
        return Result(step, 'not run', f'the budget is spent ({max(left, 0):.0f} s left)', 0., command)
    limit = min(step.limit_s, left)
    echo(f'\n==> [device check] {step.name} (at most {limit:.0f} s)\n$ {command}')
    start = time.monotonic()
    # A session of its own, so that a stop also ends what it started (pytest's tools, the
    # harness' memory probes).
    process = subprocess.Popen([python, *step.args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors='replace', start_new_session=True,
                               env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(limit, stop)
    timer.start()
    lines = []
    for line in process.stdout:
        echo(line.rstrip('\n'))
        lines.append(line)
    code = process.wait()
    timer.cancel()
    seconds = time.monotonic() - start
    output = ''.join(lines)
    detail = harness_setting(output) if step.benchmark else pytest_summary(output)
    if stopped.is_set():
        status, detail = 'timed out', f'stopped after {limit:.0f} s'
    elif code != 0:
        status, detail = 'failed', f'exit status {code}' + (f': {detail}' if detail else '')
    elif step.benchmark and not harness_rows(output):
        status, detail = 'failed', 'no timing table in its output'
    elif not step.benchmark and (not detail or 'skipped' in detail or 'passed' not in detail):
        status = 'incomplete'  # a test that did not run on the GPU checked nothing
    else:
        status = 'ok'
    return Result(step, status, detail, seconds, command, output)


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU before any Python package is installed."""
    if shutil.which('nvidia-smi'):
        done = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True)
        if done.returncode == 0 and 'GPU' in done.stdout:
            return True
    return any(Path('/dev').glob('nvidia[0-9]*'))


def cuda_info(python: str) -> dict:
    """What ``python`` sees: CUDA available, the GPU, torch's versions, mmcv's CUDA build.

    Exits with one line when ``python`` cannot import torch.
    """
    done = subprocess.run([python, '-c', CUDA_PROBE], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ['no output'])[-1]
        sys.exit(f'error: {python} cannot import torch ({last}); `make setup` creates the venv')
    return json.loads(done.stdout.strip().splitlines()[-1])


def no_cuda_message(python: str, info: dict) -> str:
    """The one line a machine without CUDA gets."""
    return (f'error: no CUDA device: torch.cuda.is_available() is False for {python} (torch {info["torch"]}, '
            f'built for CUDA {info["cuda"] or "none"}); {PROG} measures a GPU machine '
            '(--dry-run lists what it would run)')


# -- the report -------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace('|', '/').replace('\n', ' ')


def steps_table(results: Sequence[Result]) -> str:
    lines = ['| step | what | result | seconds |', '|---|---|---|---|']
    for r in results:
        result = r.status + (f': {r.detail}' if r.detail else '')
        lines.append(f'| {r.step.name} | {_cell(r.step.what)} | {_cell(result)} | {r.seconds:.0f} |')
    return '\n'.join(lines)


def measurements_table(results: Sequence[Result]) -> str:
    """Every harness row of the benchmark steps, in one table (ratios are to each run's first row)."""
    lines = ['| run | ' + ' | '.join(HARNESS_COLUMNS) + ' |', '|---|' + '---|' * len(HARNESS_COLUMNS)]
    for r in results:
        if r.step.benchmark:
            lines += [f'| {r.step.name} | ' + ' | '.join(row) + ' |' for row in harness_rows(r.output)]
    return '\n'.join(lines)


def report(header: str, results: Sequence[Result]) -> tuple[str, str]:
    """The report file's text and the part printed at the end (its tables)."""
    settings = [f'- {r.step.name}: {harness_setting(r.output)}' for r in results
                if r.step.benchmark and harness_setting(r.output)]
    tables = '\n'.join([
        '## Steps', '', steps_table(results), '',
        '## Measurements (tools/analysis/benchmark_backbone.py --device cuda)', '',
        measurements_table(results), '', *settings])
    raw = []
    for r in results:
        ran = r.command and r.status != 'not run'
        raw += [f'==> {r.step.name}: {r.status}', *([f'$ {r.command}'] if ran else []), r.output]
    # Four backticks: the raw log may hold three.
    text = '\n'.join([header, '', tables, '', '## Raw log', '', '````text', *raw, '````', ''])
    return text, tables


def describe(python: str | None, how: str, steps: Sequence[Step], budget: float, out_dir: Path) -> str:
    """The dry run's listing: every command and what it measures."""
    shown = python or str(VENV_PYTHON)
    lines = [f'{PROG} --dry-run: nothing runs. A run would:',
             f'  use {shown} ({how})', '  stop with one line if CUDA is absent',
             f'  run these steps within {budget:.0f} s (each at most its limit):']
    for i, step in enumerate(steps, 1):
        lines += [f'  {i}. {step.name} (at most {step.limit_s} s): {step.what}',
                  f'     $ {shlex.join([shown, *step.args])}']
    lines.append(f'  write {out_dir}/device_check-<UTC time>.md: the table of the steps, the table of the '
                 'measurements, the raw log; print the tables')
    return '\n'.join(lines)


def interpreter() -> tuple[str | None, str]:
    """The steps' interpreter and how it was chosen; None when the venv is to be created."""
    if os.environ.get('PYTHON'):
        return os.environ['PYTHON'], 'PYTHON from the environment'
    if os.access(VENV_PYTHON, os.X_OK):
        return str(VENV_PYTHON), 'the repository\'s .venv, reused'
    return None, 'none yet: bash tools/setup_env.sh (make setup) creates .venv first'


# -- the command line -------------------------------------------------------------------------------
def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'expected at least {minimum}, got {value}')
        return value
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description='Checks a GPU machine: the cuda tests, then the backbone harness on CUDA; '
        'writes one Markdown report under $OUT (default work_dirs/device_check/).')
    parser.add_argument('--dry-run', action='store_true',
                        help='list every command and what it measures; run nothing')
    parser.add_argument('--budget', type=_count(MIN_STEP_S), default=DEFAULT_BUDGET_S, metavar='SECONDS',
                        help=f'time for the steps after the setup (default {DEFAULT_BUDGET_S})')
    parser.add_argument('--repeat', type=_count(1), default=20, help='timed runs per implementation (20)')
    parser.add_argument('--warmup', type=_count(0), default=5, help='untimed runs first (5)')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, steps: Sequence[Step] | None = None) -> int:
    """Runs the check (``steps`` replaces the plan, for tests); returns the exit status."""
    args = parse_args(argv)
    steps = list(steps) if steps is not None else plan(args.repeat, args.warmup)
    out_dir = Path(os.environ.get('OUT') or ROOT / DEFAULT_OUT)
    python, how = interpreter()
    if args.dry_run:
        print(describe(python, how, steps, args.budget, out_dir))
        return 0

    results = []
    if python is None:
        if not gpu_visible():
            sys.exit(f'error: no NVIDIA GPU on this machine (nvidia-smi lists none, no /dev/nvidia*); '
                     f'{PROG} measures a GPU machine (--dry-run lists what it would run)')
        setup = Step('setup', 'bash tools/setup_env.sh: creates .venv', ('tools/setup_env.sh',), 0, False)
        print(f'==> [device check] no .venv: {setup.what}', flush=True)
        start = time.monotonic()
        done = subprocess.run(['bash', str(ROOT / 'tools' / 'setup_env.sh')], cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f'error: tools/setup_env.sh failed (exit status {done.returncode}); its output is above')
        results.append(Result(setup, 'ok', 'created .venv (its output is on the console only)',
                              time.monotonic() - start, 'bash tools/setup_env.sh'))
        python, how = str(VENV_PYTHON), 'the repository\'s .venv, just created'
    info = cuda_info(python)
    if not info['available']:
        sys.exit(no_cuda_message(python, info))

    started = datetime.now(timezone.utc)
    deadline = time.monotonic() + args.budget
    results += [run_step(python, step, deadline) for step in steps]
    header = '\n'.join([
        f'# Device check, {started:%Y-%m-%d %H:%M} UTC', '',
        f'{info["device"]} ({info["memory_gib"]} GiB; {info["count"]} visible), torch {info["torch"]}, '
        f'CUDA {info["cuda"]}, cuDNN {info["cudnn"]}, mmcv ops built for CUDA: {info["mmcv_cuda"]}; '
        f'interpreter {python} ({how}); budget {args.budget} s for the steps'])
    text, tables = report(header, results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f'device_check-{started:%Y%m%dT%H%M%SZ}.md'
    path.write_text(text)
    print(f'\n{tables}\n\nreport (tables and raw log): {path}')
    return 0 if all(r.status == 'ok' for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
