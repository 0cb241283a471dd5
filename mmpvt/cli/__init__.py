"""What mmpvt's command-line tools share (tools/train.py, test.py, infer.py, check_data.py,
the launchers and tools/analysis/): configs and their checks, the run's options, distributed
launches on GPUs and CPUs, and quiet, one-line errors.

Imported by the tools only; ``import mmpvt`` does not load it. The inference API (a model
from a config and a checkpoint, predictions on images) is ``mmpvt.apis``.
"""
import sys
from collections.abc import Callable

from ..engine.amp import cpu_has_fast_bf16
from ..errors import LaunchError, check_file
from .launch import (
    add_dump,
    add_loss_check,
    add_resume_hooks,
    add_run_arguments,
    apply_resume,
    check_cfg_options,
    check_data,
    default_work_dir,
    enable_amp,
    enable_auto_scale_lr,
    enable_show_dir,
    explain_data_error,
    explain_data_errors,
    format_metrics,
    is_main_process,
    load_config,
    load_run_config,
    parse_metrics,
    report_checks_passed,
    setup_distributed,
)
from .memory import keep_freed_memory
from .quiet import quiet_third_party_warnings

__all__ = [
    'add_dump', 'add_loss_check', 'add_resume_hooks', 'add_run_arguments', 'apply_resume',
    'check_cfg_options',
    'check_data', 'check_file', 'cpu_has_fast_bf16', 'default_work_dir',
    'enable_amp', 'enable_auto_scale_lr', 'enable_show_dir', 'explain_data_error',
    'explain_data_errors', 'format_metrics', 'is_main_process', 'keep_freed_memory', 'LaunchError',
    'leave_process_group', 'load_config', 'load_run_config', 'parse_metrics', 'quiet_third_party_warnings',
    'report_checks_passed',
    'run_tool', 'setup_distributed',
]


def leave_process_group() -> None:
    """Ends this process's part in torch.distributed while the interpreter is still whole.

    A torchrun worker that left its gloo process group to the interpreter's teardown now and
    then aborted after its work was done ("terminate called without an active exception";
    1 in about 30 runs of the two-process test, once in a full suite): gloo's threads still
    held finished work whose tensors were then freed during finalization
    (pytorch/pytorch#179291). The tool's objects (the runner, and the DDP model holding the
    group) are collected and the group destroyed here, once every rank is done, while Python
    still runs. Without a process group this does nothing.
    """
    import gc

    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def run_tool(main: Callable[[], int | None]) -> None:
    """A tool's entry point: the third-party notices hidden before anything reads a config,
    ``main``'s return value as the exit status, and a LaunchError as one ``error: ...`` line
    with exit status 1. A distributed worker leaves its process group before exiting
    (:func:`leave_process_group`)."""
    quiet_third_party_warnings()
    try:
        status = main()
    except LaunchError as exc:
        sys.exit(f'error: {exc}')
    leave_process_group()
    sys.exit(status)
