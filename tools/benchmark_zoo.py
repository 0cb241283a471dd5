"""Benchmark the zoo's published detector and segmentor weights: accuracy, speed and memory in one table.

    python tools/benchmark_zoo.py --data-root DIR [--models PATTERN ...] [--collection NAME]
                                  [--task detection|'instance segmentation'|segmentation] [--gpus N]
                                  [--cache-dir DIR] [--out-dir OUT] [--resume] [--index-root DIR]
                                  [--cfg-options KEY=VALUE ...]

Every model of the model index (model-index.yml, read by mmpvt.model_index) that matches the
selection and publishes ``Weights`` is evaluated on the test split under DIR by tools/test.py,
or by tools/dist_test.sh with N > 1 processes. DIR is one dataset: COCO (annotations/, val2017/)
for detectors, ADEChallengeData2016 for segmentors. The weights are downloaded once into the
cache (default: torch hub's checkpoints folder); a file name ending in an OpenMMLab hash
(``..._20210831_103110-17b566bd.pth``) is checked against the start of the file's sha256 first.

OUT (default work_dirs/benchmark_zoo) receives benchmark.md and benchmark.json: one row per
model and metric with the published value (the weights' own, else the paper's), the measured
one and their difference, images per second, peak memory, and ``ok`` or why the model failed.
Each run's output is in OUT/<model>/test.log. A failing model does not stop the others; the
exit status is 1 if any selected model failed. --resume skips the models OUT/benchmark.json
already records as ok (the file is rewritten after every model, so an interrupted run resumes).

What images/s and peak memory measure:

* images/s: the test images over the test loop's time as mmengine's timer logs it (rank 0's
  mean iteration time x iterations: data loading, forward and post-processing; neither the
  start-up nor the final metric computation). Where the log has no timing, the wall time of
  the whole tools/test.py run is used instead, marked "(wall)".
* peak memory (MB): on CUDA, the largest ``memory`` mmengine logs during the test
  (``torch.cuda.max_memory_allocated`` on rank 0; it logs one every ``default_hooks.logger
  .interval`` iterations). On the CPU, the peak resident set size of the run's largest
  process, read with ``os.wait4`` on that run alone.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmengine.config import Config, DictAction

from mmpvt import cli
from mmpvt.checkpoint import CheckpointError, download
from mmpvt.errors import is_remote
from mmpvt.model_index import METRIC_KEYS, TASKS, ModelIndexError, ZooModel, load_models, select_models

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / 'tools'
# tools/test.py prints mmdet's COCO APs as fractions, the index has percentages (mmseg's mIoU
# is a percentage already).
PERCENT_SCALE = {'coco/bbox_mAP': 100.0, 'coco/segm_mAP': 100.0}
# OpenMMLab release names end in '-' and the first hex digits of the file's sha256, the
# convention torch.hub checks too.
HASH_SUFFIX = re.compile(r'-([0-9a-f]{8,64})\.\w+$')
# mmengine's test lines: 'Iter(test) [k/N]  ... time: ...  memory: MB' every logger interval
# (memory on CUDA only), and, once, 'Epoch(test) [N/N]  <metrics>  data_time: ...  time: <mean
# seconds per iteration over the epoch>' ('Iter(test)' for configs that log by iteration).
TEST_LINE = re.compile(r'(?:Epoch|Iter)\(test\)\s+\[\s*(\d+)/(\d+)\](.*)')
MEAN_TIME = re.compile(r'(?<![\w])time: ([0-9.]+)')
CUDA_MEMORY = re.compile(r'(?<![\w])memory: (\d+)')
RESULTS = 'benchmark.json'
TABLE = 'benchmark.md'
COLUMNS = ('model', 'config', 'metric', 'published', 'measured', 'difference', 'images/s',
           'peak memory (MB)', 'status')
NOTES = {
    'published': "the weights' own published value; '(paper)': the paper's, where the weights publish none",
    'difference': 'measured - published, in the index\'s units (AP and mIoU in %)',
    'images_per_s': ("test images / (rank 0's mean iteration time x iterations, as mmengine logs them: data "
                     "loading, forward, post-processing); '(wall)': over the whole tools/test.py run"),
    'peak_memory_mb': ("CUDA: the largest torch.cuda.max_memory_allocated mmengine logs on rank 0; CPU: peak "
                       'resident set size of the largest process of the run'),
}
# A model's measurements before (or without) a run; benchmark_model fills them in.
NOT_MEASURED = dict(images_per_s=None, timing=None, images=None, peak_memory_mb=None, memory=None,
                    wall_s=None, log=None, checkpoint=None, test_metrics=None)
DOWNLOAD_ADVICE = 'then run this again with --resume (the models already done are skipped)'
# select_models takes the index's task names; --task takes the short ones of ZooModel.task.
INDEX_TASK = {short: name for name, short in TASKS.items()}


class ModelFailure(Exception):
    """One model could not be benchmarked; the message is the reason its table rows give."""


class DataMissing(ModelFailure):
    """A model's test data is not under --data-root (the command line's error when no model finds it)."""


@dataclass
class Prepared:
    """A selected model ready to run: its config with the data-root overrides, and those overrides."""
    cfg: Config
    options: list[str]  # KEY=VALUE strings for tools/test.py's --cfg-options, the user's last


@dataclass
class ChildRun:
    """A finished tools/test.py (or dist_test.sh) run."""
    returncode: int
    output: str  # stdout and stderr, interleaved as printed
    wall_s: float
    peak_rss_mb: float  # of the run's largest process


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate the model zoo's published weights; one table of accuracy, images/s and memory.")
    parser.add_argument('--data-root', type=Path, required=True,
                        help='the dataset the selected configs test on: COCO (annotations/'
                             'instances_val2017.json, val2017/) for detectors, ADEChallengeData2016/ for '
                             'segmentors')
    parser.add_argument('--models', nargs='+', metavar='PATTERN',
                        help="model names of the index or shell wildcards in quotes ('retinanet_pvt*'); "
                             'default: every model with weights')
    parser.add_argument('--collection', help='only models of this collection (PVT, PVTv2, ViTDet, ...)')
    parser.add_argument('--task', choices=list(INDEX_TASK), help='only models with results for this task')
    parser.add_argument('--gpus', type=int, default=1,
                        help='processes per run: 1 runs tools/test.py, more tools/dist_test.sh (default: 1)')
    parser.add_argument('--cache-dir', type=Path,
                        help="where weights are downloaded once (default: torch hub's checkpoints folder)")
    parser.add_argument('--out-dir', type=Path, default=Path('work_dirs/benchmark_zoo'),
                        help=f'where {TABLE}, {RESULTS} and each model\'s work dir go '
                             '(default: work_dirs/benchmark_zoo)')
    parser.add_argument('--resume', action='store_true',
                        help=f'skip the models OUT/{RESULTS} records as ok, and keep its other rows')
    parser.add_argument('--index-root', type=Path,
                        help="a folder holding the model-index.yml to read (default: mmpvt's own)")
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='passed to every tools/test.py run, after the data-root overrides, '
                             'e.g. test_dataloader.batch_size=2')
    return parser.parse_args()


# -- choosing and preparing the models ------------------------------------------------------------
def choose_models(args: argparse.Namespace) -> list[ZooModel]:
    """The index's models with weights that match the selection; all on one dataset."""
    try:
        models = select_models(load_models(args.index_root), args.models, args.collection,
                               INDEX_TASK.get(args.task), with_weights=True)
    except ModelIndexError as exc:
        raise cli.LaunchError(str(exc)) from exc
    segmentors = [m.name for m in models if m.task == 'segmentation']
    detectors = [m.name for m in models if m.task != 'segmentation']
    if segmentors and detectors:  # COCO and ADE20K cannot both live under one --data-root
        raise cli.LaunchError(
            f'the selection holds detectors ({", ".join(detectors[:3])}, ...) and segmentors '
            f'({", ".join(segmentors[:3])}, ...), which test on different datasets; choose one with --task')
    return models


