"""tools/device_check.sh on a machine without a GPU: what can be checked before one is lent.

The launcher's syntax and argument errors, the dry run's listing (every command, run by an
interpreter without site-packages: the check must start before the venv exists), the one
line a machine without CUDA gets, the orchestration (steps in order, limits, the budget, the
one report) on stand-in steps, and the harness' side: its refusal of ``--device cuda``
without CUDA, and the synchronisation around every timed call. No setup, no model beyond
the harness' smallest run.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tooling import ROOT, TOOLS
from tooling import run_tool as run

LAUNCHER = TOOLS / 'device_check.sh'
BASE_PYTHON = str(Path(sys.base_prefix) / 'bin' / 'python3')  # a machine's own interpreter


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
    (['--setup-only', '--skip-setup'], 'argument --skip-setup: not allowed with argument --setup-only'),
    (['--wheelhouse', '.', '--skip-setup'], '--wheelhouse goes with a setup: drop --skip-setup'),
    (['--wheelhouse', '.'], '--wheelhouse .: no wheelhouse.json there'),
])
def test_bad_arguments_are_refused_with_the_usage(argv, message, tmp_path):
    out = run([LAUNCHER, *argv], cwd=tmp_path, env={'OUT': str(tmp_path / 'out')})
    assert out.returncode == 2
    assert out.stderr.startswith('usage: tools/device_check.sh [-h] [--dry-run]')
    assert message in out.stderr and 'Traceback' not in out.stderr
    assert not (tmp_path / 'out').exists()


def test_dry_run_lists_every_command_and_runs_nothing(tmp_path):
    out_dir = tmp_path / 'out'
    wheelhouse = tmp_path / 'wheels'
    wheelhouse.mkdir()
    (wheelhouse / 'wheelhouse.json').write_text('{}')
    venv = tmp_path / 'venv'
    start = time.monotonic()
    shown = run([LAUNCHER, '--dry-run', '--repeat', '7', '--wheelhouse', wheelhouse], cwd=tmp_path,
                env={'OUT': str(out_dir), 'VENV': str(venv), 'PYTHON': BASE_PYTHON})
    assert shown.returncode == 0, shown.stderr
    assert time.monotonic() - start < 10  # nothing was set up, tested or timed
    text = shown.stdout
    layout = device_check.Layout(venv)
    assert f'1. setup (at most {device_check.SETUP_LIMIT_S} s)' in text
    assert f'{venv} made by {BASE_PYTHON}' in text
    assert f'$ WHEELHOUSE={wheelhouse} bash tools/setup_env.sh' in text
    for step in device_check.plan(layout, repeat=7):
        assert shlex.join(step.argv(str(venv / 'bin' / 'python'))) in text, step.name
    for expected in ['-m pytest tests -m cuda',
                     'bash tools/dist_train.sh configs/retinanet_pvt_v2_b0.py 1 --amp --work-dir ',
                     'bash tools/dist_test.sh configs/mask_rcnn_pvt_v2_b0.py ',
                     'benchmark_backbone.py --arch b2 --shape 1 3 800 1344 --dtype fp32 fp16 --device cuda '
                     '--repeat 7',
                     'benchmark_backbone.py --arch b2 --shape 2 3 512 512 --mode train --memory --device ',
                     '--mode train --memory --with-cp --device cuda',
                     'benchmark_backbone.py --arch vitdet_base --shape 1 3 1024 1024 --dtype fp32 fp16',
                     '--arch mvit_tiny', '--arch t2t_14', '--arch small',
                     'stop with one line if there is no GPU or CUDA is absent',
                     f'write {out_dir}/device_check-']:
        assert expected in text, expected
    assert not out_dir.exists() and not venv.exists()
    # --setup-only lists the setup alone; --skip-setup the steps alone
    only = run([LAUNCHER, '--dry-run', '--setup-only'], cwd=tmp_path, env={'VENV': str(venv)}).stdout
    assert '1. setup' in only and 'cuda tests' not in only and 'WHEELHOUSE' not in only
    skip = run([LAUNCHER, '--dry-run', '--skip-setup'], cwd=tmp_path, env={'VENV': str(venv)}).stdout
    assert 'setup_env.sh' not in skip and '1. cuda tests' in skip
    # The check starts before any package is installed: the standard library is all it imports.
    script = TOOLS / 'analysis' / 'device_check.py'
    bare = subprocess.run([sys.executable, '-S', '-I', str(script), '--dry-run'],
                          capture_output=True, text=True, cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert '-m pytest tests -m cuda' in bare.stdout


@pytest.mark.skipif(device_check.gpu_visible(), reason='with a GPU the launcher would run the whole check')
def test_without_a_gpu_the_check_stops_with_one_line(tmp_path):
    out = run([LAUNCHER], cwd=tmp_path, env={'OUT': str(tmp_path / 'out')})
    assert out.returncode == 1
    assert out.stderr.strip() == device_check.NO_GPU and '\n' not in out.stderr.strip()
    assert not (tmp_path / 'out').exists()


# -- the plan and the report ------------------------------------------------------------------------
def test_every_planned_harness_run_is_one_the_harness_accepts(harness, monkeypatch):
    monkeypatch.setattr(harness.torch.cuda, 'is_available', lambda: True)
    benchmarks = [step for step in device_check.plan(device_check.Layout(ROOT / '.venv'))
                  if step.kind == 'benchmark']
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
    # every family of the registry has a run
    families = {'small': 'PVT', 'b2': 'PVTv2', 'vitdet_base': 'ViTDet', 'mvit_tiny': 'MViTv2',
                'mvitv1_b16': 'MViTv1', 't2t_14': 'T2TViT'}
    from test_backbone_contract import registered_backbones
    assert {families[args.arch] for args in parsed.values()} == {c.__name__ for c in registered_backbones()}


def test_report_reads_the_harness_table(harness_output):
    rows = device_check.harness_rows(harness_output)
    assert [row[0] for row in rows] == ['mmpvt', 'timm']
    assert all(len(row) == len(device_check.HARNESS_COLUMNS) and row[-1] == '-' for row in rows)
    assert float(rows[0][3]) == 1.0 and all(float(row[1]) > 0 for row in rows)  # median, time / first
    assert device_check.harness_setting(harness_output).startswith('b0, input 1x3x64x64, infer, cpu; 2 ')


@pytest.fixture
def fake_gpu_machine(tmp_path, monkeypatch):
    """main() on this machine as if it had a GPU: a venv whose python is this one, a stand-in
    CUDA probe, the report and the runs under tmp_path."""
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    (venv / 'bin' / 'python').symlink_to(sys.executable)
    monkeypatch.setenv('VENV', str(venv))
    monkeypatch.setenv('OUT', str(tmp_path / 'out'))
    monkeypatch.setattr(device_check, 'WORK_DIR', tmp_path / 'runs')
    monkeypatch.setattr(device_check, 'MIN_STEP_S', 1)
    monkeypatch.setattr(device_check, 'gpu_visible', lambda: True)
    mmdet_dir = str(Path(importlib.util.find_spec('mmdet').origin).parent)
    monkeypatch.setattr(device_check, 'cuda_info', lambda python: dict(
        available=True, device='a GPU', memory_gib=1.0, count=1, torch='x', cuda='y', cudnn=1, mmcv_cuda='z',
        mmdet_dir=mmdet_dir))
    return tmp_path


def report_of(out_dir: Path) -> str:
    reports = list(out_dir.iterdir())
    assert len(reports) == 1 and re.fullmatch(r'device_check-\d{8}T\d{6}Z\.md', reports[0].name)
    return reports[0].read_text()


def statuses_of(text: str) -> dict[str, str]:
    steps = text.split('## Steps')[1].split('\n## ')[0]
    return {line.split('|')[1].strip(): line.split('|')[3].strip() for line in steps.splitlines()
            if line.startswith('| ') and not line.startswith('| step |')}


def test_main_runs_the_steps_in_their_limits_and_the_budget_and_writes_one_report(
        harness_output, fake_gpu_machine, capsys):
    """Stand-in steps through main(): one passing, one whose tests skipped, a benchmark, one
    that hangs until its limit, one the budget no longer covers."""
    Step = device_check.Step
    table = fake_gpu_machine / 'harness.txt'
    table.write_text(harness_output)
    steps = [
        Step('tests', 'stand-in', ('-c', "print('3 passed, 9 deselected in 1.20s')"), 30, kind='tests'),
        Step('skipping tests', 'stand-in', ('-c', "print('2 skipped in 0.10s')"), 30, kind='tests'),
        Step('bench', 'stand-in harness', ('-c', f'print(open({str(table)!r}).read())'), 30),
        Step('hangs', 'stand-in', ('-c', 'import time; time.sleep(120)'), 60),
        Step('late', 'stand-in', ('-c', "print('never')"), 30),
    ]
    start = time.monotonic()
    assert device_check.main(['--budget', '4', '--skip-setup'], steps=steps) == 1
    assert time.monotonic() - start < 10  # the hanging step was stopped by the budget
    text = report_of(fake_gpu_machine / 'out')
    statuses = statuses_of(text)
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
    written = next((fake_gpu_machine / 'out').iterdir())
    assert printed.rstrip().endswith(f'report (tables and raw log): {written}')
    assert '| bench | mmpvt |' in printed and '| step | what | result | seconds |' in printed


def write_scalars(work_dir: Path, times: list[float], memory: list[int], **final) -> None:
    """mmengine's vis_data/scalars.json for a run logged every DAY_LOG_INTERVAL iterations."""
    vis = work_dir / '20261207_120000' / 'vis_data'
    vis.mkdir(parents=True)
    every = device_check.DAY_LOG_INTERVAL
    lines = [json.dumps(dict(loss=1.0, time=t, data_time=0.01, memory=m, iter=(i + 1) * every, epoch=1,
                             step=(i + 1) * every)) for i, (t, m) in enumerate(zip(times, memory))]
    lines.append(json.dumps({**final, 'step': 1}))  # the validation record: no loss
    (vis / 'scalars.json').write_text('\n'.join(lines) + '\n')


