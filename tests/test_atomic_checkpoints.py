"""Checkpoints are never half-written under their final name (mmpvt.engine.atomic).

The crash test kills (SIGKILL) a process while it saves a large checkpoint through the
function mmengine's ``Runner.save_checkpoint`` calls; the final name must then still hold
the previous complete checkpoint. ``last_checkpoint`` and best checkpoints are checked to be
written through a temporary file renamed into place. ``--resume`` skips a newest checkpoint
that is unreadable anyway (one written before these guarantees, a damaged disk).
"""
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine.fileio import get_file_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import MessageHub

from mmpvt.cli import LaunchError, apply_resume
from mmpvt.engine import atomic_write, install_atomic_checkpoints
from mmpvt.engine.atomic import temporary_path

from tooling import DEMO_CONFIGS, TOOLS, run_tool

# Saves a small checkpoint, says so, then a large one, through Runner.save_checkpoint's function.
SAVER = """
import sys
import torch
import mmengine.runner.runner as runner_module
from mmpvt.engine import install_atomic_checkpoints

target = sys.argv[1]
install_atomic_checkpoints()
runner_module.save_checkpoint({'step': 1, 'state_dict': {'w': torch.zeros(4)}}, target)
print('saved', flush=True)
runner_module.save_checkpoint({'step': 2, 'state_dict': {'w': torch.ones(int(sys.argv[2]))}}, target)
print('saved', flush=True)
"""
BIG = 48 * 2**20  # float32 values: a 192 MB checkpoint, long enough to write that a kill lands inside it
GROWN = 2**20  # bytes written of the new checkpoint before the kill


def _bytes_in(directory: Path) -> int:
    total = 0
    for path in directory.iterdir():
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # a temporary file renamed away meanwhile
            pass
    return total


