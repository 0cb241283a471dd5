"""Checkpoints that must not load: unsafe, corrupt, or of another model, on every load path."""
import pickle

import pytest
import torch
from mmengine.runner import load_checkpoint

from mmpvt import PVT, PVTv2
from mmpvt.checkpoint import CheckpointError, load_checkpoint_file

from layouts import bilinear_resize, logged_messages

TINY = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4),
            mlp_ratios=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))


class Detector(torch.nn.Module):
    """The shape of a detector checkpoint: the backbone under ``backbone.``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.neck = torch.nn.Conv2d(64, 8, 1)


def write_malicious_checkpoint(path, marker):
    """A checkpoint whose unpickling would create ``marker`` (through os.system)."""
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    torch.save({'state_dict': {'x': torch.zeros(1)}, 'meta': Payload()}, path)


@pytest.mark.parametrize('loader', ['mmpvt', 'mmengine', 'init_cfg'])
def test_code_in_a_checkpoint_never_runs(loader, tmp_path):
    marker = tmp_path / 'pwned'
    write_malicious_checkpoint(tmp_path / 'evil.pth', marker)
    with pytest.raises((CheckpointError, pickle.UnpicklingError)) as info:
        if loader == 'mmpvt':
            load_checkpoint_file(tmp_path / 'evil.pth')
        elif loader == 'mmengine':  # what load_from, --resume and testing use
            load_checkpoint(torch.nn.Linear(1, 1), str(tmp_path / 'evil.pth'))
        else:
            model = PVTv2(arch=TINY, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'evil.pth')))
            model.init_weights()
    assert 'evil.pth' in str(info.value) and 'could run code' in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_corrupt_checkpoint_is_named_and_described(damage, tmp_path):
    good = tmp_path / 'good.pth'
    torch.save(PVTv2(arch=TINY).state_dict(), good)
    bad = tmp_path / 'bad.pth'
    data = good.read_bytes()
    bad.write_bytes({'truncated': data[:len(data) // 2], 'garbage': b'not a checkpoint' * 10,
                     'empty': b''}[damage])
    for load in (lambda: load_checkpoint_file(bad), lambda: load_checkpoint(PVTv2(arch=TINY), str(bad))):
        with pytest.raises(CheckpointError, match=r'bad\.pth is not a readable checkpoint \(truncated'):
            load()


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'checkpoint not found: .*absent\.pth'):
        load_checkpoint(PVTv2(arch=TINY), str(tmp_path / 'absent.pth'))


def test_other_variant_through_load_from_is_refused(tmp_path):
    """mmengine's load_from only warns about shape mismatches; the backbone refuses them."""
    torch.save({'state_dict': Detector(PVTv2(arch='b0')).state_dict()}, tmp_path / 'b0_detector.pth')
    target = Detector(PVTv2(arch=dict(TINY, embed_dims=(32, 64, 162, 64))))
    with pytest.raises(CheckpointError, match=r'backbone\.stages\.0\.blocks\.0\.mlp\.fc1\.weight has shape '
                                              r'\(256, 32\) in the checkpoint and \(64, 32\) in the model'):
        load_checkpoint(target, str(tmp_path / 'b0_detector.pth'), strict=False)


def test_v1_checkpoint_from_another_size_loads_through_load_from(tmp_path):
    """mmengine's load_from path resizes v1 position embeddings as init_cfg does, and logs each."""
    source = PVT(arch='tiny', pretrain_img_size=448).state_dict()
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.items()}}, tmp_path / 'pvt448.pth')
    model = Detector(PVT(arch='tiny'))
    with logged_messages() as messages:
        load_checkpoint(model, str(tmp_path / 'pvt448.pth'), strict=False)
    for i, stride in enumerate((4, 8, 16, 32)):
        key, side, grid = f'stages.{i}.pos_embed', 448 // stride, 224 // stride
        loaded = model.backbone.state_dict()[key]
        # The same interpolation on another memory layout: equal up to float rounding.
        torch.testing.assert_close(loaded, bilinear_resize(source[key], side, (grid, grid)),
                                   rtol=0, atol=1e-7,
                                   msg=lambda detail, key=key: f'{key} is not the bilinear resize: {detail}')
        assert (f"backbone.{key}: fitted the checkpoint's {tuple(source[key].shape)} "
                f"to the model's {tuple(loaded.shape)}") in messages
