"""The launchers and analysis tools, run as a user runs them: subprocesses on the CPU.

Every run uses the demo configs on a tiny synthetic dataset (a few 128x128 images) for two
iterations: enough to go through building, training, checkpointing, evaluating and
printing, not to learn anything.
"""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmpvt.cli import LaunchError, check_data, check_file, format_metrics, load_config, parse_metrics
from mmpvt.cli.launch import _replace_sync_bn
from mmpvt.datasets.synthetic import generate

from tooling import DEMO_CONFIGS, TOOLS, free_port
from tooling import run_tool as run

CONFIGS = DEMO_CONFIGS
# An untrained detector scores everything under the default 0.05: keep all boxes so COCO has results.
KEEP_ALL = {
    'retinanet': ['model.test_cfg.score_thr=0.0'],
    'mask_rcnn': ['model.test_cfg.rcnn.score_thr=0.0'],
    'fpn': [],
}
EXPECTED_METRICS = {
    'retinanet': {'coco/bbox_mAP', 'coco/bbox_mAP_50'},
    'mask_rcnn': {'coco/bbox_mAP', 'coco/segm_mAP'},
    'fpn': {'mIoU', 'aAcc', 'mAcc'},
}
# Two iterations of two images, checkpoint at the end, a log line per iteration.
TINY_RUN = ['train_cfg.max_iters=2', 'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2',
            'default_hooks.logger.interval=1', 'train_dataloader.batch_size=2']


@pytest.fixture(scope='module')
def workspace(tmp_path_factory) -> Path:
    """A directory with data/synthetic in place, where the demo configs find it."""
    root = tmp_path_factory.mktemp('tools')
    generate(root / 'data' / 'synthetic', num_train=4, num_val=2, seed=0, size=128)
    return root


@pytest.fixture(scope='module')
def retinanet_run(workspace) -> Path:
    """A finished two-iteration RetinaNet run, shared by the tests that need a checkpoint."""
    work_dir = workspace / 'work_retinanet'
    out = run([TOOLS / 'train.py', CONFIGS['retinanet'], '--work-dir', work_dir, '--cfg-options', *TINY_RUN],
              cwd=workspace)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return work_dir


# -- train, then test, for each kind of model -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('kind', ['retinanet', 'mask_rcnn', 'fpn'])
def test_train_then_test_prints_the_metrics_table(kind, workspace, request):
    if kind == 'retinanet':
        work_dir = request.getfixturevalue('retinanet_run')
    else:
        work_dir = workspace / f'work_{kind}'
        out = run([TOOLS / 'train.py', CONFIGS[kind], '--work-dir', work_dir, '--cfg-options', *TINY_RUN],
                  cwd=workspace)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    checkpoint = work_dir / 'iter_2.pth'
    assert checkpoint.is_file()
    log = next(work_dir.glob('*/*.log')).read_text()
    assert 'Iter(train) [2/2]' in log and 'eta:' in log  # the progress line

    options = ['--cfg-options', *KEEP_ALL[kind]] if KEEP_ALL[kind] else []
    out = run([TOOLS / 'test.py', CONFIGS[kind], checkpoint, '--work-dir', workspace / f'test_{kind}',
               '--out', workspace / f'{kind}.pkl', *options], cwd=workspace)
    out_text = out.stdout + out.stderr
    assert out.returncode == 0, out_text[-3000:]
    metrics = parse_metrics(out.stdout)
    assert EXPECTED_METRICS[kind] <= set(metrics)
    assert all(0 <= metrics[k] <= 100 for k in EXPECTED_METRICS[kind])
    assert (workspace / f'{kind}.pkl').is_file()
    if kind == 'fpn':  # mmseg's own per-class table, with the demo's classes
        assert 'per class results' in out_text and 'triangle' in out_text
    else:  # COCO's summary table
        assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all' in out_text