def data_root_options(cfg: Config, data_root: Path) -> dict[str, str]:
    """The ``--cfg-options`` that point a zoo config at the dataset under ``data_root``.

    As configs/README.md lists them: each dataloader's ``dataset.data_root`` and, for mmdet,
    the evaluators' COCO annotation file (mmengine resolved it from the config's own data_root
    when the file was read). Only keys the config has: a wrapped dataset (RepeatDataset) has
    no data_root of its own, and tools/test.py refuses a key that names nothing.
    """
    root = f'{data_root}/'
    options = {}
    for split in ('train', 'val', 'test'):
        dataset = (cfg.get(f'{split}_dataloader') or {}).get('dataset') or {}
        if 'data_root' in dataset:
            options[f'{split}_dataloader.dataset.data_root'] = root
    if cfg.get('default_scope') != 'mmseg':
        for split in ('val', 'test'):
            evaluator = cfg.get(f'{split}_evaluator')
            if isinstance(evaluator, Mapping) and 'ann_file' in evaluator:
                options[f'{split}_evaluator.ann_file'] = f'{root}annotations/instances_val2017.json'
    return options


def parse_cfg_options(options: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings as mmengine's DictAction reads them (lists, tuples, numbers)."""
    parsed = {}
    for option in options:
        key, sep, value = option.partition('=')
        if not sep:
            raise cli.LaunchError(f'--cfg-options takes KEY=VALUE items; got {option!r}')
        parsed[key] = DictAction._parse_iterable(value)
    return parsed


def prepare(model: ZooModel, data_root: Path, user_options: list[str]) -> Prepared:
    """The model's config with the dataset overrides and the user's options, its data checked.

    A wrong ``--cfg-options`` key is the command line's error: LaunchError, naming the model.
    A config that is missing or does not load is that model's failure (ModelFailure); so is
    test data it does not find under ``data_root`` (DataMissing: the first line of
    tools/test.py's own message).
    """
    if not model.config.is_file():
        raise ModelFailure(f'config not found: {model.config} (listed in the model index)')
    try:
        # Read twice: the overrides depend on which keys the file has, and load_config checks
        # and applies them as tools/test.py will.
        options = data_root_options(Config.fromfile(str(model.config)), data_root)
        cfg = cli.load_config(model.config, {**options, **parse_cfg_options(user_options)})
    except cli.LaunchError as exc:
        raise cli.LaunchError(f'{model.name}: {exc}') from exc
    except Exception as exc:  # a broken config (syntax, a missing base) fails its model only
        raise ModelFailure(f'config {model.config} does not load: {type(exc).__name__}: {exc}') from exc
    try:
        cli.check_data(cfg, ('test',))
    except cli.LaunchError as exc:
        raise DataMissing(str(exc).splitlines()[0]) from exc
    return Prepared(cfg, [f'{key}={value}' for key, value in options.items()] + user_options)


# -- one model --------------------------------------------------------------------------------------
def fetch_weights(url: str, cache_dir: Path | None) -> Path:
    """The weights file of ``url``: downloaded once into ``cache_dir``; a local path as is."""
    if not is_remote(url):
        path = Path(url).expanduser()
        if not path.is_file():
            raise ModelFailure(f'weights not found: {path}')
        return path
    try:
        return download(url, cache_dir, advice=DOWNLOAD_ADVICE)
    except CheckpointError as exc:
        raise ModelFailure(str(exc)) from exc


def verify_checksum(path: Path) -> None:
    """ModelFailure unless the file's sha256 starts with the hash its name ends in, if any.

    A mismatch is a download cut short or replaced on the way: the cached file is kept (it may
    be inspected) and the message says to delete it.
    """
    match = HASH_SUFFIX.search(path.name)
    if match is None:
        return  # nothing to check against
    expected = match.group(1)
    sha256 = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            sha256.update(block)
    actual = sha256.hexdigest()
    if not actual.startswith(expected):
        raise ModelFailure(f'checksum mismatch: {path}: expected {expected}..., got '
                           f'{actual[:len(expected)]}...; delete it and re-run')


def evaluation_command(config: Path, checkpoint: Path, work_dir: Path, options: list[str],
                       gpus: int) -> list[str]:
    """tools/test.py for one process; tools/dist_test.sh (torchrun) for several."""
    tail = [str(checkpoint)] + ([str(gpus)] if gpus > 1 else []) + ['--work-dir', str(work_dir)]
    tail += ['--cfg-options', *options] if options else []
    if gpus > 1:
        return ['bash', str(TOOLS / 'dist_test.sh'), str(config), *tail]
    return [sys.executable, str(TOOLS / 'test.py'), str(config), *tail]


def run_child(command: list[str], log: Path) -> ChildRun:
    """Runs ``command`` with its output in ``log``; its wall time and peak memory.

    The peak resident set size comes from ``os.wait4`` on this child: the kernel reports the
    largest of the child and its waited-for descendants (torchrun's workers). getrusage's
    RUSAGE_CHILDREN keeps one maximum over every child this process ever had, so a run
    smaller than an earlier one would not show.
    """
    env = dict(os.environ)
    # The tools import mmpvt from this checkout, as the launchers arrange; dist_test.sh runs
    # this interpreter unless the caller chose one.
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p)
    env.setdefault('PYTHON', sys.executable)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, 'w') as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # Ctrl-C: no run left behind
            process.kill()
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    rss_unit = 1 if sys.platform == 'darwin' else 1024  # bytes on macOS, KiB on Linux
    return ChildRun(process.returncode, log.read_text(errors='replace'), wall,
                    usage.ru_maxrss * rss_unit / 2**20)


