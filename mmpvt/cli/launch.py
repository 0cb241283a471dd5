"""What tools/train.py and tools/test.py share, so that the scripts stay argument parsing only.

* Clear errors before anything heavy runs: a missing config or checkpoint (``errors``), a
  misspelt ``--cfg-options`` key (``cfg_options``), a missing dataset directory, named with
  the layout the config expects, and bad data files met during the run (``data_errors``).
* Distributed runs on machines without a GPU: mmengine's ``pytorch`` launcher calls
  ``torch.cuda.set_device`` and fails there, so the process group is initialised here with
  gloo and the model is wrapped without device ids. With CUDA, mmengine's own path (NCCL)
  runs unchanged.
* Exact resumption (``IterationSeedHook``), mixed precision on CUDA or a bf16-capable CPU.
* Test-time options that differ between mmdet and mmseg (dumping predictions, drawing
  them), chosen by the config's ``default_scope``.
* The metrics table that test.py prints last, in a form scripts can parse.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmengine.config import Config, ConfigDict, DictAction

from ..errors import LaunchError, check_file
from .cfg_options import check_cfg_options
from .data_errors import check_data, explain_data_error, explain_data_errors
from .memory import keep_freed_memory

__all__ = [
    'LaunchError', 'add_dump', 'add_loss_check', 'add_resume_hooks', 'add_run_arguments', 'apply_resume',
    'check_cfg_options',
    'check_data', 'check_file', 'default_work_dir', 'enable_amp', 'enable_auto_scale_lr', 'enable_show_dir',
    'explain_data_error', 'explain_data_errors', 'format_metrics', 'is_main_process', 'load_config',
    'load_run_config', 'parse_metrics', 'report_checks_passed', 'resume_candidates', 'setup_distributed',
]


def load_config(config: str | os.PathLike, cfg_options: Mapping[str, Any] | None = None) -> Config:
    """Reads a config file and applies ``--cfg-options`` overrides.

    Each override key is checked first (:func:`check_cfg_options`): mmengine would add a
    misspelt key silently. Modules named in ``custom_imports`` are imported by mmengine while
    it reads the file, before any override; when the overrides change ``custom_imports``,
    the new list is imported here, as if it had been in the file.
    """
    path = check_file(config, 'config file')
    cfg = Config.fromfile(str(path))
    if cfg_options:
        check_cfg_options(cfg, cfg_options)
        cfg.merge_from_dict(dict(cfg_options))
        if any(key.split('.')[0] == 'custom_imports' for key in cfg_options) and cfg.get('custom_imports'):
            from mmengine.utils import import_modules_from_strings
            import_modules_from_strings(**cfg.custom_imports)
    return cfg


def default_work_dir(config: str | os.PathLike) -> str:
    """``./work_dirs/<config name>``, the OpenMMLab convention when --work-dir is not given."""
    return str(Path('work_dirs') / Path(config).stem)


def add_run_arguments(parser: argparse.ArgumentParser, work_dir_help: str, options_example: str) -> None:
    """The options tools/train.py and tools/test.py share: --work-dir, --cfg-options, --launcher,
    --check-only."""
    parser.add_argument('--work-dir', help=f'{work_dir_help} (default: work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help=f'override config entries, e.g. {options_example}')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='pytorch: under torchrun (dist_*.sh); slurm: under srun (slurm_*.sh)')
    parser.add_argument('--check-only', action='store_true',
                        help='check the config, the --cfg-options keys, the files and the dataset paths, '
                             'print the work dir and exit (the launchers run this once before the workers)')


# What --check-only prints before the work dir; mmpvt.cli.dist_launch reads the line back.
CHECKED_WORK_DIR = 'checks passed; work dir: '


def report_checks_passed(cfg: Config) -> None:
    """``--check-only``'s output once every check passed: one line naming the run's work dir,
    where the distributed launcher then keeps the workers' logs."""
    print(f'{CHECKED_WORK_DIR}{cfg.work_dir}', flush=True)