@pytest.mark.slow
def test_resume_and_show_dir(retinanet_run, workspace):
    """--resume continues from the last checkpoint; --show-dir draws the test images."""
    work_dir = workspace / 'work_resumed'
    shutil.copytree(retinanet_run, work_dir)  # the shared run keeps its iter_2.pth
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_2.pth'))
    out = run([TOOLS / 'train.py', CONFIGS['retinanet'], '--work-dir', work_dir, '--resume',
               '--cfg-options', *TINY_RUN, 'train_cfg.max_iters=3', 'default_hooks.checkpoint.interval=3'],
              cwd=workspace)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'resumed' in (out.stdout + out.stderr).lower()
    assert (work_dir / 'iter_3.pth').is_file()
    show = workspace / 'shown'
    out = run([TOOLS / 'test.py', CONFIGS['retinanet'], work_dir / 'iter_3.pth', '--work-dir',
               workspace / 'test_show', '--show-dir', show, '--cfg-options', *KEEP_ALL['retinanet']],
              cwd=workspace)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list(show.glob('*.jpg')) + list(show.glob('*.png'))) == 2


# -- distributed on CPU processes -----------------------------------------------------------------
# Two CPU processes even on a machine with one GPU (rank 1 would ask for a second one).
CPU_ONLY = {'CUDA_VISIBLE_DEVICES': ''}


@pytest.mark.slow
def test_dist_train_then_dist_test_with_two_cpu_processes(workspace):
    work_dir = workspace / 'work_dist'
    port = free_port()
    out = run([TOOLS / 'dist_train.sh', CONFIGS['retinanet'], 2, '--work-dir', work_dir,
               '--cfg-options', *TINY_RUN, 'train_dataloader.batch_size=1'],
              cwd=workspace, env={'PORT': str(port), **CPU_ONLY})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (work_dir / 'iter_2.pth').is_file()
    log = next(work_dir.glob('*/*.log')).read_text()
    # mmengine logs the world size as the "GPU number", whatever the device.
    assert 'Distributed training: True' in log and 'GPU number: 2' in log and "backend': 'gloo'" in log

    out = run([TOOLS / 'dist_test.sh', CONFIGS['retinanet'], work_dir / 'iter_2.pth', 2,
               '--work-dir', workspace / 'test_dist', '--cfg-options', *KEEP_ALL['retinanet']],
              cwd=workspace, env={'PORT': str(free_port()), **CPU_ONLY})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = parse_metrics(out.stdout)
    assert {'coco/bbox_mAP', 'coco/bbox_mAP_50'} <= set(metrics)
    assert out.stdout.count('| metric | value |') == 1  # printed by rank 0 only


# -- clear errors ---------------------------------------------------------------------------------
def test_missing_config_is_named(tmp_path):
    for tool in (['train.py'], ['test.py', 'x.pth'], ['dist_train.sh', 2]):
        out = run([TOOLS / tool[0], tmp_path / 'nope.py', *tool[1:]], cwd=tmp_path)
        assert out.returncode != 0
        assert f'config file not found: {tmp_path / "nope.py"}' in out.stderr
        assert 'Traceback' not in out.stderr


def test_missing_checkpoint_is_named(workspace, tmp_path):
    out = run([TOOLS / 'test.py', CONFIGS['retinanet'], tmp_path / 'missing.pth'], cwd=workspace)
    assert out.returncode != 0 and 'Traceback' not in out.stderr
    assert f'checkpoint not found: {tmp_path / "missing.pth"}' in out.stderr
    out = run([TOOLS / 'train.py', CONFIGS['retinanet'], '--resume', tmp_path / 'missing.pth'], cwd=workspace)
    assert f'checkpoint to resume from not found: {tmp_path / "missing.pth"}' in out.stderr
    out = run([TOOLS / 'dist_test.sh', CONFIGS['retinanet'], tmp_path / 'missing.pth', 2], cwd=workspace)
    assert out.returncode != 0 and f'checkpoint not found: {tmp_path / "missing.pth"}' in out.stderr