def failure_line(output: str, returncode: int) -> str:
    """Why a run failed, in one line: the tool's ``error:`` line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error: ')]
    if errors:
        return errors[-1][len('error: '):]
    return f'{lines[-1] if lines else "no output"} (exit status {returncode})'


def test_loop_timing(output: str) -> tuple[int, float] | None:
    """(iterations, mean seconds per iteration) of mmengine's last ``(test) [N/N]`` line."""
    found = None
    for match in TEST_LINE.finditer(output):
        done, total, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        mean = MEAN_TIME.search(rest)
        if done == total and mean:
            found = (total, float(mean.group(1)))
    return found


def cuda_peak_memory(output: str) -> int | None:
    """The largest ``memory`` (MB) of mmengine's test lines; None on the CPU (none logged)."""
    values = [int(value) for match in TEST_LINE.finditer(output)
              for value in CUDA_MEMORY.findall(match.group(3))]
    return max(values) if values else None


_IMAGE_COUNTS: dict[str, int | None] = {}


def count_test_images(cfg: Config) -> int | None:
    """The number of images of the config's test dataset (built here, each dataset once); None
    if it cannot be built (the run already read it, so the count is only left out)."""
    dataset_cfg = cfg.test_dataloader.dataset.to_dict()
    key = json.dumps({k: v for k, v in dataset_cfg.items() if k != 'pipeline'}, sort_keys=True, default=str)
    if key not in _IMAGE_COUNTS:
        from mmengine.registry import DATASETS, init_default_scope
        init_default_scope(cfg.get('default_scope', 'mmdet'))
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                _IMAGE_COUNTS[key] = len(DATASETS.build(dataset_cfg))
        except Exception:  # any failure only costs the images/s column
            _IMAGE_COUNTS[key] = None
    return _IMAGE_COUNTS[key]


