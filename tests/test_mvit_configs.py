"""The MViTv2 configs: detectron2's recipe as configured, every model built, one batch per method.

The recipe facts (detectron2 projects/MViTv2/configs, the MViTv2 paper's COCO results) are
written out here: AdamW lr 1.6e-4 (L 1e-4), betas 0.9 / 0.999, weight decay 0.1 with none on norm
layers, position embeddings and the relative-position tables, no layer decay, a batch of 64 with
AMP, a 250-iteration warm-up from 0.001, 36 epochs = 67,500 iterations with lr x0.1 at 52,500 and
62,500 (L: 50 epochs = 92,187 iterations, steps at 81,944 and 88,773), multi-scale 480-800 with the
DETR-style crop for T / S / B and large-scale jitter at 1024 for L / H, drop path 0.2 / 0.2 / 0.4 /
0.5 / 0.6, activation checkpointing for H, Cascade with a 2-conv RPN and 4conv1fc box heads and a
mask head with SyncBN, the official ImageNet weights (IN-1k for T / S / B, IN-21k for L / H).
RetinaNet, Mask R-CNN 1x and Semantic FPN are the zoo's recipes with MViTv2-T (not published).
The full-size models are built on the meta device (no memory, no initialisation), the one-batch
runs use a tiny MViTv2 through the same wiring.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import zoo
from mmengine.config import Config
from mmengine.optim import OptimWrapper, build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS
from torch import nn

from mmpvt.models import MViTv2

# The zoo's fixtures (fake COCO / ADE20K layouts, package bases, fast initialisation).

RELEASE = 'https://dl.fbaipublicfiles.com/mvit/mvitv2_models/'
# config: arch, drop path, release file, epochs, lr, large-scale jitter
PAPER = {
    'mask_rcnn_mvitv2_t_3x.py': ('tiny', 0.2, 'MViTv2_T_in1k', 36, 1.6e-4, False),
    'cascade_mask_rcnn_mvitv2_t_3x.py': ('tiny', 0.2, 'MViTv2_T_in1k', 36, 1.6e-4, False),
    'cascade_mask_rcnn_mvitv2_s_3x.py': ('small', 0.2, 'MViTv2_S_in1k', 36, 1.6e-4, False),
    'cascade_mask_rcnn_mvitv2_b_3x.py': ('base', 0.4, 'MViTv2_B_in1k', 36, 1.6e-4, False),
    'cascade_mask_rcnn_mvitv2_l_lsj.py': ('large', 0.5, 'MViTv2_L_in21k', 50, 1e-4, True),
    'cascade_mask_rcnn_mvitv2_h_lsj.py': ('huge', 0.6, 'MViTv2_H_in21k', 36, 1.6e-4, True),
}
# detectron2's schedules at its batch of 64: epochs -> (iterations, the two lr x0.1 steps)
D2_SCHEDULES = {36: (67500, (52500, 62500)), 50: (92187, (81944, 88773))}
OTHER_METHODS = ['retinanet_mvitv2_t.py', 'mask_rcnn_mvitv2_t.py', 'fpn_mvitv2_t_ade20k.py']
ALL = [*PAPER, *OTHER_METHODS]
# Stage-1 width and blocks per stage of each variant.
ARCHS = {'tiny': (96, (1, 2, 5, 2)), 'small': (96, (1, 2, 11, 2)), 'base': (96, (2, 3, 16, 3)),
         'large': (144, (2, 6, 36, 4)), 'huge': (192, (4, 8, 60, 8))}
# Backbone parameters of detectron2's MViT constructor, its four output norms included.
BACKBONE_PARAMS = {'tiny': 23_405_664, 'small': 34_102_560, 'base': 50_705_088,
                   'large': 212_484_384, 'huge': 665_345_408}
# Whole-model parameters published with the COCO results (millions, rounded). L's 270M is left
# out: detectron2's L config (the ImageNet-21k design, as here) counts 265.1M by the same rule,
# the ImageNet-1k design 269.5M; neither rounds to the published figure.
PUBLISHED_PARAMS_M = {
    'mask_rcnn_mvitv2_t_3x.py': 44, 'cascade_mask_rcnn_mvitv2_t_3x.py': 76,
    'cascade_mask_rcnn_mvitv2_s_3x.py': 87, 'cascade_mask_rcnn_mvitv2_b_3x.py': 103,
    'cascade_mask_rcnn_mvitv2_h_lsj.py': 718,
}
SYNC_BN = dict(type='SyncBN', requires_grad=True)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def load(name: str) -> Config:
    return zoo.load(name)


def build_on_meta(cfg: Config) -> nn.Module:
    """The full-size model with its real shapes and no storage (MViTv2-H is 0.67 G parameters)."""
    with torch.device('meta'):
        return zoo.build_model(cfg)


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_pipeline(cfg: Config) -> list:
    dataset = cfg.train_dataloader.dataset
    return (dataset.dataset if dataset.type == 'RepeatDataset' else dataset).pipeline


def passes(cfg: Config) -> int:
    """Passes over the training set: epochs times the repeat factor, if any."""
    dataset = cfg.train_dataloader.dataset
    return cfg.train_cfg.max_epochs * (dataset.times if dataset.type == 'RepeatDataset' else 1)


def lr_factors(cfg: Config, epoch_length: int) -> list[float]:
    """The lr multiplier of every training iteration, from the config's schedulers built as the
    runner builds them (epoch-based ones converted where they ask to be) and stepped as its hook
    steps them: iteration-based ones after every iteration, the others after every epoch."""
    optimizer = OptimWrapper(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))
    schedulers = [PARAM_SCHEDULERS.build(copy.deepcopy(s), default_args=dict(optimizer=optimizer,
                                                                              epoch_length=epoch_length))
                  for s in cfg.param_scheduler]
    factors = []
    for _ in range(cfg.train_cfg.max_epochs):
        for _ in range(epoch_length):
            factors.append(optimizer.param_groups[0]['lr'])
            optimizer.step()  # the schedulers count optimizer steps
            for scheduler in schedulers:
                if not scheduler.by_epoch:
                    scheduler.step()
        for scheduler in schedulers:
            if scheduler.by_epoch:
                scheduler.step()
    return factors


# -- the recipe as configured --------------------------------------------------------------------
@pytest.mark.parametrize('name', PAPER)
def test_detectron2_recipe(name):
    arch, drop_path, release, epochs, lr, lsj = PAPER[name]
    cfg = load(name)
    assert cfg.custom_imports == dict(imports=['mmpvt'], allow_failed_imports=False)
    backbone = cfg.model.backbone
    built = zoo.backbone_of(cfg)  # the variant's defaults filled in from its table
    assert (backbone.type, backbone.arch) == ('MViTv2', arch)
    assert zoo.drop_path_of(built) == pytest.approx(drop_path)
    assert (built.window_size, backbone.out_indices, backbone.frozen_stages) == (56, (0, 1, 2, 3), -1)
    assert backbone.with_cp == (arch == 'huge')  # detectron2's use_act_checkpoint
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=f'{RELEASE}{release}.pyth')
    width = ARCHS[arch][0]
    assert cfg.model.neck.in_channels == [width, 2 * width, 4 * width, 8 * width]

    # AdamW with AMP, no layer decay; no weight decay on norm layers and position tables.
    wrapper = cfg.optim_wrapper
    assert wrapper.type == 'AmpOptimWrapper' and 'constructor' not in wrapper
    assert wrapper.optimizer == dict(type='AdamW', lr=lr, betas=(0.9, 0.999), weight_decay=0.1)
    assert wrapper.paramwise_cfg == dict(norm_decay_mult=0., custom_keys={
        'pos_embed': dict(decay_mult=0.), 'rel_pos_h': dict(decay_mult=0.), 'rel_pos_w': dict(decay_mult=0.)})
    # detectron2's batch of 64, as the lr's reference batch.
    assert cfg.auto_scale_lr.base_batch_size == 64 and 64 % cfg.train_dataloader.batch_size == 0
    assert passes(cfg) == epochs

    # Data: multi-scale with the DETR-style crop, or large-scale jitter with square padding;
    # testing at 1333x800 for all, as detectron2's.
    pipeline = train_pipeline(cfg)
    assert next(t for t in pipeline if t.type == 'LoadAnnotations').with_mask
    assert next(t for t in pipeline if t.type == 'RandomFlip').prob == 0.5
    pads = cfg.model.data_preprocessor.get('batch_augments')
    if lsj:
        resize, crop = (t for t in pipeline if t.type in ('RandomResize', 'RandomCrop'))
        assert (resize.scale, resize.ratio_range, crop.crop_size) == ((1024, 1024), (0.1, 2.0), (1024, 1024))
        assert pads == [dict(type='BatchFixedSizePad', size=(1024, 1024), pad_mask=True)]
    else:
        (choice,) = (t for t in pipeline if t.type == 'RandomChoice')
        (multi_scale,), (detr_resize, detr_crop, detr_multi_scale) = choice.transforms
        scales = [(s, 1333) for s in range(480, 801, 32)]
        assert multi_scale.scales == detr_multi_scale.scales == scales
        assert detr_resize.scales == [(400, 1333), (500, 1333), (600, 1333)]
        assert (detr_crop.crop_type, detr_crop.crop_size) == ('absolute_range', (384, 600))
        assert pads is None
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        (resize,) = (t for t in loader.dataset.pipeline if t.type == 'Resize')
        assert (resize.scale, resize.keep_ratio) == ((1333, 800), True)

    # Heads: Cascade with detectron2's 2-conv RPN, 4conv1fc box heads and mask head with SyncBN;
    # Mask R-CNN with mmdet's (and detectron2's) standard 1-conv RPN and 2fc head, no norm.
    heads = cfg.model.roi_head.bbox_head
    if name.startswith('cascade'):
        assert cfg.model.rpn_head.num_convs == 2
        assert len(heads) == 3
        for head in heads:
            assert head.type == 'Shared4Conv1FCBBoxHead' and head.norm_cfg == SYNC_BN
            assert (head.conv_out_channels, head.fc_out_channels) == (256, 1024) and head.reg_class_agnostic
        assert [h.bbox_coder.target_stds[0] for h in heads] == [0.1, 0.05, 0.033]
        assert [s.assigner.pos_iou_thr for s in cfg.model.train_cfg.rcnn] == [0.5, 0.6, 0.7]
        assert cfg.model.roi_head.mask_head.norm_cfg == SYNC_BN
    else:
        assert cfg.model.rpn_head.get('num_convs', 1) == 1
        assert heads.type == 'Shared2FCBBoxHead' and 'norm_cfg' not in heads
        assert 'norm_cfg' not in cfg.model.roi_head.mask_head


@pytest.mark.parametrize('name', PAPER)
@pytest.mark.parametrize('epoch_length', [37, 101])
def test_lr_steps_where_detectron2_steps(name, epoch_length):
    """The schedule run through, at two epoch lengths (batch sizes): the linear warm-up from
    0.001 over 250 iterations (mmengine's reaches 1 at the last of them), then x0.1 at
    detectron2's two steps, each at the same fraction of the training as detectron2's (to the
    iteration), and nothing else."""
    cfg = load(name)
    total, steps = D2_SCHEDULES[PAPER[name][3]]
    factors = lr_factors(cfg, epoch_length)
    n = len(factors)
    assert n == cfg.train_cfg.max_epochs * epoch_length
    for i in (0, 100, 249):
        assert factors[i] == pytest.approx(0.001 + 0.999 * i / 249)
    changes = [i for i in range(250, n) if not math.isclose(factors[i], factors[i - 1], rel_tol=1e-9)]
    assert len(changes) == 2, changes
    for i, step in zip(changes, steps):
        assert abs(i - n * step / total) <= 1, (i, n * step / total)
    assert factors[changes[0]] == pytest.approx(0.1) and factors[-1] == pytest.approx(0.01)


@pytest.mark.parametrize('name', OTHER_METHODS)
def test_other_methods_take_the_zoo_recipes_with_mvitv2_t(name):
    cfg = load(name)
    backbone = cfg.model.backbone
    built = zoo.backbone_of(cfg)
    assert (backbone.type, backbone.arch, zoo.drop_path_of(built), built.window_size) == (
        'MViTv2', 'tiny', pytest.approx(0.2), 56)
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=f'{RELEASE}MViTv2_T_in1k.pyth')
    zoo.check_zoo_recipe(cfg, name.split('_mvitv2')[0])
    assert 'paramwise_cfg' not in cfg.optim_wrapper
    zoo.check_fpn_wiring(cfg, name.split('_mvitv2')[0], [96, 192, 384, 768])


# -- every model builds ----------------------------------------------------------------------------
@pytest.mark.parametrize('name', ALL)
def test_full_size_model_builds(name):
    cfg = load(name)
    model = build_on_meta(cfg)
    backbone = model.backbone
    arch = PAPER[name][0] if name in PAPER else 'tiny'
    width, depths = ARCHS[arch]
    assert type(backbone) is MViTv2
    assert backbone.arch_settings['embed_dims'] == (width, 2 * width, 4 * width, 8 * width)
    assert backbone.arch_settings['depths'] == depths
    assert tuple(model.neck.in_channels) == backbone.out_channels
    unbuilt_norms = sum(2 * width * 2 ** level for level in range(4) if level not in backbone.out_indices)
    assert numel(backbone) == BACKBONE_PARAMS[arch] - unbuilt_norms
    assert backbone.with_cp == (arch == 'huge')
    if name in PUBLISHED_PARAMS_M:
        # detectron2's Cascade predicts masks at the last stage only; mmdet's Cascade Mask R-CNN
        # trains a mask head per stage, two more than the published count holds.
        heads = model.roi_head.mask_head
        extra = sum(numel(h) for h in heads[1:]) if isinstance(heads, nn.ModuleList) else 0
        assert round((numel(model) - extra) / 1e6) == PUBLISHED_PARAMS_M[name]
    if name.startswith('cascade'):
        for head in [*model.roi_head.bbox_head, *model.roi_head.mask_head]:
            assert any(isinstance(m, nn.SyncBatchNorm) for m in head.modules())


def test_optimizer_exempts_norms_and_position_tables_from_weight_decay():
    """Every parameter of the built Cascade model: lr 1.6e-4, weight decay 0.1 except on the
    norm layers (backbone LayerNorms, the heads' SyncBN) and the relative-position tables."""
    cfg = load('cascade_mask_rcnn_mvitv2_t_3x.py')
    model = build_on_meta(cfg)
    wrapper = build_optim_wrapper(model, dict(cfg.optim_wrapper, type='OptimWrapper'))  # AMP needs a GPU
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    norms = {f'{m}.{p}' for m, module in model.named_modules() if isinstance(module, NORMS)
             for p, _ in module.named_parameters(recurse=False)}
    kinds = {'norm': 0, 'rel_pos': 0, 'decayed': 0}
    for pname, param in model.named_parameters():
        group = group_of[id(param)]
        assert group['lr'] == 1.6e-4, pname
        kind = ('norm' if pname in norms else
                'rel_pos' if pname.endswith(('attn.rel_pos_h', 'attn.rel_pos_w')) else 'decayed')
        assert group['weight_decay'] == (0.1 if kind == 'decayed' else 0.), pname
        kinds[kind] += 1
    assert sum(kinds.values()) == len(list(model.parameters()))
    # T: 10 blocks x 2 tables, norms in the backbone and in every box and mask head
    assert kinds['rel_pos'] == 20 and kinds['decayed'] > 0
    assert any(n.startswith('roi_head.bbox_head.2.') for n in norms) and any('mask_head' in n for n in norms)


# -- one batch through each method, with a tiny MViTv2 in the same wiring ------------------------
TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 2, 2, 2), num_heads=(1, 1, 2, 2))