def load_run_config(args: argparse.Namespace) -> Config:
    """The config of a train or test run: file, overrides, launcher and work dir from ``args``.

    Without CUDA, the run's process also keeps freed memory for reuse (``keep_freed_memory``):
    a CPU step's large tensors then reuse the previous step's memory. Every checkpoint the
    run saves is written atomically (``mmpvt.engine.install_atomic_checkpoints``): a kill
    during a save never leaves a truncated file under a checkpoint's name.
    """
    import torch

    from mmpvt.engine import install_atomic_checkpoints

    install_atomic_checkpoints()
    if not torch.cuda.is_available():
        keep_freed_memory()
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or default_work_dir(args.config)
    return cfg


# -- distributed ----------------------------------------------------------------------------------
def _replace_sync_bn(node: Any) -> int:
    """Replaces ``type='SyncBN'`` by ``'BN'`` in a config subtree; returns how many it changed."""
    changed = 0
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
            changed += 1
        for value in node.values():
            changed += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            changed += _replace_sync_bn(value)
    return changed


def setup_distributed(cfg: Config, launcher: str) -> None:
    """Prepares a ``--launcher pytorch`` run on a machine without CUDA (no-op otherwise).

    torchrun has set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the process group is
    initialised here with gloo, which mmengine's Runner then finds already running. The
    model is wrapped in MMDistributedDataParallel with ``device_ids=None`` (CPU modules), and
    SyncBN, which needs CUDA, becomes per-process BN.
    """
    import torch
    import torch.distributed as dist

    if launcher != 'pytorch' or torch.cuda.is_available():
        return
    if 'LOCAL_RANK' not in os.environ:
        raise LaunchError('--launcher pytorch expects to be started by torchrun '
                          '(tools/dist_train.sh CONFIG NUM_PROCS); LOCAL_RANK is not set')
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    # What the Runner logs as its backend, and would use if it initialised the group itself.
    cfg.setdefault('env_cfg', ConfigDict()).setdefault('dist_cfg', ConfigDict())['backend'] = 'gloo'
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = ConfigDict(wrapper)
    if _replace_sync_bn(cfg.model):
        print('mmpvt: no CUDA, so SyncBN layers run as per-process BN on the CPU', flush=True)


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): the process that prints summaries."""
    from mmengine.dist import is_main_process as _is_main
    return _is_main()


# -- train / test options ------------------------------------------------------------------------
def enable_amp(cfg: Config, here: bool = True) -> None:
    """Mixed precision: float16 with loss scaling on CUDA, bfloat16 autocast on a capable CPU.

    ``here=False``: the run goes to other machines (a Slurm job checked on the node that submits
    it), whose hardware decides when the job starts; a machine here without either is no error.
    """
    import torch

    from ..engine.amp import cpu_has_fast_bf16
    if cfg.optim_wrapper.get('type', 'OptimWrapper') in ('AmpOptimWrapper', 'CPUAmpOptimWrapper'):
        return
    if torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    elif cpu_has_fast_bf16():
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
        print('mmpvt: no CUDA: --amp runs the forward passes in bfloat16 on the CPU', flush=True)
    elif here:
        raise LaunchError('--amp needs a CUDA device or a CPU with bfloat16 units (AMX or AVX512-BF16); '
                          'this machine has neither: run without --amp')


def enable_auto_scale_lr(cfg: Config) -> None:
    """Scales the learning rate by the real batch size over ``auto_scale_lr.base_batch_size``."""
    if 'base_batch_size' not in (cfg.get('auto_scale_lr') or {}):
        raise LaunchError('--auto-scale-lr needs auto_scale_lr = dict(base_batch_size=...) in the config '
                          '(the total batch size its learning rate was set for)')
    cfg.auto_scale_lr.enable = True


def _readable_checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (mmpvt's loader's message), or None if it loads."""
    from mmpvt.checkpoint import CheckpointError, load_checkpoint_file
    try:
        load_checkpoint_file(path, map_location='cpu')
    except (CheckpointError, FileNotFoundError) as exc:
        return str(exc).split('. ', 1)[0]  # without torch's paragraph of advice after the reason
    return None


