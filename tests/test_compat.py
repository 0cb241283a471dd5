"""The version guard, and mmengine checkpoints (resume included) under weights_only=True."""
import pickle
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

from mmpvt import PVTv2
from mmpvt.compat import SUPPORTED_VERSIONS, IncompatibleVersionError, check_versions

ROOT_DIR = Path(__file__).resolve().parents[1]


def test_supported_stack_passes():
    check_versions()  # the installed, tested stack
    check_versions({'mmengine': '0.10.7', 'mmcv': '2.1.0', 'mmdet': '3.3.0', 'mmsegmentation': None})


@pytest.mark.parametrize('name,version', [
    ('mmcv', '2.2.0'), ('mmcv', '1.7.2'), ('mmdet', '2.28.2'), ('mmsegmentation', '1.3.0'),
    ('mmengine', '1.0.0')])
def test_unsupported_versions_are_named_with_the_range(name, version):
    low, high = SUPPORTED_VERSIONS[name]
    with pytest.raises(IncompatibleVersionError, match=rf'supports {name}>={low},<{high}, but '
                                                        rf'{name}=={version} is installed'):
        check_versions({name: version})


def test_import_fails_clearly_next_to_an_unsupported_mmcv(tmp_path, python):
    """A distribution record for mmcv 2.2.0 ahead on sys.path, as after a bad upgrade."""
    info = tmp_path / 'mmcv-2.2.0.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: mmcv\nVersion: 2.2.0\n')
    code = f'import sys; sys.path.insert(0, {str(tmp_path)!r}); import mmpvt'
    out = subprocess.run([python, '-c', code], cwd=ROOT_DIR, capture_output=True, text=True)
    assert out.returncode != 0
    assert 'IncompatibleVersionError: mmpvt supports mmcv>=2.0.0rc4,<2.2.0, but mmcv==2.2.0 is installed' \
        in out.stderr


# -- resume under weights_only=True -----------------------------------------------------------
class Images(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 32, 32, generator=g), target=torch.tensor(float(i % 2)))


class TinyClassifier(BaseModel):
    """A PVTv2 with a linear head: enough model for a real mmengine training loop."""

    def __init__(self):
        super().__init__()
        self.backbone = PVTv2(arch=dict(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1),
                                         num_heads=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
                                         sr_ratios=(8, 4, 2, 1)), out_indices=(3,))
        self.head = torch.nn.Linear(16, 1)

    def forward(self, inputs, target, mode='loss'):
        logits = self.head(self.backbone(inputs)[0].mean((2, 3))).squeeze(1)
        if mode == 'loss':
            return dict(loss=torch.nn.functional.binary_cross_entropy_with_logits(logits, target))
        return logits


def make_runner(work_dir, max_iters, resume=False):
    return Runner(
        model=TinyClassifier(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=Images(), batch_size=4,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=4),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0), resume=resume, default_scope='mmpvt')


def test_runner_resumes_under_weights_only(tmp_path):
    make_runner(tmp_path, max_iters=2).train()
    path = tmp_path / 'iter_2.pth'
    # everything the file holds beyond tensors is on the allow-list
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint['meta']['iter'] == 2
    assert isinstance(checkpoint['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    runner = make_runner(tmp_path, max_iters=4, resume=True)
    runner.train()
    assert runner.iter == 4
    # the restored message hub kept iterations 1-2 and the resumed run added 3-4
    assert len(runner.message_hub.get_scalar('train/loss').data[0]) == 4


def test_mmengine_checkpoint_is_refused_without_the_allow_list(tmp_path, python):
    """The allow-list is what makes resume work: a process without mmpvt cannot load it."""
    make_runner(tmp_path, max_iters=2).train()
    code = textwrap.dedent(f'''
        import pickle, torch
        try:
            torch.load({str(tmp_path / 'iter_2.pth')!r}, weights_only=True)
        except pickle.UnpicklingError as exc:
            print('refused', 'getattr' in str(exc) or 'HistoryBuffer' in str(exc))
    ''')
    out = subprocess.run([python, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'refused True'


def test_crafted_getattr_in_a_checkpoint_is_refused(tmp_path):
    """The getattr stand-in resolves HistoryBuffer's statistics and nothing else: a walk
    from an allowed class towards its module's globals stops at the first step."""

    class Exploit:
        def __reduce__(self):
            return getattr, (HistoryBuffer.mean, '__globals__')

    torch.save({'x': Exploit()}, tmp_path / 'evil.pth')
    with pytest.raises(pickle.UnpicklingError, match='refused getattr'):
        torch.load(tmp_path / 'evil.pth', weights_only=True)


def test_fresh_process_loads_an_mmengine_checkpoint(tmp_path, python):
    """A process that has not created a HistoryBuffer yet (tools/test.py) still loads one."""
    make_runner(tmp_path, max_iters=2).train()
    code = textwrap.dedent(f'''
        import torch, mmpvt
        checkpoint = torch.load({str(tmp_path / 'iter_2.pth')!r}, weights_only=True)
        print(type(checkpoint['message_hub']['log_scalars']['train/loss']).__name__)
    ''')
    out = subprocess.run([python, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'HistoryBuffer'