def index_config(model: ZooModel, index_root: Path) -> str:
    """The config's path as the index writes it (relative to the index's folder)."""
    try:
        return str(model.config.relative_to(index_root))
    except ValueError:
        return str(model.config)


def metric_rows(model: ZooModel, config: str, measured: Mapping[str, float] | None, status: str,
                extra: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table's rows of one model: one per metric the index publishes for it.

    ``measured`` is tools/test.py's metrics (None when it did not run to the end); a metric it
    did not report fails its row.
    """
    names = list(dict.fromkeys([*model.results, *model.weights_results])) or [None]
    rows = []
    for name in names:
        published, source = model.weights_results.get(name), 'weights'
        if published is None:
            published, source = model.results.get(name), 'paper'
        row_status, value = status, None
        if measured is not None and name is not None:
            key = METRIC_KEYS.get(name)
            if key in measured:
                value = round(measured[key] * PERCENT_SCALE.get(key, 1.0), 2)
            else:
                row_status = (f'failed: tools/test.py reported no {key or name!r} '
                              f'(it reported {", ".join(measured) or "nothing"})')
        difference = round(value - published, 2) if value is not None and published is not None else None
        rows.append(dict(model=model.name, config=config, task=model.task, metric=name, published=published,
                         published_from=source if published is not None else None, measured=value,
                         difference=difference, status=row_status, weights=model.weights,
                         **{**NOT_MEASURED, **extra}))
    return rows


def benchmark_model(model: ZooModel, prepared: Prepared, args: argparse.Namespace,
                    index_root: Path) -> list[dict[str, Any]]:
    """Downloads, checks and evaluates one model; its table rows, failed ones naming why."""
    config = index_config(model, index_root)
    work_dir = args.out_dir / model.name
    log = work_dir / 'test.log'
    extra: dict[str, Any] = dict(NOT_MEASURED, log=str(log))
    try:
        checkpoint = fetch_weights(model.weights, args.cache_dir)
        extra['checkpoint'] = str(checkpoint)
        verify_checksum(checkpoint)
        command = evaluation_command(model.config, checkpoint, work_dir, prepared.options, args.gpus)
        run = run_child(command, log)
        extra['wall_s'] = round(run.wall_s, 1)
        if run.returncode != 0:
            raise ModelFailure(f'{failure_line(run.output, run.returncode)} (log: {log})')
        try:
            metrics = cli.parse_metrics(run.output)
        except ValueError as exc:
            raise ModelFailure(f'tools/test.py printed no metrics table (log: {log})') from exc
    except ModelFailure as failure:
        return metric_rows(model, config, None, f'failed: {failure}', extra)

    images = count_test_images(prepared.cfg)
    timing = test_loop_timing(run.output)
    seconds, extra['timing'] = ((timing[0] * timing[1], 'test loop') if timing else (run.wall_s, 'wall time'))
    cuda_mb = cuda_peak_memory(run.output)
    extra.update(images=images, test_metrics=metrics,
                 images_per_s=round(images / seconds, 2) if images and seconds > 0 else None,
                 peak_memory_mb=cuda_mb if cuda_mb is not None else round(run.peak_rss_mb),
                 memory='cuda max allocated' if cuda_mb is not None else 'peak RSS')
    return metric_rows(model, config, metrics, 'ok', extra)


# -- the table ----------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return '-'
    text = f'{value:.2f}' if isinstance(value, float) else str(value)
    return ' '.join(text.split()).replace('|', '\\|')  # one line, and no column breaks


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with what the columns measure below it."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for row in rows:
        published = _cell(row['published']) + (' (paper)' if row['published_from'] == 'paper' else '')
        speed = _cell(row['images_per_s']) + (' (wall)' if row['timing'] == 'wall time' and
                                              row['images_per_s'] is not None else '')
        difference = '-' if row['difference'] is None else f'{row["difference"]:+.2f}'
        memory = _cell(row['peak_memory_mb']) + (' (RSS)' if row['memory'] == 'peak RSS' else '')
        cells = [_cell(row['model']), _cell(row['config']), _cell(row['metric']), published,
                 _cell(row['measured']), difference, speed, memory, _cell(row['status'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    notes = [f'- {name}: {text}' for name, text in NOTES.items()]
    return '\n'.join(lines + [''] + notes)


def read_previous(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier run's results file (--resume); none if there is no file."""
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())['rows']
        valid = all(isinstance(row, dict) and {'model', 'status'} <= set(row) for row in rows)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise cli.LaunchError(f'{path} is not a result of this tool; delete it or run without --resume')
    return rows


