"""The ViTDet configs: the paper's recipe as configured, every model built, one batch per method.

The recipe facts (Li et al. 2022, detectron2's projects/ViTDet configs) are written out here:
LSJ at 1024, AdamW lr 1e-4 / wd 0.1 at a batch of 64 with AMP, layer decay 0.7 / 0.8 / 0.9,
drop path 0.1 / 0.4 / 0.5, 100 / 100 / 75 epochs for B / L / H, no weight decay on norms and
the position embedding except for H, a 2-conv RPN and 4conv1fc box / mask heads with channel
LayerNorm, MAE weights. The full-size models are built on the meta device (no memory, no
initialisation), the one-batch runs use a tiny ViT through the same wiring.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import zoo
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from torch import nn

from mmpvt.models import ViTDet

# The zoo's fixtures (fake COCO / ADE20K layouts, package bases, fast initialisation).

MAE = 'https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MAE/'
# config: arch, embed dims, depth, drop path, layer decay, MAE file (mae_pretrain_<...>.pth), epochs,
# whether norms and pos_embed are exempt from weight decay
PAPER = {
    'mask_rcnn_vitdet_b_100e.py': ('base', 768, 12, 0.1, 0.7, 'vit_base', 100, True),
    'cascade_mask_rcnn_vitdet_b_100e.py': ('base', 768, 12, 0.1, 0.7, 'vit_base', 100, True),
    'cascade_mask_rcnn_vitdet_l_100e.py': ('large', 1024, 24, 0.4, 0.8, 'vit_large', 100, True),
    'cascade_mask_rcnn_vitdet_h_100e.py': ('huge', 1280, 32, 0.5, 0.9, 'vit_huge_p14to16', 75, False),
}
OTHER_METHODS = ['retinanet_vitdet_b.py', 'fpn_vitdet_b_ade20k.py']
ALL = [*PAPER, *OTHER_METHODS]
# Parameters of backbone + simple pyramid (detectron2's ViT + SimpleFeaturePyramid).
BACKBONE_AND_NECK = {'base': 91_449_024, 'large': 311_237_888, 'huge': 641_756_992}
LN = dict(type='LayerNorm2d', eps=1e-6, requires_grad=True)


def load(name: str) -> Config:
    return zoo.load(name)


def build_on_meta(cfg: Config) -> nn.Module:
    """The full-size model with its real shapes and no storage (ViT-H is 0.6 G parameters)."""
    with torch.device('meta'):
        return zoo.build_model(cfg)


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- the recipe as configured --------------------------------------------------------------------
@pytest.mark.parametrize('name', PAPER)
def test_paper_recipe(name):
    arch, _, _, drop_path, rate, mae, epochs, exempt = PAPER[name]
    cfg = load(name)
    assert cfg.custom_imports == dict(imports=['mmpvt'], allow_failed_imports=False)
    backbone = cfg.model.backbone
    built = zoo.backbone_of(cfg)  # the variant's defaults filled in from its table
    assert (backbone.type, backbone.arch) == ('ViTDet', arch)
    assert zoo.drop_path_of(built) == pytest.approx(drop_path)
    assert (backbone.img_size, built.window_size) == (1024, 14)
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=f'{MAE}mae_pretrain_{mae}.pth')

    wrapper = cfg.optim_wrapper
    assert wrapper.type == 'AmpOptimWrapper'
    assert wrapper.constructor == 'LayerDecayOptimWrapperConstructor'
    assert wrapper.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1)
    assert wrapper.paramwise_cfg.layer_decay_rate == rate
    if exempt:
        assert wrapper.paramwise_cfg.norm_decay_mult == 0.
        assert tuple(wrapper.paramwise_cfg.no_decay_names) == ('pos_embed', )
    else:
        assert set(wrapper.paramwise_cfg) == {'layer_decay_rate'}

    # 25 passes over the set repeated `times` times; warm-up and steps scale with the epochs.
    train = cfg.train_dataloader
    assert train.dataset.type == 'RepeatDataset'
    assert train.dataset.times * cfg.train_cfg.max_epochs == epochs
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.by_epoch) == ('LinearLR', 0.001, False)
    assert warmup.end == 250 * epochs // 100
    assert steps.type == 'MultiStepLR' and steps.end == cfg.train_cfg.max_epochs
    assert [round(m / cfg.train_cfg.max_epochs, 2) for m in steps.milestones] == [0.88, 0.96]
    assert cfg.auto_scale_lr.base_batch_size == 64 and 64 % train.batch_size == 0

    # Large-scale jitter at 1024, square padding in training, testing at the training scale.
    resize, crop = (t for t in train.dataset.dataset.pipeline if t.type in ('RandomResize', 'RandomCrop'))
    assert (resize.scale, resize.ratio_range, crop.crop_size) == ((1024, 1024), (0.1, 2.0), (1024, 1024))
    assert cfg.model.data_preprocessor.batch_augments == [
        dict(type='BatchFixedSizePad', size=(1024, 1024), pad_mask=True)]
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        (resize,) = (t for t in loader.dataset.pipeline if t.type == 'Resize')
        assert (resize.scale, resize.keep_ratio) == ((1024, 1024), True)

    # The paper's heads.
    assert cfg.model.neck.type == 'ViTDetNeck' and cfg.model.rpn_head.num_convs == 2
    heads = cfg.model.roi_head.bbox_head
    heads = heads if isinstance(heads, list) else [heads]
    assert len(heads) == (3 if name.startswith('cascade') else 1)
    for head in heads:
        assert (head.type, head.norm_cfg, head.conv_out_channels) == ('Shared4Conv1FCBBoxHead', LN, 256)
    assert cfg.model.roi_head.mask_head.norm_cfg == LN
    if len(heads) == 3:  # each stage keeps its own box statistics and IoU threshold
        assert [h.bbox_coder.target_stds[0] for h in heads] == [0.1, 0.05, 0.033]
        assert all(h.reg_class_agnostic for h in heads)
        assert [s.assigner.pos_iou_thr for s in cfg.model.train_cfg.rcnn] == [0.5, 0.6, 0.7]


@pytest.mark.parametrize('name', OTHER_METHODS)
def test_other_methods_fine_tune_the_mae_weights_with_layer_decay(name):
    cfg = load(name)
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch) == ('ViTDet', 'base')
    assert zoo.drop_path_of(zoo.backbone_of(cfg)) == pytest.approx(0.1)
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=MAE + 'mae_pretrain_vit_base.pth')
    assert cfg.optim_wrapper.constructor == 'LayerDecayOptimWrapperConstructor'
    assert cfg.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.7


# -- every model builds ----------------------------------------------------------------------------
@pytest.mark.parametrize('name', ALL)
def test_full_size_model_builds(name):
    cfg = load(name)
    model = build_on_meta(cfg)
    backbone = model.backbone
    arch, dims, depth = PAPER[name][:3] if name in PAPER else ('base', 768, 12)
    assert type(backbone) is ViTDet
    assert (backbone.arch_settings['embed_dims'], len(backbone.blocks)) == (dims, depth)
    # The neck takes what the backbone gives (FPN after RetinaNet's stride-4 level is dropped).
    assert tuple(model.neck.in_channels) == backbone.out_channels
    if name in PAPER:
        assert numel(backbone) + numel(model.neck) == BACKBONE_AND_NECK[arch]
        assert backbone.out_channels == (dims // 4, dims // 2, dims, dims)
    if name.startswith('retinanet'):
        assert backbone.out_strides == (8, 16, 32) and not hasattr(backbone, 'scale_x4')


# -- the optimizer wrapper gives the layer-decay scales ------------------------------------------
def expected_layer(name: str, depth: int) -> int:
    """The paper's numbering: embeddings 0, block i is i + 1, the rest depth + 1."""
    if name in ('backbone.pos_embed', ) or name.startswith('backbone.patch_embed.'):
        return 0
    if name.startswith('backbone.blocks.'):
        return int(name.split('.')[2]) + 1
    return depth + 1


