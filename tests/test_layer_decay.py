"""Layer-wise learning-rate decay: the optimizer groups of built models follow the formula.

lr = base_lr * rate ** (num_layers + 1 - layer_id) inside the backbone, base_lr outside it;
weight decay 0 where a no_decay_names pattern matches. The expected layer of each PVT
parameter is written out here from the numbering rule, independently of ``layer_id``.
"""
from __future__ import annotations

import re

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from torch import nn

from mmpvt import PVT, PVTv2
from mmpvt.engine import LayerDecayOptimWrapperConstructor

TINY = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4),
            mlp_ratios=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))
# The numbering of TINY's parameters (depths 1, 2, 1, 1: five blocks): embeddings of stage 0
# are layer 0; a later stage's embeddings join its first block; output norms their last.
TINY_LAYERS = {
    'stages.0.patch_embed': 0, 'stages.0.pos_embed': 0, 'stages.0.blocks.0': 1, 'stages.0.norm': 1,
    'stages.1.patch_embed': 2, 'stages.1.pos_embed': 2, 'stages.1.blocks.0': 2, 'stages.1.blocks.1': 3,
    'stages.1.norm': 3,
    'stages.2.patch_embed': 4, 'stages.2.pos_embed': 4, 'stages.2.blocks.0': 4, 'stages.2.norm': 4,
    'stages.3.patch_embed': 5, 'stages.3.pos_embed': 5, 'stages.3.blocks.0': 5, 'stages.3.norm': 5,
}
BASE_LR, BASE_WD, RATE = 1e-3, 0.05, 0.7


def expected_layer(name: str) -> int:
    (layer,) = [v for k, v in TINY_LAYERS.items() if name == k or name.startswith(k + '.')]
    return layer


class Detector(nn.Module):
    """A backbone with a neck and a head, named as in mmdet and mmseg models."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Sequential(nn.Conv2d(64, 8, 1), nn.GroupNorm(2, 8))
        self.head = nn.Linear(8, 3)


def optim_cfg(constructor='LayerDecayOptimWrapperConstructor', **paramwise):
    return dict(constructor=constructor,
                optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=BASE_WD),
                paramwise_cfg=dict(layer_decay_rate=RATE, **paramwise))


def groups_by_name(model: nn.Module, wrapper) -> dict[str, dict]:
    """The optimizer's group of each trainable parameter (frozen ones are left out)."""
    by_id = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(by_id) == {id(p) for p in trainable.values()}
    return {name: by_id[id(p)] for name, p in trainable.items()}


def test_pvt_numbering_of_layers():
    for cls in (PVT, PVTv2):
        model = cls(arch=TINY)
        assert model.num_layers == 5
        for name, _ in model.named_parameters():
            assert model.layer_id(name) == expected_layer(name), name
    with pytest.raises(ValueError, match=r"'stages\.4\.blocks\.0\.norm1\.weight' is no parameter"):
        model.layer_id('stages.4.blocks.0.norm1.weight')


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('cls', [PVT, PVTv2])
def test_lr_and_weight_decay_of_every_parameter_follow_the_formula(scope, cls):
    model = Detector(cls(arch=TINY))
    with DefaultScope.overwrite_default_scope(scope):  # unprefixed, as in an mmdet / mmseg config
        wrapper = build_optim_wrapper(model, optim_cfg(no_decay_names=('norm', 'pos_embed')))
    groups = groups_by_name(model, wrapper)
    scales = set()
    for name, group in groups.items():
        if name.startswith('backbone.'):
            scale = RATE ** (5 + 1 - expected_layer(name[len('backbone.'):]))
        else:
            scale = 1.0  # neck and head
        scales.add(round(scale, 12))
        assert group['lr'] == pytest.approx(BASE_LR * scale, rel=1e-12), name
        no_decay = 'norm' in name or 'pos_embed' in name
        assert group['weight_decay'] == (0.0 if no_decay else BASE_WD), name
    assert len(scales) == 7  # layers 0..5 and everything outside the backbone


def test_other_paramwise_options_combine_with_the_decay():
    """custom_keys and norm_decay_mult of mmengine's constructor apply first, then the decay."""
    model = Detector(PVTv2(arch=TINY))
    with DefaultScope.overwrite_default_scope('mmdet'):
        wrapper = build_optim_wrapper(model, optim_cfg(
            custom_keys={'head': dict(lr_mult=0.1), 'attn.q': dict(lr_mult=2.0)}, norm_decay_mult=0.,
            no_decay_names=(r'\.bias$',)))
    for name, group in groups_by_name(model, wrapper).items():
        mult = 0.1 if name.startswith('head') else 2.0 if '.attn.q.' in name else 1.0
        scale = RATE ** (6 - expected_layer(name[9:])) if name.startswith('backbone.') else 1.0
        assert group['lr'] == pytest.approx(BASE_LR * mult * scale, rel=1e-12), name
        norm = 'norm' in name.split('.')[-2] or name.startswith('neck.1')  # LayerNorm / GroupNorm
        decayed = not (norm or name.endswith('.bias'))
        assert group['weight_decay'] == (BASE_WD if decayed else 0.0), name


