"""A NaN or inf training loss stops tools/train.py at that iteration with one error line, and
the last good checkpoint stays the last checkpoint (mmpvt.engine.InvalidLossHook)."""
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine.logging import MessageHub

from mmpvt.datasets.synthetic import generate
from mmpvt.engine import InvalidLossError, InvalidLossHook

from tooling import DEMO_CONFIGS, TOOLS, run_tool

NAN_AT = 4  # 1-based, as the log counts: the iteration whose box loss becomes NaN
# A test-only hook: before iteration NAN_AT, the box regression weights become NaN, so only
# loss_bbox (not loss_cls) is NaN in that iteration.
POISON = f'''
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class PoisonBoxHeadHook(Hook):
    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter + 1 == {NAN_AT}:
            model = getattr(runner.model, 'module', runner.model)
            with torch.no_grad():
                model.bbox_head.retina_reg.weight.fill_(float('nan'))
'''
RUN = [f'train_cfg.max_iters={NAN_AT}', 'default_hooks.checkpoint.interval=2',
       'default_hooks.logger.interval=1', 'randomness.seed=0', 'val_cfg=None', 'val_dataloader=None',
       'val_evaluator=None']


def _runner(tmp_path: Path, name: str, **scalars: float) -> SimpleNamespace:
    hub = MessageHub.get_instance(name)
    for key, value in scalars.items():  # what RuntimeInfoHook records from the outputs
        hub.update_scalar(f'train/{key}', value)
    return SimpleNamespace(iter=6, message_hub=hub)


def test_hook_names_iteration_and_non_finite_terms(tmp_path):
    runner = _runner(tmp_path, 'loss_nan', loss=math.nan, loss_cls=0.5, loss_bbox=math.inf, lr=0.01)
    runner.message_hub.update_info('last_ckpt', 'work/iter_6.pth')
    # The outputs' values are never converted: the hook reads the floats logging already made.
    outputs = {key: object() for key in ('loss', 'loss_cls', 'loss_bbox', 'lr')}
    with pytest.raises(InvalidLossError) as info:
        InvalidLossHook().after_train_iter(runner, 0, outputs=outputs)
    message = str(info.value)
    assert 'at iteration 7' in message and 'non-finite terms: loss_bbox)' in message
    assert 'loss_cls=' not in message and 'work/iter_6.pth' in message


def test_hook_passes_finite_losses(tmp_path):
    runner = _runner(tmp_path, 'loss_finite', loss=1.5, loss_cls=0.5, loss_bbox=1.0)
    InvalidLossHook().after_train_iter(runner, 0, outputs={'loss': torch.tensor(1.5)})


def test_hook_sum_overflow_is_named(tmp_path):
    runner = _runner(tmp_path, 'loss_overflow', loss=math.inf, loss_cls=3e38, loss_bbox=3e38)
    with pytest.raises(InvalidLossError, match='every term is finite, their sum overflowed'):
        outputs = dict.fromkeys(['loss', 'loss_cls', 'loss_bbox'])
        InvalidLossHook().after_train_iter(runner, 0, outputs=outputs)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('invalid_loss')
    generate(root / 'data' / 'synthetic', num_train=4, num_val=2, seed=0, size=128)
    (root / 'poison_hook.py').write_text(POISON)
    (root / 'poisoned.py').write_text(
        f'_base_ = [{str(DEMO_CONFIGS["retinanet"])!r}]\n'
        "custom_imports = dict(imports=['mmpvt', 'poison_hook'], allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='PoisonBoxHeadHook')]\n")
    return root


def _train(workspace: Path, work_dir: str, *extra: str):
    env = {'PYTHONPATH': f'{Path(__file__).parent}:{workspace}'}
    return run_tool([TOOLS / 'train.py', workspace / 'poisoned.py', '--work-dir', work_dir, *extra,
                     '--cfg-options', *RUN], cwd=workspace, env=env, timeout=120)


@pytest.mark.slow
def test_train_stops_at_nan_loss_and_keeps_last_good_checkpoint(workspace):
    result = _train(workspace, 'stopped')
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f'at iteration {NAN_AT} ' in errors[0] and re.search(r'non-finite terms: loss_bbox\)', errors[0])
    work_dir = workspace / 'stopped'
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_2.pth']
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith('iter_2.pth')
    state = torch.load(work_dir / 'iter_2.pth', weights_only=False)['state_dict']
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


@pytest.mark.slow
def test_allow_invalid_loss_trains_on(workspace):
    result = _train(workspace, 'allowed', '--allow-invalid-loss')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (workspace / 'allowed' / f'iter_{NAN_AT}.pth').is_file()