def tiny(name: str, root: Path) -> Config:
    """The config at CPU size: a 16-wide MViTv2 (windows of 8 tokens in stage 1), small images,
    fewer boxes, and no ImageNet weights through the documented override."""
    cfg = load(name)
    if cfg.train_dataloader.dataset.type == 'RepeatDataset':
        cfg.train_dataloader.dataset = cfg.train_dataloader.dataset.dataset  # one batch: no repeats
    zoo.set_data_root(cfg, root)
    channels = [TINY['embed_dims'][i] for i in cfg.model.backbone.out_indices]
    cfg.model.backbone.arch = dict(TINY)  # a dict in place of the variant's name
    # --cfg-options model.backbone.init_cfg=None, the documented way to train from scratch
    cfg.merge_from_dict({'model.backbone.window_size': 8, 'model.backbone.init_cfg': None,
                         'model.neck.in_channels': channels})
    zoo.cpu_sized(cfg)
    return cfg


@pytest.mark.parametrize('name, with_masks', [('mask_rcnn_mvitv2_t_3x.py', True),
                                              ('retinanet_mvitv2_t.py', False)])
def test_detector_trains_and_predicts_one_batch(name, with_masks, coco_root, fast_init):
    cfg = tiny(name, coco_root)
    assert cfg.model.backbone.arch['embed_dims'] == TINY['embed_dims']  # the small arch
    zoo.detector_trains_and_predicts(cfg, with_masks)


def test_segmentor_trains_and_predicts_one_batch(ade_root, fast_init):
    cfg = tiny('fpn_mvitv2_t_ade20k.py', ade_root)
    zoo.segmentor_trains_and_predicts(cfg)