def test_a_backbone_alone_and_the_prefixed_name():
    model = PVTv2(arch=TINY)
    with DefaultScope.overwrite_default_scope('mmengine'):
        wrapper = build_optim_wrapper(model, optim_cfg('mmpvt.LayerDecayOptimWrapperConstructor'))
    for name, group in groups_by_name(model, wrapper).items():
        assert group['lr'] == pytest.approx(BASE_LR * RATE ** (6 - expected_layer(name)), rel=1e-12), name
        assert group.get('weight_decay', BASE_WD) == BASE_WD


def test_a_real_detector_from_mmdet():
    """RetinaNet as mmdet builds it: FPN and head outside the backbone keep the base lr."""
    from mmdet.registry import MODELS

    retinanet = dict(
        type='RetinaNet',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
        backbone=dict(type='PVTv2', arch=TINY, frozen_stages=1),
        neck=dict(type='FPN', in_channels=[16, 32, 48, 64], out_channels=16, start_level=1,
                  add_extra_convs='on_input', num_outs=5),
        bbox_head=dict(
            type='RetinaHead', num_classes=3, in_channels=16, stacked_convs=1, feat_channels=16,
            anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3,
                                  ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.] * 4, target_stds=[1.] * 4),
            loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)))
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(retinanet)
        wrapper = build_optim_wrapper(model, optim_cfg(no_decay_names=('norm',)))
    groups = groups_by_name(model, wrapper)
    for name, group in groups.items():
        inside = name.startswith('backbone.')
        scale = RATE ** (6 - expected_layer(name[9:])) if inside else 1.0
        assert group['lr'] == pytest.approx(BASE_LR * scale, rel=1e-12), name
        assert group['weight_decay'] == (0.0 if 'norm' in name else BASE_WD), name
    assert any(n.startswith('neck.') for n in groups) and any(n.startswith('bbox_head.') for n in groups)
    # the frozen stage stays out of the optimizer
    assert 'backbone.stages.0.patch_embed.proj.weight' not in groups
    assert 'backbone.stages.1.patch_embed.proj.weight' in groups


def test_registered_beside_mmdet_and_mmseg_constructors_without_shadowing():
    from mmdet.engine.optimizers import LearningRateDecayOptimizerConstructor as MMDetDecay
    from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMDET
    from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMSEG

    for registry in (MMDET, MMSEG):
        assert registry.get('LayerDecayOptimWrapperConstructor') is LayerDecayOptimWrapperConstructor
    assert MMDET.get('LearningRateDecayOptimizerConstructor') is MMDetDecay


@pytest.mark.parametrize('paramwise, error, message', [
    ({}, ValueError, 'needs paramwise_cfg.layer_decay_rate'),
    (dict(layer_decay_rate=0.), ValueError, r'layer_decay_rate must be a number in \(0, 1\], got 0.0'),
    (dict(layer_decay_rate=1.5), ValueError, 'got 1.5'),
    (dict(layer_decay_rate='0.7'), ValueError, "got '0.7'"),
    (dict(layer_decay_rate=0.7, no_decay_names='norm'), TypeError, 'must be a list of patterns'),
])
def test_bad_options_are_refused(paramwise, error, message):
    cfg = dict(optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=BASE_WD))
    with pytest.raises(error, match=message):
        LayerDecayOptimWrapperConstructor(cfg, paramwise)


def test_a_model_without_an_mmpvt_backbone_is_refused():
    constructor = LayerDecayOptimWrapperConstructor(
        dict(optimizer=dict(type='AdamW', lr=BASE_LR)), dict(layer_decay_rate=RATE))
    with pytest.raises(TypeError, match=re.escape('Sequential holds no mmpvt backbone')):
        constructor(nn.Sequential(nn.Linear(2, 2)))


def test_an_optimizer_step_uses_the_scaled_rates():
    """One SGD step moves each parameter by exactly its group's lr times its gradient."""
    model = Detector(PVTv2(arch=TINY))
    cfg = dict(constructor='LayerDecayOptimWrapperConstructor', optimizer=dict(type='SGD', lr=0.1),
               paramwise_cfg=dict(layer_decay_rate=0.5))
    with DefaultScope.overwrite_default_scope('mmseg'):
        wrapper = build_optim_wrapper(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    wrapper.step()
    for name, p in model.named_parameters():
        scale = 0.5 ** (6 - expected_layer(name[9:])) if name.startswith('backbone.') else 1.0
        torch.testing.assert_close(before[name] - p.detach(), torch.full_like(p, 0.1 * scale), msg=name)