@pytest.mark.parametrize('name', ['mask_rcnn_vitdet_b_100e.py', 'cascade_mask_rcnn_vitdet_h_100e.py',
                                  'fpn_vitdet_b_ade20k.py'])
def test_optimizer_follows_the_layer_decay_and_weight_decay_rules(name):
    cfg = load(name)
    model = build_on_meta(cfg)
    wrapper_cfg = copy.deepcopy(cfg.optim_wrapper)
    wrapper_cfg.type = 'OptimWrapper'  # AMP needs a GPU; the parameter groups are the same
    wrapper = build_optim_wrapper(model, wrapper_cfg)

    optimizer = cfg.optim_wrapper.optimizer
    rate = cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    exempt = name != 'cascade_mask_rcnn_vitdet_h_100e.py'
    depth = len(model.backbone.blocks)
    norms = {f'{m}.{p}' if m else p for m, module in model.named_modules()
             if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
             for p, _ in module.named_parameters(recurse=False)}
    assert any('roi_head' in n or 'decode_head' in n for n in norms) or 'ade20k' in name
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    checked = 0
    for pname, param in model.named_parameters():
        group = group_of[id(param)]
        scale = rate ** (depth + 1 - expected_layer(pname, depth))
        assert math.isclose(group['lr'], optimizer.lr * scale, rel_tol=1e-9), pname
        decayed = not exempt or not (pname in norms or pname.endswith('pos_embed'))
        assert group['weight_decay'] == (optimizer.weight_decay if decayed else 0.), pname
        checked += 1
    assert checked == len(list(model.parameters()))
    # spot values: the embeddings at rate ** (depth + 1), the heads at the base lr
    groups = {n: group_of[id(p)] for n, p in model.named_parameters()}
    assert math.isclose(groups['backbone.patch_embed.proj.weight']['lr'], optimizer.lr * rate ** (depth + 1))
    assert groups['backbone.blocks.0.attn.rel_pos_h']['weight_decay'] == optimizer.weight_decay