def ordered(rows_by_model: Mapping[str, list[dict[str, Any]]], order: Iterable[str]) -> list[dict[str, Any]]:
    """Every model's rows in the order of ``order`` (the selection's, the index's own); the rows of
    other models kept from an earlier run (--resume) last."""
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(rows_by_model, key=lambda name: rank.get(name, len(rank)))
    return [row for name in names for row in rows_by_model[name]]


def write_results(out_dir: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Writes OUT/benchmark.json and OUT/benchmark.md (each replaced whole); returns the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    results = dict(data_root=str(args.data_root), gpus=args.gpus, columns=NOTES, rows=rows)
    for name, text in ((RESULTS, json.dumps(results, indent=1)), (TABLE, table + '\n')):
        partial = out_dir / f'.{name}.partial'
        partial.write_text(text)
        partial.replace(out_dir / name)  # an interrupted write leaves the previous file
    return table


def clock(seconds: float) -> str:
    """mm:ss (minutes beyond 59 as they are: 125:03)."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f'{minutes:02d}:{seconds:02d}'


def summary(rows: list[dict[str, Any]]) -> str:
    """The progress line's middle: each metric against the published value, speed and memory."""
    failed = [row['status'] for row in rows if row['status'] != 'ok']
    if failed:
        return failed[0]
    parts = []
    for row in rows:
        if row['measured'] is not None:
            against = '' if row['published'] is None else \
                f' (published {row["published"]:.2f}, {row["difference"]:+.2f})'
            parts.append(f'{row["metric"]} {row["measured"]:.2f}{against}')
    first = rows[0]
    if first['images_per_s'] is not None:
        parts.append(f'{first["images_per_s"]:.2f} images/s')
    parts.append(f'{first["peak_memory_mb"]} MB')
    return 'ok, ' + ', '.join(parts)


def run_plans(plans: list[tuple[ZooModel, Prepared | None, str | None]],
              rows_by_model: dict[str, list[dict[str, Any]]], order: list[str], args: argparse.Namespace,
              index_root: Path) -> bool:
    """Benchmarks the prepared models in turn, a progress line each, the results file rewritten
    after each; fills ``rows_by_model`` and returns whether any failed."""
    results_file = args.out_dir / RESULTS
    to_run = sum(1 for _, prepared, _ in plans if prepared is not None)
    durations: list[float] = []
    failed = False
    for k, (model, prepared, failure) in enumerate(plans, 1):
        start = time.perf_counter()
        if prepared is not None:
            rows = benchmark_model(model, prepared, args, index_root)
            durations.append(time.perf_counter() - start)
            to_run -= 1
        elif failure is not None:
            rows = metric_rows(model, index_config(model, index_root), None, failure, {})
        else:
            rows = None
        if rows is not None:
            rows_by_model[model.name] = rows
            write_results(args.out_dir, ordered(rows_by_model, order), args)
            failed |= any(row['status'] != 'ok' for row in rows)
            what = summary(rows) + (f', took {clock(durations[-1])}' if prepared is not None else '')
        else:
            what = f'skipped: ok in {results_file} (--resume)'
        eta = clock(sum(durations) / len(durations) * to_run) if durations else '--:--'
        print(f'[{k}/{len(plans)}] {model.name}: {what} (ETA {eta})', flush=True)
    return failed


def _default_index_root() -> Path:
    from mmpvt.model_index import index_root
    try:
        return index_root()
    except ModelIndexError as exc:
        raise cli.LaunchError(str(exc)) from exc


def main() -> int:
    args = parse_args()
    if args.gpus < 1:
        raise cli.LaunchError(f'--gpus must be >= 1, got {args.gpus}')
    if not args.data_root.is_dir():
        raise cli.LaunchError(f'--data-root not found: {args.data_root} (the dataset folder: COCO\'s with '
                              'annotations/ and val2017/, or ADEChallengeData2016/)')
    args.data_root = args.data_root.resolve()  # the runs' work dirs hold configs naming it
    index_root = (args.index_root or _default_index_root()).resolve()
    models = choose_models(args)
    results_file = args.out_dir / RESULTS
    previous: dict[str, list[dict[str, Any]]] = {}
    for row in read_previous(results_file) if args.resume else []:
        previous.setdefault(row['model'], []).append(row)
    done = {name for name, rows in previous.items() if all(row['status'] == 'ok' for row in rows)}
    done &= {m.name for m in models}

    # Every config is read and its data checked before the first download: a wrong option or
    # data root is one error now, not the same failure for each model hours later.
    plans: list[tuple[ZooModel, Prepared | None, str | None]] = []
    failures: list[tuple[str, ModelFailure]] = []
    for model in models:
        if model.name in done:
            plans.append((model, None, None))
            continue
        try:
            plans.append((model, prepare(model, args.data_root, args.cfg_options), None))
        except ModelFailure as failure:
            plans.append((model, None, f'failed: {failure}'))
            failures.append((model.name, failure))
    # Nothing left to run, and data missing: the data root is wrong, one error rather than a
    # table of failures.
    missing = [(name, failure) for name, failure in failures if isinstance(failure, DataMissing)]
    if missing and not any(prepared for _, prepared, _ in plans):
        others = f' ({len(missing) - 1} more models miss their data too)' if len(missing) > 1 else ''
        raise cli.LaunchError(f'{missing[0][0]}: {missing[0][1]}{others}; is --data-root {args.data_root} '
                              'the dataset these configs test on?')

    rows_by_model = dict(previous)
    print(f'{len(models)} models, {len(done)} done before; each run\'s output: '
          f'{args.out_dir}/<model>/test.log', flush=True)
    try:
        failed = run_plans(plans, rows_by_model, [m.name for m in models], args, index_root)
    except KeyboardInterrupt:
        raise cli.LaunchError(f'interrupted; {results_file} holds the models done, and --resume skips '
                              'them') from None
    table = write_results(args.out_dir, ordered(rows_by_model, [m.name for m in models]), args)
    print(f'\n{table}\n\nwritten to {args.out_dir / TABLE} and {results_file}')
    return 1 if failed else 0


if __name__ == '__main__':
    cli.run_tool(main)