@pytest.mark.slow
def test_checkpoint_killed_while_saving_keeps_previous_file(tmp_path):
    target = tmp_path / 'iter_2.pth'
    saver = subprocess.Popen([sys.executable, '-c', SAVER, str(target), str(BIG)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        for line in saver.stdout:  # mmengine may log to stdout first
            if line.strip() == 'saved':
                break
        assert target.is_file(), 'the first checkpoint was not saved'
        previous = target.stat().st_size
        deadline = time.monotonic() + 50
        # Watch from outside: the saver's own threads could not run while torch.save holds the GIL.
        while _bytes_in(tmp_path) < previous + GROWN:
            assert saver.poll() is None, 'the large save finished before the kill; raise BIG'
            assert time.monotonic() < deadline, 'the large save never started writing'
            time.sleep(0.0005)
        saver.send_signal(signal.SIGKILL)
        assert saver.wait(30) == -signal.SIGKILL
    finally:
        if saver.poll() is None:
            saver.kill()
    checkpoint = torch.load(target, weights_only=True)  # a truncated file raises here
    assert checkpoint['step'] == 1 and torch.equal(checkpoint['state_dict']['w'], torch.zeros(4))
    # Killed part-way: the new checkpoint was still growing under its temporary name.
    assert temporary_path(target).exists(), 'the kill came after the save completed'


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / 'sub' / 'epoch_1.pth'
    install_atomic_checkpoints()
    import mmengine.runner.runner as runner_module
    runner_module.save_checkpoint({'step': 1}, str(target))
    runner_module.save_checkpoint({'step': 2}, str(target))
    assert torch.load(target, weights_only=True) == {'step': 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ['epoch_1.pth']


def test_atomic_write_failing_block_keeps_old_file(tmp_path):
    target = tmp_path / 'last_checkpoint'
    target.write_text('old')
    with pytest.raises(RuntimeError), atomic_write(target, 'w') as f:
        f.write('new, half')
        raise RuntimeError('disk full')
    assert target.read_text() == 'old'
    assert not temporary_path(target).exists()


@pytest.fixture
def renames(monkeypatch):
    """Every os.replace(src, dst) made, as (src name, dst name); the renames still happen."""
    made = []
    real = os.replace

    def spy(src, dst):
        made.append((Path(src).name, Path(dst).name))
        real(src, dst)
    monkeypatch.setattr(os, 'replace', spy)
    return made


def test_last_checkpoint_is_renamed_into_place(tmp_path, renames):
    install_atomic_checkpoints()
    hook = CheckpointHook(interval=1, by_epoch=False)
    hook.out_dir = str(tmp_path)
    hook.file_backend = get_file_backend(str(tmp_path))
    hook.keep_ckpt_ids = deque()
    runner = SimpleNamespace(work_dir=str(tmp_path), message_hub=MessageHub.get_instance('atomic_test'),
                             save_checkpoint=lambda *args, **kwargs: None)
    hook._save_checkpoint_with_step(runner, 3, meta={})  # what CheckpointHook runs after each save
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'iter_3.pth')
    assert renames == [('.last_checkpoint.tmp', 'last_checkpoint')]


def test_best_checkpoint_is_renamed_into_place(tmp_path, renames):
    """CheckpointHook saves best checkpoints with runner.save_checkpoint, without optimizer state."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Tiny(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, *args, **kwargs):
            return {}

    install_atomic_checkpoints()
    runner = Runner(model=Tiny(), work_dir=str(tmp_path), experiment_name='atomic_best',
                    train_dataloader=dict(dataset=[torch.zeros(2)], batch_size=1,
                                          sampler=dict(type='DefaultSampler', shuffle=False)),
                    train_cfg=dict(by_epoch=False, max_iters=1),
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)))
    name = 'best_coco_bbox_mAP_iter_3.pth'
    runner.save_checkpoint(str(tmp_path), name, save_optimizer=False, save_param_scheduler=False)
    assert renames == [(f'.{name}.tmp', name)]
    assert torch.load(tmp_path / name, weights_only=False)['state_dict']['linear.weight'].shape == (2, 2)


# -- --resume with unreadable checkpoints ---------------------------------------------------------
def _checkpoint(path: Path, step: int, age: int, truncated: bool = False) -> Path:
    """A small checkpoint file, ``age`` seconds old, cut in half if ``truncated``."""
    torch.save({'meta': {'iter': step}, 'state_dict': {'w': torch.full((64,), float(step))}}, path)
    if truncated:
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def _resume_cfg(work_dir: Path):
    from mmengine.config import Config
    return Config(dict(work_dir=str(work_dir)))


def test_resume_falls_back_to_newest_readable_checkpoint(tmp_path, capsys):
    _checkpoint(tmp_path / 'iter_1.pth', 1, age=30)
    _checkpoint(tmp_path / 'iter_2.pth', 2, age=20)
    _checkpoint(tmp_path / 'best_coco_bbox_mAP_iter_2.pth', 2, age=15)  # no optimizer state: never resumed
    newest = _checkpoint(tmp_path / 'iter_3.pth', 3, age=10, truncated=True)
    (tmp_path / 'last_checkpoint').write_text(str(newest))
    cfg = _resume_cfg(tmp_path)
    apply_resume(cfg, 'auto')
    assert cfg.resume is True and cfg.load_from == str(tmp_path / 'iter_2.pth')
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and 'iter_3.pth' in lines[0] and 'not a readable checkpoint' in lines[0]
    assert lines[0].endswith(f'resuming from the newest readable checkpoint, {tmp_path / "iter_2.pth"}')


def test_resume_uses_last_checkpoint_when_readable(tmp_path, capsys):
    named = _checkpoint(tmp_path / 'iter_2.pth', 2, age=20)
    _checkpoint(tmp_path / 'iter_1.pth', 1, age=10)  # newer on disk, but last_checkpoint decides
    (tmp_path / 'last_checkpoint').write_text(str(named))
    cfg = _resume_cfg(tmp_path)
    apply_resume(cfg, 'auto')
    assert cfg.load_from == str(named)
    assert capsys.readouterr().out == ''


def test_resume_without_readable_checkpoint_lists_what_was_tried(tmp_path):
    newest = _checkpoint(tmp_path / 'iter_2.pth', 2, age=10, truncated=True)
    _checkpoint(tmp_path / 'iter_1.pth', 1, age=20, truncated=True)
    (tmp_path / 'last_checkpoint').write_text(str(newest))
    with pytest.raises(LaunchError, match=r'no readable checkpoint') as info:
        apply_resume(_resume_cfg(tmp_path), 'auto')
    message = str(info.value)
    assert '\n' not in message
    tried = message.split('tried: ', 1)[1].split('; ')
    assert [Path(problem.split()[0]).name for problem in tried] == ['iter_2.pth', 'iter_1.pth']
    assert all('not a readable checkpoint' in problem for problem in tried)


def test_resume_from_unreadable_path_is_refused(tmp_path):
    bad = _checkpoint(tmp_path / 'iter_2.pth', 2, age=0, truncated=True)
    with pytest.raises(LaunchError, match=r'cannot resume from .*iter_2\.pth: .*not a readable checkpoint'):
        apply_resume(_resume_cfg(tmp_path), str(bad))


@pytest.mark.parametrize('given', [True, False], ids=['path', 'auto'])
def test_train_resume_unreadable_is_one_error_line(tmp_path, given):
    bad = _checkpoint(tmp_path / 'iter_2.pth', 2, age=0, truncated=True)
    (tmp_path / 'last_checkpoint').write_text(str(bad))
    resume = ['--resume', str(bad)] if given else ['--resume']
    result = run_tool([TOOLS / 'train.py', DEMO_CONFIGS['retinanet'], '--work-dir', tmp_path, *resume,
                       '--check-only'], cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'iter_2.pth' in errors[0], result.stderr
