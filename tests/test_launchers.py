"""tools/dist_train.sh and dist_test.sh: the checks run once, and a failed worker is reported once.

The launchers run the tool with --check-only in one process before torchrun's agent starts
any worker (mmpvt/cli/dist_launch.py), so a bad config, checkpoint or dataset prints one
error block, not one per rank followed by torchrun's report. A worker that still fails is
reported by one summary line, with its error shown once and every rank's log kept under the
work dir. The end-to-end runs use the CPU (gloo) and fail early on purpose: seconds each.
"""
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmpvt.cli import dist_launch
from mmpvt.datasets.synthetic import generate

from tooling import DEMO_CONFIGS, TOOLS, free_port
from tooling import run_tool as run

CONFIG = DEMO_CONFIGS['retinanet']
# A module the failing config imports: it raises in the worker processes whose RANK is listed
# in FAIL_RANKS, while the config is read, before any model is built. The launcher's own
# check (no RANK) passes.
FAILING_MODULE = '''
import os
if os.environ.get('RANK') in os.environ.get('FAIL_RANKS', '').split(','):
    raise RuntimeError(f'rank {os.environ["RANK"]} fails on purpose')
'''


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


# -- the checks once ------------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_dataset_with_four_processes_is_one_error(tmp_path):
    out = run([TOOLS / 'dist_train.sh', CONFIG, 4], cwd=tmp_path, env={'PORT': str(free_port())})
    assert out.returncode == 1, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert text.count('error:') == 1, text[-3000:]
    assert text.count('dataset directory not found: data/synthetic/coco/ (data_root of train_dataloader') == 1
    assert 'expected layout' in out.stderr and 'python -m mmpvt.datasets.synthetic' in out.stderr
    # No worker started: no torchrun report, no traceback, no CPU-process notice.
    for absent in ('Traceback', 'ChildFailedError', 'torch.distributed', 'CPU processes'):
        assert absent not in text, absent


@pytest.mark.slow
def test_bad_cfg_options_key_for_dist_test_is_one_error(tmp_path):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')  # the check names the key before any checkpoint is read
    out = run([TOOLS / 'dist_test.sh', CONFIG, checkpoint, 2,
               '--cfg-options', 'test_dataloader.batch_sise=2'], cwd=tmp_path, env={'PORT': str(free_port())})
    assert out.returncode == 1, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert text.count('error:') == 1, text[-3000:]
    assert text.count('unknown --cfg-options key test_dataloader.batch_sise') == 1
    assert 'batch_size' in out.stderr  # the closest valid name
    assert 'Traceback' not in text and 'CPU processes' not in text