def test_a_users_day_is_reported_beside_what_mmdet_and_the_papers_publish(fake_gpu_machine, monkeypatch):
    """The setup, then stand-ins for the user's day that leave what the real runs leave: the
    report reads seconds per iteration and peak memory from mmengine's logs, the AP from
    test.py's table, mmdet's published memory from its metafile and the papers' AP from
    configs/metafile.yml."""
    runs = fake_gpu_machine / 'runs'
    said = 'echo "[setup] mmcv built in 5 min 3 s (16 jobs): /c/x.whl"; echo "[setup] ready: torch 2.11.0"'
    setup = device_check.Step('setup', 'stand-in', ('-c', said), 30, kind='setup', program='bash')
    write_scalars(runs / 'retinanet_pvt_v2_b0', [0.9, 0.12, 0.10, 0.11], [3000, 3400, 3500, 3300],
                  **{'coco/bbox_mAP': 0.25})
    steps = [
        device_check.Step('retinanet_pvt_v2_b0 train', 'stand-in', ('-c', 'pass'), 30, kind='train',
                          config='retinanet_pvt_v2_b0'),
        device_check.Step('retinanet_pvt_v2_b0 test', 'stand-in',
                          ('-c', "print('| metric | value |\\n|---|---|\\n| coco/bbox_mAP | 0.251 |')"), 30,
                          kind='test', config='retinanet_pvt_v2_b0'),
        device_check.Step('mask_rcnn_pvt_v2_b0 train', 'stand-in', ('-c', 'pass'), 30, kind='train',
                          config='mask_rcnn_pvt_v2_b0'),
    ]
    monkeypatch.setattr(device_check, 'setup_step', lambda wheelhouse: setup)
    assert device_check.main([], steps=steps) == 1  # the Mask R-CNN stand-in logged nothing
    text = report_of(fake_gpu_machine / 'out')
    statuses = statuses_of(text)
    assert statuses['setup'] == 'ok: mmcv built in 5 min 3 s with 16 jobs; [setup] ready: torch 2.11.0'
    assert statuses['retinanet_pvt_v2_b0 train'] == 'ok: 100 iterations'
    assert statuses['retinanet_pvt_v2_b0 test'] == 'ok: 1 metrics'
    assert statuses['mask_rcnn_pvt_v2_b0 train'] == 'failed: no training iteration logged'
    day = text.split("## A user's day")[1].split('\n## ')[0]
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in day.splitlines() if line.startswith('| ') and not line.startswith('| config')}
    retina = rows['retinanet_pvt_v2_b0']
    # the first record (the warm-up) is left out: (0.12 + 0.10 + 0.11) / 3 s, 2 images each
    assert retina[:4] == ['100', '0.110', '18.2', f'{3500 / 1024:.2f}']
    assert retina[4].startswith('7.4 (8x NVIDIA V100 GPUs, fp32')  # mmdet's metafile, as installed
    assert retina[5] == 'bbox 0.251'
    assert retina[6] == 'box AP 37.2'  # configs/metafile.yml
    mask = rows['mask_rcnn_pvt_v2_b0']
    assert mask[:4] == ['-'] * 4 and mask[4] == 'not published' and mask[6] == 'box AP 38.2, mask AP 36.2'