def resume_candidates(work_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints ``--resume`` may continue from, the one to try first first.

    First the file named in ``last_checkpoint`` (what mmengine itself resumes from), then
    every other ``*.pth`` in the work dir, newest first. Best checkpoints (``best_*``) are
    left out: they hold no optimizer or scheduler state to continue from.
    """
    work_dir = Path(work_dir)
    candidates: list[Path] = []
    pointer = work_dir / 'last_checkpoint'
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named:
            candidates.append(Path(named))
    others = [p for p in work_dir.glob('*.pth') if p.is_file() and not p.name.startswith('best_')]
    for path in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
        if not any(path.resolve() == c.resolve() for c in candidates if c.exists()):
            candidates.append(path)
    return candidates


def apply_resume(cfg: Config, resume: str | None) -> None:
    """``--resume``: 'auto' continues from the work dir's newest readable checkpoint, a path from that file.

    With 'auto', the checkpoints of :func:`resume_candidates` are read in turn: a newest
    checkpoint that is truncated or corrupt (a kill or a full disk during its write) is
    reported in one line and the next readable one is used. LaunchError when none is
    readable (listing each file and why), or when the given path is missing or unreadable.
    A work dir without checkpoints starts the run from scratch, as mmengine does.
    """
    if resume is None:
        return
    cfg.resume = True
    if resume != 'auto':
        path = check_file(resume, 'checkpoint to resume from')
        problem = _readable_checkpoint_problem(path)
        if problem:
            raise LaunchError(f'cannot resume from {path}: {problem}')
        cfg.load_from = str(path)
        return
    cfg.load_from = None
    tried = []
    for path in resume_candidates(cfg.work_dir):
        problem = _readable_checkpoint_problem(path)
        if problem is None:
            if tried:
                print(f'mmpvt: {tried[0]}; resuming from the newest readable checkpoint, {path}', flush=True)
            cfg.load_from = str(path)
            return
        tried.append(problem)
    if tried:
        raise LaunchError(f'--resume found no readable checkpoint in {cfg.work_dir}; tried: '
                          + '; '.join(tried))


def _add_custom_hook(cfg: Config, hook_class: type) -> None:
    """Appends ``hook_class`` to ``custom_hooks`` unless there, and ``mmpvt.engine`` to ``custom_imports``.

    The import makes the config saved in the work dir build the hook wherever it is loaded again.
    """
    def type_name(hook: Mapping[str, Any]) -> str:  # 'IterationSeedHook', 'mmpvt.X' or a class
        kind = hook.get('type', '')
        return kind.__name__ if isinstance(kind, type) else str(kind).split('.')[-1]

    hooks = list(cfg.get('custom_hooks') or [])
    if not any(type_name(hook) == hook_class.__name__ for hook in hooks):
        hooks.append(dict(type=hook_class.__name__))
    cfg.custom_hooks = hooks
    imports = cfg.get('custom_imports') or ConfigDict(imports=[], allow_failed_imports=False)
    modules = imports.get('imports') or []
    modules = [modules] if isinstance(modules, str) else list(modules)  # mmengine takes either
    if 'mmpvt.engine' not in modules:
        imports['imports'] = [*modules, 'mmpvt.engine']
    cfg.custom_imports = imports


def add_resume_hooks(cfg: Config) -> None:
    """Adds mmpvt's IterationSeedHook to ``custom_hooks`` (once), so that ``--resume`` is exact.

    The hook seeds each training iteration from the run's seed and the iteration number
    (mmpvt/engine/hooks.py explains why a generator state saved in the checkpoint would not
    do); without it a resumed run draws other stochastic-depth masks than the uninterrupted
    run would have.
    """
    from mmpvt.engine import IterationSeedHook  # registers the hook in this process
    _add_custom_hook(cfg, IterationSeedHook)


def add_loss_check(cfg: Config) -> None:
    """Adds mmpvt's InvalidLossHook (once): a NaN or inf total loss stops training at that iteration.

    The hook reads the losses mmengine has already copied to the CPU for logging, so it
    costs no device synchronisation; tools/train.py adds it unless ``--allow-invalid-loss``.
    """
    from mmpvt.engine import InvalidLossHook  # registers the hook in this process
    _add_custom_hook(cfg, InvalidLossHook)


def add_dump(cfg: Config, out: str) -> None:
    """Appends a metric that saves the raw predictions to ``out`` (a .pkl file)."""
    if not out.endswith(('.pkl', '.pickle')):
        raise LaunchError(f'--out must name a .pkl file, got {out}')
    # mmdet's dumper encodes masks as RLE, the form its analysis tools read.
    dump = dict(type='DumpDetResults' if cfg.get('default_scope') == 'mmdet' else 'mmengine.DumpResults',
                out_file_path=out)
    evaluators = cfg.test_evaluator
    cfg.test_evaluator = [*evaluators, dump] if isinstance(evaluators, list) else [evaluators, dump]


def enable_show_dir(cfg: Config, show_dir: str) -> None:
    """Draws each test image with its predictions into ``show_dir``.

    mmdet's DetVisualizationHook takes the directory itself (relative to the run's
    timestamped work dir); mmseg's SegVisualizationHook writes through the visualizer,
    whose ``save_dir`` is set instead.
    """
    hooks = cfg.get('default_hooks') or {}
    hook = hooks.get('visualization')
    if not hook:
        raise LaunchError('--show-dir needs default_hooks.visualization in the config')
    hook['draw'] = True
    hook['interval'] = 1
    if 'Det' in str(hook.get('type')):
        hook['test_out_dir'] = os.path.abspath(show_dir)
    else:
        cfg.visualizer['save_dir'] = os.path.abspath(show_dir)


# -- reporting -----------------------------------------------------------------------------------
def _writes_files_only(metric: Any) -> bool:
    """Whether an evaluator's metric saves predictions instead of scoring them.

    mmdet's and mmseg's metrics with ``format_only=True`` (results for a test server) and
    mmengine's dumpers (``--out``) return no metrics by design.
    """
    from mmengine.evaluator import DumpResults
    return bool(getattr(metric, 'format_only', False)) or isinstance(metric, DumpResults)


def format_metrics(metrics: Mapping[str, Any], title: str = 'test metrics', evaluator: Any = None) -> str:
    """A markdown table of metric name and value, the last thing test.py prints.

    Scalars are written with 4 decimals; other values (per-class lists) as text. A line
    ``| metric | value |`` starts the table, so a script finds it by that header.

    No metrics at all is an error: LaunchError names the metrics of ``evaluator`` (the
    run's mmengine Evaluator) that returned nothing. The one exception is an evaluator
    whose every metric only writes files (``format_only=True``, dumpers): a line says so.
    """
    if not metrics:
        ran = list(getattr(evaluator, 'metrics', None) or [])
        names = ', '.join(type(metric).__name__ for metric in ran) or 'unknown'
        if ran and all(_writes_files_only(metric) for metric in ran):
            return (f'{title}: none: {names} only wrote the predictions to files '
                    '(format_only or a dump), as configured')
        raise LaunchError(
            f'no metrics came back from the test evaluator ({names}); evaluators return none when '
            'the model predicted nothing (an mmdet COCO metric: no box above model.test_cfg.score_thr) '
            'or the test set is empty')
    lines = [f'{title}:', '| metric | value |', '|---|---|']
    for name, value in metrics.items():
        try:
            text = f'{float(value):.4f}'
        except (TypeError, ValueError):
            text = str(value)
        lines.append(f'| {name} | {text} |')
    return '\n'.join(lines)


def parse_metrics(text: str) -> dict[str, float]:
    """Reads back the last table ``format_metrics`` printed in ``text`` (for tests and scripts)."""
    start = text.rfind('| metric | value |')
    if start < 0:
        raise ValueError('no metrics table in the text')
    metrics = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith('|'):
            break
        name, value = (cell.strip() for cell in line.strip('|').split('|', 1))
        try:
            metrics[name] = float(value)
        except ValueError:
            continue
    return metrics
