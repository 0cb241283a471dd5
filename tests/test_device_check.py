"""tools/device_check.sh on a machine without a GPU: what can be checked before one is lent.

The launcher's syntax and argument errors, the dry run's listing (every command, run by an
interpreter without site-packages: the check must start before the venv exists), the one
line a machine without CUDA gets, the orchestration (steps in order, limits, the budget, the
one report) on stand-in steps, and the harness' side: its refusal of ``--device cuda``
without CUDA, and the synchronisation around every timed call. No setup, no model beyond
the harness' smallest run.
"""
from __future__ import annotations

import collections
import importlib.util
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch

from tooling import ROOT, TOOLS
from tooling import run_tool as run

LAUNCHER = TOOLS / 'device_check.sh'


def load(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


device_check = load('device_check', TOOLS / 'analysis' / 'device_check.py')


@pytest.fixture(scope='module')
def harness():
    return load('harness_for_device_check', TOOLS / 'analysis' / 'benchmark_backbone.py')


@pytest.fixture(scope='module')
def harness_output(harness):
    """The harness' real output for its smallest run on the CPU (the report parses this format)."""
    args = harness.parse_args(['--arch', 'b0', '--shape', '1', '3', '64', '64', '--impls', 'mmpvt', 'timm',
                               '--repeat', '2', '--warmup', '0', '--device', 'cpu'])
    return harness.run(args)


# -- the launcher -----------------------------------------------------------------------------------
def test_launcher_parses():
    done = subprocess.run(['bash', '-n', str(LAUNCHER)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize('argv,message', [
    (['--bogus'], 'unrecognized arguments: --bogus'),
    (['--budget', '3'], f'argument --budget: expected at least {device_check.MIN_STEP_S}, got 3'),
    (['--repeat', 'many'], "argument --repeat: expected a whole number, got 'many'"),
])
def test_bad_arguments_are_refused_with_the_usage(argv, message, tmp_path):
    out = run([LAUNCHER, *argv], cwd=tmp_path, env={'OUT': str(tmp_path / 'out')})
    assert out.returncode == 2
    assert out.stderr.startswith('usage: tools/device_check.sh [-h] [--dry-run]')
    assert message in out.stderr and 'Traceback' not in out.stderr
    assert not (tmp_path / 'out').exists()


def test_dry_run_lists_every_command_and_runs_nothing(tmp_path):
    out_dir = tmp_path / 'out'
    start = time.monotonic()
    shown = run([LAUNCHER, '--dry-run', '--repeat', '7'], cwd=tmp_path, env={'OUT': str(out_dir)})
    assert shown.returncode == 0, shown.stderr
    assert time.monotonic() - start < 10  # nothing was set up, tested or timed
    text = shown.stdout
    for step in device_check.plan(repeat=7):
        assert shlex.join([sys.executable, *step.args]) in text, step.name
    for expected in ['-m pytest tests -m cuda',
                     'benchmark_backbone.py --arch b2 --shape 1 3 800 1344 --dtype fp32 fp16 --device cuda '
                     '--repeat 7',
                     'benchmark_backbone.py --arch b2 --shape 2 3 512 512 --mode train --memory --device ',
                     '--mode train --memory --with-cp --device cuda',
                     'benchmark_backbone.py --arch vitdet_base --shape 1 3 1024 1024 --dtype fp32 fp16',
                     'stop with one line if CUDA is absent', f'write {out_dir}/device_check-']:
        assert expected in text, expected
    assert not out_dir.exists()
    # The check starts before any package is installed: the standard library is all it imports.
    script = TOOLS / 'analysis' / 'device_check.py'
    bare = subprocess.run([sys.executable, '-S', '-I', str(script), '--dry-run'],
                          capture_output=True, text=True, cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert '-m pytest tests -m cuda' in bare.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason='with CUDA the launcher would run the whole check')
def test_without_cuda_the_check_stops_with_one_line(tmp_path):
    out = run([LAUNCHER], cwd=tmp_path, env={'OUT': str(tmp_path / 'out')})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith('error: no CUDA device: torch.cuda.is_available() is False for ')
    assert 'tools/device_check.sh measures a GPU machine' in lines[0]
    assert not (tmp_path / 'out').exists()


# -- the plan and the report ------------------------------------------------------------------------
def test_every_planned_harness_run_is_one_the_harness_accepts(harness, monkeypatch):
    monkeypatch.setattr(harness.torch.cuda, 'is_available', lambda: True)
    benchmarks = [step for step in device_check.plan() if step.benchmark]
    parsed = {step.name: harness.parse_args(list(step.args[1:])) for step in benchmarks}
    assert all(step.args[0] == device_check.HARNESS for step in benchmarks)
    assert all(args.device == 'cuda' and args.impls == list(harness.BUILDERS) for args in parsed.values())
    b2, train, with_cp = (parsed[name] for name in ('PVTv2-b2 inference', 'PVTv2-b2 training step',
                                                    'PVTv2-b2 training step, with_cp'))
    assert (b2.arch, b2.shape, b2.dtype, b2.mode) == ('b2', [[1, 3, 800, 1344]], ['fp32', 'fp16'], 'infer')
    assert (train.shape, train.mode, train.memory) == ([[2, 3, 512, 512]], 'train', True)
    assert not train.with_cp
    assert (with_cp.memory, with_cp.with_cp) == (True, True)
    vit = [args for args in parsed.values() if args.arch == 'vitdet_base']
    assert len(vit) == 2 and all(args.shape == [[1, 3, 1024, 1024]] for args in vit)


def test_report_reads_the_harness_table(harness_output):
    rows = device_check.harness_rows(harness_output)
    assert [row[0] for row in rows] == ['mmpvt', 'timm']
    assert all(len(row) == len(device_check.HARNESS_COLUMNS) and row[-1] == '-' for row in rows)
    assert float(rows[0][3]) == 1.0 and all(float(row[1]) > 0 for row in rows)  # median, time / first
    assert device_check.harness_setting(harness_output).startswith('b0, input 1x3x64x64, infer, cpu; 2 ')


def test_main_runs_the_steps_in_their_limits_and_the_budget_and_writes_one_report(
        harness_output, tmp_path, monkeypatch, capsys):
    """Stand-in steps through main(): one passing, one whose tests skipped, a benchmark, one
    that hangs until its limit, one the budget no longer covers."""
    Step = device_check.Step
    table = tmp_path / 'harness.txt'
    table.write_text(harness_output)
    steps = [
        Step('tests', 'stand-in', ('-c', "print('3 passed, 9 deselected in 1.20s')"), 30, benchmark=False),
        Step('skipping tests', 'stand-in', ('-c', "print('2 skipped in 0.10s')"), 30, benchmark=False),
        Step('bench', 'stand-in harness', ('-c', f'print(open({str(table)!r}).read())'), 30),
        Step('hangs', 'stand-in', ('-c', 'import time; time.sleep(120)'), 60),
        Step('late', 'stand-in', ('-c', "print('never')"), 30),
    ]
    monkeypatch.setattr(device_check, 'MIN_STEP_S', 1)
    monkeypatch.setattr(device_check, 'interpreter', lambda: (sys.executable, 'this interpreter'))
    monkeypatch.setattr(device_check, 'cuda_info', lambda python: dict(
        available=True, device='a GPU', memory_gib=1.0, count=1, torch='x', cuda='y', cudnn=1, mmcv_cuda='z'))
    out_dir = tmp_path / 'out'
    monkeypatch.setenv('OUT', str(out_dir))
    start = time.monotonic()
    assert device_check.main(['--budget', '4'], steps=steps) == 1
    assert time.monotonic() - start < 10  # the hanging step was stopped by the budget
    reports = list(out_dir.iterdir())
    assert len(reports) == 1 and re.fullmatch(r'device_check-\d{8}T\d{6}Z\.md', reports[0].name)
    text = reports[0].read_text()
    statuses = {line.split('|')[1].strip(): line.split('|')[3].strip()
                for line in text.split('## Measurements')[0].splitlines() if line.startswith('| ')}
    assert statuses['tests'] == 'ok: 3 passed, 9 deselected in 1.20s'
    assert statuses['skipping tests'].startswith('incomplete')
    assert statuses['bench'].startswith('ok: b0, input 1x3x64x64')
    assert statuses['hangs'].startswith('timed out: stopped after ')
    assert statuses['late'].startswith('not run: the budget is spent')
    measurements = text.split('## Measurements')[1].split('## Raw log')[0]
    measured = [line for line in measurements.splitlines() if line.startswith('| bench |')]
    assert [line.split('|')[2].strip() for line in measured] == ['mmpvt', 'timm']
    raw = text.split('## Raw log')[1]
    assert 'time.sleep(120)' in raw and '3 passed, 9 deselected' in raw and "print('never')" not in raw
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(f'report (tables and raw log): {reports[0]}')
    assert '| bench | mmpvt |' in printed and '| step | what | result | seconds |' in printed


# -- the harness on CUDA ----------------------------------------------------------------------------
def test_harness_refuses_cuda_where_there_is_none(harness, monkeypatch, capsys):
    monkeypatch.setattr(harness.torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit) as info:
        harness.parse_args(['--device', 'cuda'])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('usage: ')
    assert 'error: --device cuda: no CUDA device is available here (torch.cuda.is_available() is False' in err
    assert harness.parse_args(['--device', 'cpu']).device == 'cpu'


def test_timed_calls_wait_for_the_device_before_and_after(harness, monkeypatch):
    events = []
    monkeypatch.setattr(harness.torch.cuda, 'synchronize', lambda: events.append('sync'))
    assert harness.timed(lambda: events.append('call'), 'cuda') >= 0
    assert events == ['sync', 'call', 'sync']
    events.clear()
    harness.timed(lambda: events.append('call'), 'cpu')
    assert events == ['call']
    # the per-operator timer: every operator between two synchronisations
    totals = collections.Counter()
    with harness.OpTimer(totals, 'cuda'):
        events.append('ops')
        torch.ones(3).add(1).mul(2)
    syncs = events[events.index('ops') + 1:]
    assert len(totals) >= 3 and set(syncs) == {'sync'}
    assert len(syncs) % 2 == 0 and len(syncs) >= 2 * len(totals)  # two per operator call


def test_every_timing_of_a_harness_run_goes_through_timed(harness, monkeypatch):
    """The interleaved steps and the GEMM ceiling are all timed by ``timed`` (which waits for
    the device), none by a bare clock."""
    devices = []
    original = harness.timed

    def recording(fn, device):
        devices.append(device)
        return original(fn, device)

    monkeypatch.setattr(harness, 'timed', recording)
    args = harness.parse_args(['--arch', 'b0', '--shape', '1', '3', '64', '64', '--impls', 'mmpvt',
                               '--repeat', '3', '--warmup', '0', '--device', 'cpu'])
    harness.run(args)
    assert devices == ['cpu'] * (3 + 6)  # 3 steps of one row, then the GEMM ceiling's 1 + 5 products


# -- the cuda tests here ----------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason='on a CUDA machine the cuda tests run')
def test_cuda_tests_are_collected_and_skipped_with_the_reason():
    """Every test of tests/test_cuda.py carries the registered ``cuda`` marker (none is
    deselected by ``-m cuda``, none is unknown under ``--strict-markers``) and is skipped
    with the reason."""
    done = subprocess.run([sys.executable, '-m', 'pytest', 'tests/test_cuda.py', '-m', 'cuda', '-rs', '-q',
                           '--strict-markers', '-p', 'no:cacheprovider'],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = device_check.pytest_summary(done.stdout)
    assert re.fullmatch(r'\d+ skipped in [\d.]+s', summary), summary
    assert int(summary.split()[0]) >= 10
    assert 'needs a CUDA device (torch.cuda.is_available() is False here)' in done.stdout
