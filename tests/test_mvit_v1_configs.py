"""The MViT v1 configs: MViT-B-16 in the zoo's RetinaNet, Mask R-CNN (1x, AdamW with layer-wise lr
decay) and Semantic FPN recipes, and the MViTv2 paper's Mask R-CNN 3x baselines with windows;
every model built, one batch per method.

No paper publishes a v1 detector recipe: the layer decay (0.75) is the usual fine-tuning rate of
ViT-B-sized models, stated in configs/_base_/mvitv1.py. The full-size models are built on the
meta device, the one-batch runs use a tiny MViTv1 through the same wiring.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zoo
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

from mmpvt.models import MViTv1

CONFIGS = ['retinanet_mvitv1_b16.py', 'mask_rcnn_mvitv1_b16.py', 'fpn_mvitv1_b16_ade20k.py']
RELEASE = 'https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/imagenet/MVIT_B_16_f292487636.pyth'
# B-16 without the 1000-class head (the official build) plus the output norms of levels 0-2.
B16_PARAMS = 36_213_600
LEVEL_NORM_PARAMS = {0: 2 * 192, 1: 2 * 384, 2: 2 * 768}


@pytest.mark.parametrize('name', CONFIGS)
def test_recipe(name):
    cfg = zoo.load(name)
    backbone = cfg.model.backbone
    built = zoo.backbone_of(cfg)
    assert (backbone.type, backbone.arch, zoo.drop_path_of(built)) == ('MViTv1', 'b16', pytest.approx(0.1))
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=RELEASE)
    zoo.check_zoo_recipe(cfg, name.split('_mvitv1')[0])
    if name.startswith('fpn'):
        assert 'paramwise_cfg' not in cfg.optim_wrapper
    else:
        assert cfg.optim_wrapper.constructor == 'LayerDecayOptimWrapperConstructor'
        assert cfg.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.75
    zoo.check_fpn_wiring(cfg, name.split('_mvitv1')[0], [192, 384, 768, 768])


@pytest.mark.parametrize('name', CONFIGS)
def test_full_size_model_builds(name):
    cfg = zoo.load(name)
    with torch.device('meta'):
        model = zoo.build_model(cfg)
    backbone = model.backbone
    assert type(backbone) is MViTv1 and tuple(model.neck.in_channels) == backbone.out_channels
    norms = sum(n for level, n in LEVEL_NORM_PARAMS.items() if level in backbone.out_indices)
    assert sum(p.numel() for p in backbone.parameters()) == B16_PARAMS + norms


def test_layer_decay_reaches_every_block_and_spares_norms_and_tables():
    """Mask R-CNN: block i's lr is 0.75 ** (17 - (i + 1)) of the base, the embeddings'
    0.75 ** 17, the neck and heads' the base lr; no weight decay on norms, the position table
    and the class token."""
    cfg = zoo.load('mask_rcnn_mvitv1_b16.py')
    with torch.device('meta'):
        model = zoo.build_model(cfg)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    base = 2e-4

    def lr_of(name):
        return group_of[id(params[name])]['lr']
    assert lr_of('backbone.patch_embed.proj.weight') == pytest.approx(base * 0.75 ** 17)
    assert lr_of('backbone.blocks.0.attn.qkv.weight') == pytest.approx(base * 0.75 ** 16)
    assert lr_of('backbone.blocks.15.mlp.fc2.weight') == pytest.approx(base * 0.75)
    assert lr_of('backbone.norm.weight') == pytest.approx(base * 0.75)  # with the last block
    assert lr_of('neck.lateral_convs.0.conv.weight') == pytest.approx(base)
    for name in ('backbone.pos_embed', 'backbone.cls_token', 'backbone.blocks.3.norm1.weight',
                 'backbone.blocks.3.attn.norm_q.bias', 'backbone.scale2_norm.weight'):
        assert group_of[id(params[name])]['weight_decay'] == 0, name
    assert group_of[id(params['backbone.blocks.3.attn.qkv.weight'])]['weight_decay'] == 1e-4


# -- the MViTv2 paper's v1 baselines (its Table 4, Mask R-CNN 3x with windows) ------------------
# config: arch, drop path, ImageNet weights, published parameters (millions, rounded)
BASELINES = {
    'mask_rcnn_mvitv1_t_3x.py': ('tiny', 0.2, None, 46),
    'mask_rcnn_mvitv1_s_3x.py': ('b16', 0.2, RELEASE, 57),
    'mask_rcnn_mvitv1_b_3x.py': ('b24', 0.4, None, 73),
}


@pytest.mark.parametrize('name', BASELINES)
def test_baselines_are_the_mvitv2_recipe_with_v1_in_the_window_design(name):
    """Everything but the backbone is the MViTv2-T Mask R-CNN 3x config's (detectron2's recipe,
    which the paper's table shares); the backbone is v1 with 56-token windows."""
    arch, drop_path, weights, _ = BASELINES[name]
    cfg, v2 = zoo.load(name), zoo.load('mask_rcnn_mvitv2_t_3x.py')
    built = zoo.backbone_of(cfg)
    assert (cfg.model.backbone.type, cfg.model.backbone.arch) == ('MViTv1', arch)
    assert (built.window_size, zoo.drop_path_of(built)) == (56, pytest.approx(drop_path))
    global_kv = [s.kv_stride for s in built.block_specs if s.window_size == 0]
    assert built.cls_token is None and global_kv[:2] == [4, 2]  # detectron2's doubled kv stride
    assert cfg.model.backbone.init_cfg == (dict(type='Pretrained', checkpoint=weights) if weights else None)
    assert cfg.model.neck.in_channels == [192, 384, 768, 768]
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg', 'auto_scale_lr', 'train_dataloader',
                'test_dataloader'):
        assert cfg[key] == v2[key], key
    assert {k: v for k, v in cfg.model.items() if k not in ('backbone', 'neck')} == \
        {k: v for k, v in v2.model.items() if k not in ('backbone', 'neck')}


@pytest.mark.parametrize('name', BASELINES)
def test_baselines_have_the_published_parameter_counts(name):
    """v1 with MViTv2-T / S / B's layouts: the whole Mask R-CNN rounds to the table's count."""
    with torch.device('meta'):
        model = zoo.build_model(zoo.load(name))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == BASELINES[name][3]


# -- one batch through each method, with a tiny MViTv1 in the same wiring ------------------------
TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 2, 2, 1), num_heads=(1, 1, 2, 2))


def tiny(name: str, root: Path) -> Config:
    """The config at CPU size, without ImageNet weights through the documented override."""
    cfg = zoo.load(name)
    zoo.set_data_root(cfg, root)
    widths = (32, 64, 128, 128)  # a stage's map has the next stage's width
    cfg.model.backbone.arch = dict(TINY)
    cfg.merge_from_dict({'model.backbone.init_cfg': None,
                         'model.neck.in_channels': [widths[i] for i in cfg.model.backbone.out_indices]})
    zoo.cpu_sized(cfg)
    return cfg


@pytest.mark.parametrize('name, with_masks', [('mask_rcnn_mvitv1_b16.py', True),
                                              ('retinanet_mvitv1_b16.py', False),
                                              ('mask_rcnn_mvitv1_s_3x.py', True)])
def test_detector_trains_and_predicts_one_batch(name, with_masks, coco_root, fast_init):
    zoo.detector_trains_and_predicts(tiny(name, coco_root), with_masks)


def test_segmentor_trains_and_predicts_one_batch(ade_root, fast_init):
    zoo.segmentor_trains_and_predicts(tiny('fpn_mvitv1_b16_ade20k.py', ade_root))