# -- one batch through each method, with a tiny ViT in the same wiring ---------------------------
TINY = dict(embed_dims=64, depth=4, num_heads=2, global_attn_indexes=(1, 3))


def tiny(name: str, root: Path) -> Config:
    """The config at CPU size: a 64-wide, 4-block ViT (windows of 4), small images, fewer boxes."""
    cfg = load(name)
    if cfg.train_dataloader.dataset.type == 'RepeatDataset':
        cfg.train_dataloader.dataset = cfg.train_dataloader.dataset.dataset  # one batch: no repeats
    zoo.set_data_root(cfg, root)
    indices = cfg.model.backbone.out_indices
    channels = [(16, 32, 64, 64)[i] for i in indices]
    cfg.model.backbone.arch = dict(TINY)  # a dict in place of the base's name
    cfg.merge_from_dict({'model.backbone.img_size': 256, 'model.backbone.window_size': 4,
                         'model.backbone.init_cfg': None, 'model.neck.in_channels': channels})
    zoo.cpu_sized(cfg)
    return cfg


@pytest.mark.parametrize('name, with_masks', [('mask_rcnn_vitdet_b_100e.py', True),
                                              ('retinanet_vitdet_b.py', False)])
def test_detector_trains_and_predicts_one_batch(name, with_masks, coco_root, fast_init):
    cfg = tiny(name, coco_root)
    assert cfg.model.backbone.arch['embed_dims'] == 64  # the small arch
    zoo.detector_trains_and_predicts(cfg, with_masks)


def test_segmentor_trains_and_predicts_one_batch(ade_root, fast_init):
    cfg = tiny('fpn_vitdet_b_ade20k.py', ade_root)
    zoo.segmentor_trains_and_predicts(cfg)
