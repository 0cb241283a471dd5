"""Checks a GPU machine in one command: the setup, the ``cuda`` tests, a user's day, the harness.

    bash tools/device_check.sh [--wheelhouse DIR] [--setup-only | --skip-setup] [--dry-run]
                               [--budget SECONDS] [--repeat N] [--warmup N]

In order:

1. **The setup** (``tools/setup_env.sh``; skipped with ``--skip-setup``): the venv ``$VENV``
   (default ``.venv``) made by ``$PYTHON`` (default ``python3``), reusing that interpreter's
   CUDA torch, with mmcv's CUDA ops compiled for the visible GPU's architecture only, on every
   core. With ``--wheelhouse DIR`` (made by ``tools/setup_env.sh --download``) it installs from
   DIR alone: GPU machines often have no package index. The report gives the build time.
2. A machine without a GPU (or whose torch sees none) stops with one line.
3. ``pytest tests -m cuda``: every test marked ``cuda`` (tests/test_cuda.py).
4. **A user's day** on one GPU: ``tools/dist_train.sh`` with the zoo's RetinaNet-PVTv2-b0 and
   Mask R-CNN-PVTv2-b0 configs as they are (the 1333x800 pipeline, 2 images per GPU, ``--amp``)
   but for the data (the synthetic shapes in the COCO layout, ``--cfg-options``), one epoch
   (``DAY_TRAIN_IMAGES / 2`` iterations), then ``tools/dist_test.sh`` with COCO's table. The
   report gives seconds per iteration, images/s and peak memory beside what mmdet publishes
   for the same configs (its metafile, read from the installed mmdet) and the papers' AP.
5. ``tools/analysis/benchmark_backbone.py --device cuda`` for every family: PVT, PVTv2 (also
   its training step, with and without ``with_cp``), ViTDet, MViTv2 and T2T-ViT against their
   peers in the same run.
6. One Markdown file under ``$OUT`` (default ``work_dirs/device_check/``): the steps, the
   user's day, every measurement, then the raw log. The tables are printed at the end.

Everything shares one time budget (``--budget``, default 9 minutes): each step is stopped at
its own limit or when the budget runs out, and a step the budget no longer covers is listed as
not run, so the report is always written. Compiling mmcv's CUDA ops takes most of a budget
(about 4,300 CPU-seconds for one architecture, its slowest file 250 s alone), so on a fresh
machine ``--setup-only`` and then ``--skip-setup`` split the check into two commands on the
same machine. ``--dry-run`` prints every command and runs nothing. Exit status: 0 when every
step passed, 1 otherwise, 2 for bad arguments.

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
DEFAULT_OUT = 'work_dirs/device_check'
# The user's-day runs and their data: checkpoints and images, kept out of $OUT (the report's).
WORK_DIR = ROOT / 'work_dirs' / 'device_check_runs'
# The whole check: the 9 minutes on one GPU.
DEFAULT_BUDGET_S = 540
# The setup's own limit: mmcv's CUDA ops for one architecture on 16 cores (about 4,300
# CPU-seconds, the slowest file 250 s), the rest of the stack from the wheelhouse.
SETUP_LIMIT_S = 480
# A step is not started with less than this left of the budget: it could not finish.
MIN_STEP_S = 15
# The harness columns, in its table's order (tools/analysis/benchmark_backbone.py run()).
HARNESS_COLUMNS = ('implementation', 'median (s)', 'min - max (s)', 'time / first row', 'GFLOP/s',
                   '% of GEMM ceiling', 'peak memory (MB)')

# -- the user's day ---------------------------------------------------------------------------------
# mmpvt config -> (its heads' class counts, mmdet's model of the same architecture in
# mmdet/.mim/configs/pvt/metafile.yml, whose training memory mmdet publishes; None: no such model)
DAY_CONFIGS = {
    'retinanet_pvt_v2_b0': (('model.bbox_head.num_classes',), 'retinanet_pvtv2-b0_fpn_1x_coco'),
    'mask_rcnn_pvt_v2_b0': (('model.roi_head.bbox_head.num_classes', 'model.roi_head.mask_head.num_classes'),
                            None),
}
# mmpvt.datasets.synthetic.CLASSES (tests/test_device_check.py holds them equal).
SYNTHETIC_CLASSES = ('circle', 'rectangle', 'triangle')
DAY_TRAIN_IMAGES = 600   # one epoch: 300 iterations of 2 images
DAY_VAL_IMAGES = 50
DAY_LOG_INTERVAL = 25

# Run by the interpreter the steps use: whether it sees a GPU, and what it runs on.
CUDA_PROBE = '''
import json, os, torch
info = dict(available=torch.cuda.is_available(), torch=torch.__version__, cuda=torch.version.cuda)
try:
    import mmdet
    info['mmdet_dir'] = os.path.dirname(mmdet.__file__)
except Exception:
    info['mmdet_dir'] = None
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
    """One thing the check runs, in the repository root: ``args`` after the venv's interpreter
    (``program='python'``) or after ``bash``.

    ``limit_s`` is the most it may take (the remaining budget may cut it shorter). ``kind``
    says how its output is judged: 'tests' (pytest's summary, nothing skipped), 'benchmark'
    (the harness' table), 'train' / 'test' (a user's-day run), 'setup' or 'command' (exit status).
    """

    name: str
    what: str
    args: tuple[str, ...]
    limit_s: int
    kind: str = 'benchmark'
    program: str = 'python'
    env: tuple[tuple[str, str], ...] = ()
    config: str = ''  # the user's-day config a 'train' or 'test' step runs

    def argv(self, python: str) -> list[str]:
        return [python if self.program == 'python' else 'bash', *self.args]


@dataclass
class Result:
    """What became of a step: ``status`` is ok, failed, incomplete, timed out or not run."""

    step: Step
    status: str
    detail: str
    seconds: float
    command: str = ''
    output: str = ''


@dataclass
class Layout:
    """Where a check keeps its work: the venv, the synthetic data and the user's-day runs."""

    venv: Path
    work: Path = WORK_DIR

    @property
    def python(self) -> str:
        return str(self.venv / 'bin' / 'python')

    @property
    def data(self) -> Path:
        return self.work / 'data'

    def run_dir(self, config: str) -> Path:
        return self.work / config


def setup_step(wheelhouse: str | None) -> Step:
    source = (f'everything from the wheelhouse {wheelhouse}' if wheelhouse
              else 'the rest from the package index')
    what = f'the venv: mmcv with CUDA ops for the visible GPU, {source}'
    return Step('setup', what, ('tools/setup_env.sh',), SETUP_LIMIT_S, kind='setup', program='bash',
                env=(('WHEELHOUSE', str(Path(wheelhouse).absolute())),) if wheelhouse else ())


def synthetic_options(config: str, data: Path) -> list[str]:
    """The ``--cfg-options`` that point a zoo config at the synthetic shapes (COCO layout):
    the data, its three classes, no pretrained download."""
    root = f'{data}/coco/'
    classes = '(' + ','.join(SYNTHETIC_CLASSES) + ')'
    heads, _ = DAY_CONFIGS[config]
    return ['model.backbone.init_cfg=None', *[f'{key}={len(SYNTHETIC_CLASSES)}' for key in heads],
            *[f'{split}_dataloader.dataset.data_root={root}' for split in ('train', 'val', 'test')],
            *[f'{split}_dataloader.dataset.metainfo.classes={classes}' for split in ('train', 'val', 'test')],
            *[f'{split}_evaluator.ann_file={root}annotations/instances_val2017.json'
              for split in ('val', 'test')]]


def day_steps(layout: Layout) -> list[Step]:
    """The synthetic data, then each DAY_CONFIGS config trained and tested as a user does."""
    steps = [Step('synthetic data', f'{DAY_TRAIN_IMAGES} train and {DAY_VAL_IMAGES} val images of the shapes '
                  '(COCO layout)', ('-m', 'mmpvt.datasets.synthetic', str(layout.data), '--num-train',
                                    str(DAY_TRAIN_IMAGES), '--num-val', str(DAY_VAL_IMAGES), '--size', '256'),
                  60, kind='command')]
    for config in DAY_CONFIGS:
        work = layout.run_dir(config)
        options = synthetic_options(config, layout.data)
        schedule = ['train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                    'default_hooks.checkpoint.interval=1',
                    f'default_hooks.logger.interval={DAY_LOG_INTERVAL}']
        steps += [
            Step(f'{config} train', f'tools/dist_train.sh on 1 GPU, --amp, 2 images per GPU at 1333x800, one '
                 f'epoch ({DAY_TRAIN_IMAGES // 2} iterations)',
                 ('tools/dist_train.sh', f'configs/{config}.py', '1', '--amp', '--work-dir', str(work),
                  '--cfg-options', *options, *schedule), 180, kind='train', program='bash', config=config),
            Step(f'{config} test', 'tools/dist_test.sh on 1 GPU: COCO\'s table',
                 ('tools/dist_test.sh', f'configs/{config}.py', str(work / 'epoch_1.pth'), '1', '--work-dir',
                  str(work / 'test'), '--cfg-options', *options), 90, kind='test', program='bash',
                 config=config),
        ]
    return steps


def plan(layout: Layout, repeat: int = 20, warmup: int = 5) -> list[Step]:
    """The steps after the setup, in the order they run: the tests, the user's day, the harness."""
    timing = ('--device', 'cuda', '--repeat', str(repeat), '--warmup', str(warmup))
    large = ('--shape', '1', '3', '800', '1344', '--dtype', 'fp32', 'fp16')
    train = ('--shape', '2', '3', '512', '512', '--mode', 'train', '--memory')
    vit = ('--arch', 'vitdet_base', '--shape', '1', '3', '1024', '1024')
    return [
        Step('cuda tests', 'the tests marked cuda: every backbone family on CUDA against the CPU '
             '(fp32 forward and backward), fp16/bf16 autocast, with_cp, channels-last; mmcv\'s CUDA ops; '
             'RetinaNet and Mask R-CNN trained 20 iterations with --amp, then tested; dist_train.sh on NCCL',
             ('-m', 'pytest', 'tests', '-m', 'cuda', '-q', '-rs', '-p', 'no:cacheprovider'), 240,
             kind='tests'),
        *day_steps(layout),
        Step('PVTv2-b2 inference', 'fp32 and fp16 autocast at 1x3x800x1344; mmpvt, mmdet, timm',
             (HARNESS, '--arch', 'b2', *large, *timing), 90),
        Step('PVTv2-b2 training step', 'forward + backward at 2x3x512x512, fp32, peak memory; '
             'mmpvt, mmdet, timm', (HARNESS, '--arch', 'b2', *train, *timing), 120),
        Step('PVTv2-b2 training step, with_cp', 'the same with activation checkpointing (mmdet has '
             'none): peak memory; mmpvt, timm', (HARNESS, '--arch', 'b2', *train, '--with-cp', *timing), 90),
        Step('PVT-Small inference', 'fp32 and fp16 autocast at 1x3x800x1344; mmpvt, mmdet',
             (HARNESS, '--arch', 'small', *large, *timing), 90),
        Step('ViTDet-B inference', 'fp32 and fp16 autocast at 1x3x1024x1024; mmpvt, timm\'s SAM encoder',
             (HARNESS, *vit, '--dtype', 'fp32', 'fp16', *timing), 90),
        Step('ViTDet-B training step', 'forward + backward at 1x3x1024x1024, fp32, peak memory; '
             'mmpvt, timm\'s SAM encoder', (HARNESS, *vit, '--mode', 'train', '--memory', *timing), 120),
        Step('MViTv2-T inference', 'fp32 and fp16 autocast at 1x3x800x1344; mmpvt, detectron2-style blocks',
             (HARNESS, '--arch', 'mvit_tiny', *large, *timing), 90),
        Step('MViTv2-T training step', 'forward + backward at 2x3x512x512, fp32, peak memory; mmpvt, '
             'detectron2-style blocks', (HARNESS, '--arch', 'mvit_tiny', *train, *timing), 120),
        Step('MViT-B-16 (v1) inference', 'fp32 and fp16 autocast at 1x3x800x1344; mmpvt, torchvision\'s '
             'MViT as the 2-D v1 model', (HARNESS, '--arch', 'mvitv1_b16', *large, *timing), 90),
        Step('T2T-ViT-14 inference', 'fp32 and fp16 autocast at 1x3x800x1344; mmpvt, the authors\' modules',
             (HARNESS, '--arch', 't2t_14', *large, *timing), 90),
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


def metric_table(output: str) -> dict[str, float]:
    """tools/test.py's ``| metric | value |`` table."""
    found = {}
    for m in re.finditer(r'^\| ([\w/.-]+) \| (-?[\d.]+(?:e-?\d+)?) \|$', output, re.M):
        found[m[1]] = float(m[2])
    return found


def training_records(work_dir: Path) -> list[dict]:
    """The logged training iterations of a run (mmengine's vis_data/scalars.json): each with
    ``iter``, ``time`` (seconds per iteration, averaged since the last record) and, on CUDA,
    ``memory`` (the peak allocated since the last record, MB)."""
    records = []
    for path in sorted(work_dir.glob('*/vis_data/scalars.json')):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if 'loss' in record and 'time' in record:
                records.append(record)
    return records


def setup_build_time(output: str) -> str:
    """What the setup said of mmcv's build: its time, or that a built wheel was reused."""
    built = re.search(r'mmcv built in (\d+ min \d+ s) \((\d+) jobs\)', output)
    if built:
        return f'mmcv built in {built[1]} with {built[2]} jobs'
    if 'mmcv 2.1.0: installing' in output:
        return 'mmcv installed from the cache'
    return 'mmcv already installed'


# -- running ----------------------------------------------------------------------------------------
def judge(step: Step, code: int, output: str, layout: Layout) -> tuple[str, str]:
    """A finished step's status and one line of detail."""
    summaries = {'benchmark': harness_setting, 'tests': pytest_summary,
                 'setup': lambda out: (out.strip().splitlines() or [''])[-1]}
    detail = summaries[step.kind](output) if step.kind in summaries else ''
    if code != 0:
        return 'failed', f'exit status {code}' + (f': {detail}' if detail else '')
    if step.kind == 'benchmark' and not harness_rows(output):
        return 'failed', 'no timing table in its output'
    if step.kind == 'tests' and (not detail or 'skipped' in detail or 'passed' not in detail):
        return 'incomplete', detail  # a test that did not run on the GPU checked nothing
    if step.kind == 'train':
        records = training_records(layout.run_dir(step.config))
        if not records:
            return 'failed', 'no training iteration logged'
        return 'ok', f'{records[-1]["iter"]} iterations'
    if step.kind == 'test':
        metrics = metric_table(output)
        return ('ok', f'{len(metrics)} metrics') if metrics else ('failed', 'no | metric | value | table')
    if step.kind == 'setup':
        return 'ok', f'{setup_build_time(output)}; {detail}'
    return 'ok', detail


def run_step(python: str, step: Step, deadline: float, layout: Layout,
             echo: Callable[[str], None] = print) -> Result:
    """Runs ``step``, its output shown as it comes, stopped at its limit or at ``deadline``
    (time.monotonic), whichever comes first."""
    argv = step.argv(python)
    command = ' '.join([*(f'{k}={shlex.quote(v)}' for k, v in step.env), shlex.join(argv)])
    left = deadline - time.monotonic()
    if left < MIN_STEP_S:
        return Result(step, 'not run', f'the budget is spent ({max(left, 0):.0f} s left)', 0., command)
    limit = min(step.limit_s, left)
    echo(f'\n==> [device check] {step.name} (at most {limit:.0f} s)\n$ {command}')
    start = time.monotonic()
    # A session of its own, so that a stop also ends what it started (pytest's tools, the
    # harness' memory probes, torchrun's workers, the compilers).
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', **dict(step.env)}
    if step.kind != 'setup':  # the launchers run the venv's interpreter; the setup's PYTHON makes the venv
        env['PYTHON'] = python
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors='replace', start_new_session=True, env=env)
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
    if stopped.is_set():
        status, detail = 'timed out', f'stopped after {limit:.0f} s'
    else:
        status, detail = judge(step, code, output, layout)
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
        sys.exit(f'error: {python} cannot import torch ({last}); {PROG} without --skip-setup sets it up')
    return json.loads(done.stdout.strip().splitlines()[-1])


def no_cuda_message(python: str, info: dict) -> str:
    """The one line a machine whose torch sees no GPU gets."""
    return (f'error: no CUDA device: torch.cuda.is_available() is False for {python} (torch {info["torch"]}, '
            f'built for CUDA {info["cuda"] or "none"}); {PROG} measures a GPU machine '
            '(--dry-run lists what it would run)')


NO_GPU = (f'error: no NVIDIA GPU on this machine (nvidia-smi lists none, no /dev/nvidia*); {PROG} measures '
          'a GPU machine (--dry-run lists what it would run; tools/setup_env.sh --plan says what a setup '
          'would do)')


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
        if r.step.kind == 'benchmark':
            lines += [f'| {r.step.name} | ' + ' | '.join(row) + ' |' for row in harness_rows(r.output)]
    return '\n'.join(lines)


def mmdet_published(mmdet_dir: str | None, name: str | None) -> dict[str, str]:
    """What mmdet's metafile (mmdet/.mim/configs/pvt/metafile.yml) publishes for model ``name``:
    its training memory, resources and box AP, as written there."""
    if not (mmdet_dir and name):
        return {}
    path = Path(mmdet_dir) / '.mim' / 'configs' / 'pvt' / 'metafile.yml'
    if not path.is_file():
        return {}
    blocks = re.split(r'\n\s*- Name: ', path.read_text())
    block = next((b for b in blocks if b.split('\n', 1)[0].strip() == name), None)
    if block is None:
        return {}
    found = {}
    for key, pattern in (('memory', r'Training Memory \(GB\): ([\d.]+)'),
                         ('resources', r'Training Resources: (.+)'), ('box AP', r'box AP: ([\d.]+)')):
        if m := re.search(pattern, block):
            found[key] = m[1].strip()
    return found


def paper_published(config: str) -> dict[str, str]:
    """The papers' COCO results for ``config`` as configs/metafile.yml records them."""
    text = (ROOT / 'configs' / 'metafile.yml').read_text()
    blocks = re.split(r'\n- Name: ', text)
    block = next((b for b in blocks if b.split('\n', 1)[0].strip() == config), '')
    # the paper's numbers are the model's Results; Metadata's Weights Results are trained weights'
    results = block.split('\n  Results:\n', 1)[-1] if '\n  Results:\n' in block else ''
    return {key: m[1] for key in ('box AP', 'mask AP') if (m := re.search(rf'{key}: ([\d.]+)', results))}


def day_table(results: Sequence[Result], layout: Layout, mmdet_dir: str | None) -> str:
    """Per config of the user's day: what the run measured beside what is published."""
    lines = ['| config | iterations | s / iteration | images / s | peak memory (GB) | mmdet\'s published '
             'memory (GB) | measured AP (synthetic shapes) | published AP (COCO, 12 epochs) |',
             '|---|---|---|---|---|---|---|---|']
    tests = {r.step.config: r for r in results if r.step.kind == 'test'}
    for config, (_, mmdet_name) in DAY_CONFIGS.items():
        records = training_records(layout.run_dir(config))
        steady = records[1:] or records  # the first record holds the warm-up (cudnn's search, allocations)
        if steady:
            per_iter = sum(r['time'] for r in steady) / len(steady)
            timing = f'{per_iter:.3f}', f'{2 / per_iter:.1f}'
            memory = max((r.get('memory', 0) for r in records), default=0) / 1024
            measured = [records[-1]['iter'], *timing, f'{memory:.2f}']
        else:
            measured = ['-'] * 4
        mmdet = mmdet_published(mmdet_dir, mmdet_name)
        mmdet_memory = (f'{mmdet["memory"]} ({mmdet.get("resources", "")}, fp32, 2 images per GPU)'
                        if 'memory' in mmdet else 'not published')
        test = tests.get(config)
        metrics = metric_table(test.output) if test else {}
        ap = ', '.join(f'{key.split("/")[1].split("_")[0]} {value:.3f}' for key, value in metrics.items()
                       if key in ('coco/bbox_mAP', 'coco/segm_mAP')) or '-'
        paper = paper_published(config)
        published = ', '.join(f'{k} {v}' for k, v in paper.items()) or 'not published'
        cells = [*map(str, measured), mmdet_memory, ap, published]
        lines.append(f'| {config} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def report(header: str, results: Sequence[Result], layout: Layout, mmdet_dir: str | None) -> tuple[str, str]:
    """The report file's text and the part printed at the end (its tables)."""
    settings = [f'- {r.step.name}: {harness_setting(r.output)}' for r in results
                if r.step.kind == 'benchmark' and harness_setting(r.output)]
    tables = ['## Steps', '', steps_table(results), '']
    if any(r.step.kind == 'train' for r in results):
        tables += ['## A user\'s day (tools/dist_train.sh, tools/dist_test.sh; one GPU)', '',
                   day_table(results, layout, mmdet_dir), '',
                   'Seconds per iteration: the mean of mmengine\'s logged `time` after the first '
                   f'{DAY_LOG_INTERVAL} iterations; peak memory: the largest `memory` mmengine logged '
                   '(torch.cuda.max_memory_allocated, as mmdet measures its published figure). The synthetic '
                   'images are square: the pipeline resizes them to 800x800 where COCO\'s images become '
                   'about 1066x800.', '']
    if any(r.step.kind == 'benchmark' for r in results):
        tables += ['## Measurements (tools/analysis/benchmark_backbone.py --device cuda)', '',
                   measurements_table(results), '', *settings]
    tables_text = '\n'.join(tables)
    raw = []
    for r in results:
        ran = r.command and r.status != 'not run'
        raw += [f'==> {r.step.name}: {r.status}', *([f'$ {r.command}'] if ran else []), r.output]
    # Four backticks: the raw log may hold three.
    text = '\n'.join([header, '', tables_text, '', '## Raw log', '', '````text', *raw, '````', ''])
    return text, tables_text


def describe(layout: Layout, setup: Step | None, steps: Sequence[Step], budget: float, out_dir: Path) -> str:
    """The dry run's listing: every command and what it measures."""
    lines = [f'{PROG} --dry-run: nothing runs. A run would:']
    number = 0
    if setup is not None:
        number += 1
        base = os.environ.get('PYTHON') or 'python3'
        command = ' '.join([*(f'{k}={shlex.quote(v)}' for k, v in setup.env), shlex.join(setup.argv(''))])
        lines += [f'  {number}. {setup.name} (at most {setup.limit_s} s): {setup.what}; {layout.venv} made '
                  f'by {base}', f'     $ {command}']
    lines.append('  stop with one line if there is no GPU or CUDA is absent')
    if steps:
        lines.append(f'  run these steps with {layout.python}, all within {budget:.0f} s (each at most its '
                     'limit):')
    for step in steps:
        number += 1
        lines += [f'  {number}. {step.name} (at most {step.limit_s} s): {step.what}',
                  f'     $ {shlex.join(step.argv(layout.python))}']
    tables = ', the user\'s day, the measurements' if steps else ''
    lines.append(f'  write {out_dir}/device_check-<UTC time>.md: the table of the steps{tables}, the raw '
                 'log; print the tables')
    return '\n'.join(lines)


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
        prog=PROG, description='Checks a GPU machine: the setup, the cuda tests, a user\'s day with the '
        'zoo\'s detectors, the backbone harness on CUDA; writes one Markdown report under $OUT (default '
        'work_dirs/device_check/).')
    parser.add_argument('--dry-run', action='store_true',
                        help='list every command and what it measures; run nothing')
    parser.add_argument('--wheelhouse', metavar='DIR', help='set up from DIR alone (tools/setup_env.sh '
                        '--download made it), with no package index')
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--setup-only', action='store_true', help='set up, report, and stop')
    group.add_argument('--skip-setup', action='store_true', help='use the venv as it is')
    parser.add_argument('--budget', type=_count(MIN_STEP_S), default=DEFAULT_BUDGET_S, metavar='SECONDS',
                        help=f'time for everything this command runs (default {DEFAULT_BUDGET_S})')
    parser.add_argument('--repeat', type=_count(1), default=20, help='timed runs per implementation (20)')
    parser.add_argument('--warmup', type=_count(0), default=5, help='untimed runs first (5)')
    args = parser.parse_args(argv)
    if args.wheelhouse and args.skip_setup:
        parser.error('--wheelhouse goes with a setup: drop --skip-setup')
    if args.wheelhouse and not Path(args.wheelhouse, 'wheelhouse.json').is_file():
        parser.error(f'--wheelhouse {args.wheelhouse}: no wheelhouse.json there (tools/setup_env.sh '
                     '--download DIR makes one)')
    return args


def main(argv: Sequence[str] | None = None, steps: Sequence[Step] | None = None) -> int:
    """Runs the check (``steps`` replaces the plan after the setup, for tests); returns the exit status."""
    args = parse_args(argv)
    out_dir = Path(os.environ.get('OUT') or ROOT / DEFAULT_OUT)
    layout = Layout(Path(os.environ.get('VENV') or ROOT / '.venv').absolute(), WORK_DIR)
    setup = None if args.skip_setup else setup_step(args.wheelhouse)
    if steps is None:
        steps = [] if args.setup_only else plan(layout, args.repeat, args.warmup)
    if args.dry_run:
        print(describe(layout, setup, steps, args.budget, out_dir))
        return 0
    if steps and not gpu_visible():
        sys.exit(NO_GPU)
    if setup is None and not Path(layout.python).exists():
        sys.exit(f'error: --skip-setup, but there is no venv at {layout.venv} (run {PROG} --setup-only '
                 'first)')

    started = datetime.now(timezone.utc)
    deadline = time.monotonic() + args.budget
    results = []
    if setup is not None:
        results.append(run_step(layout.python, setup, deadline, layout))
    set_up = setup is None or results[0].status == 'ok'
    info = cuda_info(layout.python) if set_up else None
    if steps and info is not None and not info['available']:
        sys.exit(no_cuda_message(layout.python, info))
    for step in steps:
        results.append(run_step(layout.python, step, deadline, layout) if set_up
                       else Result(step, 'not run', 'the setup failed', 0.))
    gpu = (f'{info["device"]} ({info["memory_gib"]} GiB; {info["count"]} visible), torch {info["torch"]}, '
           f'CUDA {info["cuda"]}, cuDNN {info["cudnn"]}, mmcv ops built for CUDA: {info["mmcv_cuda"]}'
           if info and info['available'] else 'no CUDA device seen by the venv\'s torch')
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    header = '\n'.join([f'# Device check, {started:%Y-%m-%d %H:%M} UTC', '',
                        f'{gpu}; {cores} CPU cores; interpreter {layout.python}; budget {args.budget} s'])
    text, tables = report(header, results, layout, info and info.get('mmdet_dir'))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f'device_check-{started:%Y%m%dT%H%M%SZ}.md'
    path.write_text(text)
    print(f'\n{tables}\n\nreport (tables and raw log): {path}')
    return 0 if results and all(r.status == 'ok' for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