def test_a_failed_setup_leaves_every_step_not_run(fake_gpu_machine, monkeypatch):
    setup = device_check.Step('setup', 'stand-in', ('-c', 'echo "error: no nvcc"; exit 1'), 30, kind='setup',
                              program='bash')
    steps = [device_check.Step('tests', 'stand-in', ('-c', "print('1 passed in 1.0s')"), 30, kind='tests')]
    monkeypatch.setattr(device_check, 'setup_step', lambda wheelhouse: setup)
    assert device_check.main([], steps=steps) == 1
    statuses = statuses_of(report_of(fake_gpu_machine / 'out'))
    assert statuses == {'setup': 'failed: exit status 1: error: no nvcc',
                        'tests': 'not run: the setup failed'}


def test_the_users_day_options_make_a_run_of_the_zoo_config_on_the_synthetic_shapes(tmp_path):
    """The day's --cfg-options on the zoo's configs pass train.py's own checks (what the
    launchers run before starting workers) against the generated data, with the three classes."""
    from mmengine.config import Config, DictAction

    from mmpvt.datasets.synthetic import CLASSES, generate
    assert device_check.SYNTHETIC_CLASSES == CLASSES
    layout = device_check.Layout(tmp_path / 'venv', tmp_path / 'runs')
    generate(layout.data, num_train=2, num_val=2, size=64)
    for step in device_check.day_steps(layout)[1:]:
        if step.kind != 'train':
            continue
        args = list(step.args)
        config, options = args[1], args[args.index('--cfg-options') + 1:]
        done = run([TOOLS / 'train.py', ROOT / config, '--check-only', '--work-dir', tmp_path / 'w',
                    '--cfg-options', *options], cwd=ROOT)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        parser = argparse.ArgumentParser()
        parser.add_argument('--cfg-options', nargs='+', action=DictAction)
        cfg = Config.fromfile(ROOT / config)
        cfg.merge_from_dict(parser.parse_args(['--cfg-options', *options]).cfg_options)
        assert cfg.train_dataloader.dataset.metainfo['classes'] == CLASSES
        assert cfg.model.backbone.init_cfg is None
        assert cfg.train_dataloader.batch_size == 2 and cfg.train_cfg.max_epochs == 1


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