@pytest.mark.slow
def test_check_only_reports_the_work_dir_and_trains_nothing(tmp_path):
    generate(tmp_path / 'data' / 'synthetic', num_train=1, num_val=1, seed=0, size=64)
    out = run([TOOLS / 'train.py', CONFIG, '--work-dir', tmp_path / 'work', '--check-only'], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f'{dist_launch.CHECKED_WORK_DIR}{tmp_path / "work"}'
    assert not (tmp_path / 'work').exists()  # nothing built, nothing written


def test_precheck_returns_the_work_dir_or_exits_with_the_tools_code(tmp_path, capsys):
    good = tmp_path / 'good.py'
    good.write_text(f'print("building"); print({dist_launch.CHECKED_WORK_DIR!r} + "runs/x")\n')
    assert dist_launch.precheck(str(good), []) == 'runs/x'
    bad = tmp_path / 'bad.py'
    bad.write_text('import sys; print("partial output"); sys.exit("error: no such dataset")\n')
    with pytest.raises(SystemExit) as info:
        dist_launch.precheck(str(bad), ['CONFIG'])
    assert info.value.code == 1
    assert 'partial output' in capsys.readouterr().out


# -- a worker that fails after the start ------------------------------------------------------------
@pytest.fixture(scope='module')
def failing_workspace(tmp_path_factory) -> Path:
    """Data where the demo config reads it, and that config with the failing module imported."""
    root = tmp_path_factory.mktemp('launchers')
    generate(root / 'data' / 'synthetic', num_train=2, num_val=1, seed=0, size=64)
    (root / 'fail_on_rank.py').write_text(FAILING_MODULE)
    (root / 'failing.py').write_text(
        f'_base_ = [{str(CONFIG)!r}]\n'
        "custom_imports = dict(imports=['mmpvt', 'fail_on_rank'], allow_failed_imports=False)\n")
    return root


@pytest.mark.slow
@pytest.mark.parametrize('fail_ranks', ['1', '0,1'])
def test_failed_worker_is_reported_once_with_the_logs_kept(fail_ranks, failing_workspace):
    """Rank 1 alone: its error is shown from its log. Every rank: rank 0's own output shows it,
    and rank 1's stays in its file. Either way the error appears once, then one summary line."""
    root = failing_workspace
    work_dir = root / f'work_{fail_ranks.replace(",", "_")}'
    env = {'PORT': str(free_port()), 'FAIL_RANKS': fail_ranks,
           'PYTHONPATH': f'{root}{os.pathsep}{Path(__file__).parent}'}
    out = run([TOOLS / 'dist_train.sh', root / 'failing.py', 2, '--work-dir', work_dir], cwd=root, env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    first = fail_ranks.split(',')[0]
    # The exception's line (its traceback also quotes the raising source line once).
    assert text.count('RuntimeError: rank') == 1, text[-4000:]
    assert f'RuntimeError: rank {first} fails on purpose' in out.stderr
    summary = [line for line in out.stderr.splitlines() if 'worker processes failed' in line]
    assert len(summary) == 1 and summary[0].startswith('error: ')
    # Which of several failing ranks the agent sees exit first varies from run to run.
    assert any(f'rank {rank}: exit code 1' in summary[0] for rank in fail_ranks.split(','))
    log_dirs = list((work_dir / 'dist_logs').iterdir())
    assert len(log_dirs) == 1 and summary[0].endswith(f'full logs in {log_dirs[0]}/')
    # Every rank but the console's keeps its output on disk, and the agent its log.
    rank1_log = next(log_dirs[0].glob('*/attempt_0/1/stderr.log')).read_text()
    assert 'RuntimeError: rank 1 fails on purpose' in rank1_log
    rank0_log = (log_dirs[0] / 'local_rank_0_stderr.log').read_text()  # the console's copy
    assert ('RuntimeError: rank 0 fails on purpose' in rank0_log) == (first == '0')
    assert 'failed (exitcode: 1) local_rank: ' in (log_dirs[0] / 'agent.log').read_text()
    for absent in ('ChildFailedError', 'Root Cause', 'torch/distributed/elastic'):
        assert absent not in text, absent
    if not _cuda():  # said once; the tests run each process with one OpenMP thread
        crowded = ('; 2 processes share 1 cores, so each runs slower than it would alone'
                   if cores() < 2 else '')
        notices = [line for line in out.stdout.splitlines() if 'CPU processes' in line]
        assert notices == [f'mmpvt: no CUDA: 2 CPU processes over gloo on {cores()} cores, '
                           f'1 OpenMP thread each{crowded}']


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# -- the report, piece by piece -------------------------------------------------------------------
def failure(local_rank: int, exitcode: int, timestamp: int = 0) -> SimpleNamespace:
    """What torchrun's ProcessFailure holds, for the parts the report reads."""
    name = signal.Signals(-exitcode).name if exitcode < 0 else '<N/A>'
    return SimpleNamespace(local_rank=local_rank, exitcode=exitcode, timestamp=timestamp,
                           signal_name=lambda: name)


def write_stderr_log(log_dir: Path, local_rank: int, text: str) -> None:
    path = log_dir / 'none_abc' / 'attempt_0' / str(local_rank) / 'stderr.log'
    path.parent.mkdir(parents=True)
    path.write_text(text)


def test_report_shows_the_first_real_failure_and_counts_the_stopped(tmp_path, capsys):
    write_stderr_log(tmp_path, 2,
                     'loading\nTraceback (most recent call last):\n  File "x"\nValueError: bad\n')
    failures = {0: failure(0, -signal.SIGTERM, 5), 1: failure(1, -signal.SIGTERM, 5), 2: failure(2, 1, 5),
                3: failure(3, -signal.SIGTERM, 5)}
    summary = dist_launch.report_failure(failures, 4, tmp_path)
    assert summary == (f'error: 1 of 4 worker processes failed (rank 2: exit code 1); the agent then stopped '
                       f'3 more (SIGTERM); full logs in {tmp_path}/')
    shown = capsys.readouterr().err
    assert shown.startswith('rank 2 (') and shown.endswith('Traceback (most recent call last):\n  File "x"\n'
                                                           'ValueError: bad\n')
    assert 'loading' not in shown


def test_report_does_not_repeat_rank_zeros_error(tmp_path, capsys):
    write_stderr_log(tmp_path, 1, 'error: the same error\n')
    failures = {0: failure(0, 1, 3), 1: failure(1, 1, 4)}
    summary = dist_launch.report_failure(failures, 2, tmp_path, console_text='error: the same error\n')
    assert summary.startswith('error: 2 of 2 worker processes failed '
                              '(rank 0: exit code 1, rank 1: exit code 1); full logs in')
    assert capsys.readouterr().err == ''  # rank 0 printed its error on the console itself
    # Rank 0 printed it, but was still exiting when the agent stopped it: listed as stopped.
    failures = {0: failure(0, -signal.SIGTERM, 3), 1: failure(1, 1, 3)}
    dist_launch.report_failure(failures, 2, tmp_path, console_text='Traceback (most recent call last):\n')
    assert capsys.readouterr().err == ''
    dist_launch.report_failure(failures, 2, tmp_path, console_text='loading the config\n')
    assert capsys.readouterr().err.endswith('stderr.log):\nerror: the same error\n')


def test_report_names_signals_as_torchrun_does(tmp_path):
    summary = dist_launch.report_failure({0: failure(0, -signal.SIGKILL)}, 2, tmp_path)
    assert '(rank 0: Signal 9 (SIGKILL))' in summary and 'stopped' not in summary
    everyone_stopped = {0: failure(0, -signal.SIGTERM), 1: failure(1, -signal.SIGTERM)}
    assert '2 of 2 worker processes failed' in dist_launch.report_failure(everyone_stopped, 2, tmp_path)


def test_last_error_starts_at_the_last_error_or_traceback():
    text = 'a\nerror: first\nb\nTraceback (most recent call last):\n  x\nKeyError: 1\n'
    assert dist_launch.last_error(text) == 'Traceback (most recent call last):\n  x\nKeyError: 1'
    block = 'error: one\nexpected layout:\n  data/'
    assert dist_launch.last_error(f'warning: x\n{block}\n') == block
    assert dist_launch.last_error('\n'.join(map(str, range(100))), max_lines=3) == '97\n98\n99'


def test_cpu_threads_share_the_cores_unless_set(monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(dist_launch, 'usable_cores', lambda: 8)
    assert dist_launch.plan_threads(2, cuda=False) == '4 OpenMP threads each'
    assert os.environ['OMP_NUM_THREADS'] == '4'
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert dist_launch.plan_threads(16, cuda=False) == '1 OpenMP thread each'
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert dist_launch.plan_threads(2, cuda=True) == '1 OpenMP thread each'  # torchrun's default
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert dist_launch.plan_threads(2, cuda=False) == '3 OpenMP threads each'
    assert dist_launch.cpu_notice(16, 1, '1 OpenMP thread each') == (
        'mmpvt: no CUDA: 16 CPU processes over gloo on 8 cores, 1 OpenMP thread each; '
        '16 processes share 8 cores, so each runs slower than it would alone')


def test_bad_process_counts_are_refused(capsys):
    for argv in (['--nproc', '0', 'tools/train.py'],
                 ['--nproc', '2', '--nnodes', '2', '--node-rank', '2', 'tools/train.py']):
        with pytest.raises(SystemExit) as info:
            dist_launch.parse_args(argv)
        assert info.value.code == 2
    assert 'need NUM_PROCS >= 1' in capsys.readouterr().err