def test_missing_dataset_names_the_path_and_the_layout(tmp_path):
    out = run([TOOLS / 'train.py', CONFIGS['retinanet']], cwd=tmp_path)  # no data/ here
    assert out.returncode != 0 and 'Traceback' not in out.stderr
    assert 'dataset directory not found: data/synthetic/coco/' in out.stderr
    assert 'data/synthetic/coco/annotations/instances_train2017.json' in out.stderr
    assert 'data/synthetic/coco/train2017/' in out.stderr
    assert 'usual layout under data_root: annotations/instances_{train,val}2017.json' in out.stderr
    assert 'python -m mmpvt.datasets.synthetic' in out.stderr


def test_port_in_use_is_named(workspace):
    with socket.socket() as busy:
        busy.bind(('', 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run([TOOLS / 'dist_train.sh', CONFIGS['retinanet'], 2], cwd=workspace, env={'PORT': str(port)})
    assert out.returncode != 0
    assert f'port {port} is in use' in out.stderr and 'PORT=' in out.stderr


def test_check_data_lists_the_expected_layout(tmp_path):
    """In-process: each path the config reads is listed, the missing ones marked."""
    cfg = load_config(CONFIGS['fpn'], {'train_dataloader.dataset.data_root': str(tmp_path / 'ade'),
                                       'val_dataloader.dataset.data_root': str(tmp_path / 'ade')})
    with pytest.raises(LaunchError) as info:
        check_data(cfg, ('train', 'val'))
    message = str(info.value)
    assert f'dataset directory not found: {tmp_path / "ade"}' in message
    assert f'{tmp_path / "ade" / "images" / "training"}/   <- missing' in message
    assert f'{tmp_path / "ade" / "annotations" / "training"}/   <- missing' in message
    (tmp_path / 'ade' / 'images' / 'training').mkdir(parents=True)
    with pytest.raises(LaunchError, match='dataset path not found: .*annotations/training'):
        check_data(cfg, ('train',))


def test_check_file_and_metrics_table(tmp_path):
    with pytest.raises(LaunchError, match='checkpoint not found: .*a.pth'):
        check_file(tmp_path / 'a.pth', 'checkpoint')
    with pytest.raises(LaunchError, match='is a directory'):
        check_file(tmp_path, 'checkpoint')
    text = 'log lines\n' + format_metrics({'coco/bbox_mAP': 0.51234, 'mIoU': 87.5, 'note': 'x'}) + '\ndone'
    assert parse_metrics(text) == {'coco/bbox_mAP': 0.5123, 'mIoU': 87.5}


def test_cpu_processes_use_bn_instead_of_sync_bn():
    model = dict(backbone=dict(norm_cfg=dict(type='SyncBN')), heads=[dict(norm_cfg=dict(type='SyncBN'))])
    assert _replace_sync_bn(model) == 2
    assert model['backbone']['norm_cfg']['type'] == model['heads'][0]['norm_cfg']['type'] == 'BN'


@pytest.mark.slow
def test_amp_without_cuda_uses_bfloat16_on_the_cpu(workspace):
    import torch

    from mmpvt.cli import cpu_has_fast_bf16
    if torch.cuda.is_available() or not cpu_has_fast_bf16():
        pytest.skip('needs a CPU-only machine with bfloat16 units')
    out = run([TOOLS / 'train.py', CONFIGS['retinanet'], '--amp', '--work-dir', workspace / 'work_amp',
               '--cfg-options', *TINY_RUN, 'train_cfg.val_interval=100'], cwd=workspace)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'bfloat16 on the CPU' in out.stdout
    assert "type='CPUAmpOptimWrapper'" in next((workspace / 'work_amp').glob('*/*.log')).read_text()


def test_amp_is_refused_where_it_cannot_run(monkeypatch):
    import torch

    from mmpvt.cli import enable_amp, load_config
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr('mmpvt.engine.amp.torch.cpu._is_amx_tile_supported', lambda: False, raising=False)
    monkeypatch.setattr('mmpvt.engine.amp.torch.cpu._is_avx512_bf16_supported', lambda: False, raising=False)
    with pytest.raises(LaunchError, match='--amp needs a CUDA device or a CPU with bfloat16 units'):
        enable_amp(load_config(CONFIGS['retinanet']))
    # checked for a Slurm job on the node that submits it: the job's own nodes decide
    cfg = load_config(CONFIGS['retinanet'])
    enable_amp(cfg, here=False)
    assert cfg.optim_wrapper.get('type', 'OptimWrapper') == 'OptimWrapper'


# -- analysis tools -------------------------------------------------------------------------------
@pytest.mark.slow
def test_benchmark_reports_speed(retinanet_run, workspace):
    out = run([TOOLS / 'analysis' / 'benchmark.py', CONFIGS['retinanet'], retinanet_run / 'iter_2.pth',
               '--shape', 128, 128, '--iters', 2, '--warmup', 1], cwd=workspace)
    assert out.returncode == 0, out.stderr[-3000:]
    speed = float(out.stdout.split('images/s:')[1].split()[0])
    assert speed > 0 and 'latency per batch (ms): median' in out.stdout


@pytest.mark.slow
def test_plot_curves_and_predictions_write_pngs(retinanet_run, workspace):
    import cv2
    out_png = workspace / 'curves.png'
    out = run([TOOLS / 'analysis' / 'plot_curves.py', retinanet_run, '--keys', 'loss', 'coco/bbox_mAP',
               '--out', out_png], cwd=workspace)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert cv2.imread(str(out_png)).shape[2] == 3
    out = run([TOOLS / 'analysis' / 'plot_curves.py', retinanet_run, '--keys', 'nothing'], cwd=workspace)
    assert out.returncode != 0 and 'logged keys' in out.stderr

    pred_png = workspace / 'predictions.png'
    out = run([TOOLS / 'analysis' / 'show_predictions.py', CONFIGS['retinanet'], retinanet_run / 'iter_2.pth',
               '--num', 2, '--out', pred_png, '--score-thr', 0.0], cwd=workspace)
    assert out.returncode == 0, out.stderr[-3000:]
    assert cv2.imread(str(pred_png)).shape == (128, 256, 3)


def test_slurm_scripts_pass_the_job_to_srun(workspace, tmp_path):
    """slurm_train.sh / slurm_test.sh, run against a stand-in srun that records its arguments."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    record = tmp_path / 'srun_args'
    (bin_dir / 'srun').write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / 'srun').chmod(0o755)
    env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'GPUS': '16', 'SRUN_ARGS': '--time=1:00:00 --exclusive'}
    out = run([TOOLS / 'slurm_train.sh', 'part', 'job', CONFIGS['retinanet'], 'work', '--amp'], cwd=workspace,
              env=env)
    assert out.returncode == 0, out.stderr
    args = record.read_text().splitlines()
    assert args[:2] == ['-p', 'part'] and '--job-name=job' in args
    expected = {'--ntasks=16', '--ntasks-per-node=8', '--gres=gpu:8', '--time=1:00:00', '--exclusive'}
    assert expected <= set(args)
    assert args[-5:] == [str(TOOLS / 'train.py'), str(CONFIGS['retinanet']), '--work-dir=work', '--amp',
                         '--launcher=slurm']

    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    out = run([TOOLS / 'slurm_test.sh', 'part', 'job', CONFIGS['retinanet'], checkpoint], cwd=workspace,
              env={**env, 'GPUS': '2'})
    assert out.returncode == 0, out.stderr
    args = record.read_text().splitlines()
    assert {'--ntasks=2', '--ntasks-per-node=2', '--gres=gpu:2'} <= set(args)
    assert args[-4:] == [str(TOOLS / 'test.py'), str(CONFIGS['retinanet']), str(checkpoint),
                         '--launcher=slurm']
    out = run([TOOLS / 'slurm_test.sh', 'part', 'job', CONFIGS['retinanet'], tmp_path / 'none.pth'],
              cwd=workspace, env=env)
    assert out.returncode != 0 and f'checkpoint not found: {tmp_path / "none.pth"}' in out.stderr


PAGE_FAULTS_OF_A_REUSED_BLOCK = '''
import resource, sys, torch
from mmpvt.cli import keep_freed_memory
kept = sys.argv[1] == "keep" and keep_freed_memory()
faults = []
for _ in range(40):  # a 64 MiB block, above glibc's largest mmap threshold, written then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 18).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
'''


@pytest.mark.skipif(os.confstr('CS_GNU_LIBC_VERSION') is None, reason='glibc only')
@pytest.mark.parametrize('mode', ['keep', 'default', 'opted-out'])
def test_keep_freed_memory_reuses_a_freed_block_without_page_faults(mode):
    """A 64 MiB block allocated and freed 40 times: faulted in page by page every time by default
    (about 16k faults), served by freed memory with keep_freed_memory() once the heap has reached
    its high-water mark. That takes a varying number of rounds (2 to 9 in 60 runs): each aligned
    allocation leaves a small remainder beside its block, glibc's thread cache keeps it, and the
    freed block cannot merge into the top of the heap until that cache's bin is full. So the
    steady state is checked, the last 20 rounds, not a fixed early round."""
    env = {**os.environ, 'MMPVT_KEEP_FREED_MEMORY': '0' if mode == 'opted-out' else '1'}
    out = subprocess.run([sys.executable, '-c', PAGE_FAULTS_OF_A_REUSED_BLOCK,
                          'default' if mode == 'default' else 'keep'],
                         capture_output=True, text=True, check=True, env=env).stdout.split()
    kept, steady = out[0] == 'True', [int(f) for f in out[-20:]]
    assert kept == (mode == 'keep')
    assert all(f < 1000 for f in steady) if kept else all(f > 10000 for f in steady), steady


def test_cpu_runs_keep_freed_memory(monkeypatch, tmp_path):
    """train.py and test.py load their config through load_run_config, which sets it on CPUs."""
    import argparse

    import torch

    from mmpvt.cli import launch
    calls = []
    monkeypatch.setattr(launch, 'keep_freed_memory', lambda: calls.append(1) or True)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    args = argparse.Namespace(config=str(CONFIGS['retinanet']), cfg_options=None, launcher='none',
                              work_dir=str(tmp_path))
    launch.load_run_config(args)
    assert calls == [1]


CONFIG_SAVED_WITH_CPU_AMP = '''
custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)
default_scope = 'mmdet'
optim_wrapper = dict(type='CPUAmpOptimWrapper', optimizer=dict(type='AdamW', lr=1e-4))
'''
REBUILD = '''
import sys, torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
cfg = Config.fromfile(sys.argv[1])  # imports custom_imports, as mmdet's tools/train.py does
init_default_scope(cfg.default_scope)
wrapper = build_optim_wrapper(torch.nn.Linear(2, 2), cfg.optim_wrapper)
assert 'mmpvt.cli' not in sys.modules  # what the tools import; mmdet's train.py does not
print(type(wrapper).__name__, wrapper.cast_dtype)
'''


def test_a_config_saved_with_cpu_amp_rebuilds_with_only_custom_imports(tmp_path):
    """tools/train.py --amp on a CPU writes type='CPUAmpOptimWrapper' into the run's config; a
    process that only imports mmpvt (custom_imports), as mmdet's own tools/train.py, rebuilds it."""
    saved = tmp_path / 'saved.py'
    saved.write_text(CONFIG_SAVED_WITH_CPU_AMP)
    done = subprocess.run([sys.executable, '-c', REBUILD, str(saved)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ['CPUAmpOptimWrapper', 'torch.bfloat16']
