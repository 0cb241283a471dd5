"""Helpers for mmpvt's command-line tools (tools/train.py, tools/test.py, tools/analysis/).

Imported by the tools only; ``import mmpvt`` does not load it. Importing it registers
``CPUAmpOptimWrapper`` (bfloat16 autocast on the CPU, used by ``train.py --amp``).
"""
from .amp import CPUAmpOptimWrapper, cpu_has_fast_bf16
from .launch import (
    LaunchError,
    add_dump,
    add_loss_check,
    add_resume_hooks,
    add_run_arguments,
    apply_resume,
    check_cfg_options,
    check_data,
    check_file,
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
    'check_data', 'check_file', 'cpu_has_fast_bf16', 'CPUAmpOptimWrapper', 'default_work_dir',
    'enable_amp', 'enable_auto_scale_lr', 'enable_show_dir', 'explain_data_error',
    'explain_data_errors', 'format_metrics', 'is_main_process', 'keep_freed_memory', 'LaunchError',
    'load_config', 'load_run_config', 'parse_metrics', 'quiet_third_party_warnings', 'report_checks_passed',
    'setup_distributed',
]
