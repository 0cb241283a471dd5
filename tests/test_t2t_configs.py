"""The T2T-ViT configs: the zoo's 1x / 40k recipes with layer decay, every model built, one batch
per method.

No detection or segmentation result of T2T-ViT is published, so what is held here is the recipe
as configured: the authors' ImageNet release (T2T-ViT-14 performer tokens, 81.5%; T2T-ViT_t-14
transformer tokens, 81.7%) through ``init_cfg``, the zoo's RetinaNet / Mask R-CNN 1x (AdamW,
12 epochs, steps at 8 and 11, 1333x800, 8 GPUs x 2 images) and Semantic FPN 40k recipes, plus
layer-wise lr decay 0.75 over the 14 blocks with no weight decay on norms and the class token.
The full-size models are built on the meta device (no memory, no initialisation), the one-batch
runs use a tiny T2T-ViT through the same wiring.
"""
from __future__ import annotations

import copy
import math
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml
import zoo
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from torch import nn

from mmpvt.checkpoint import CheckpointError
from mmpvt.models import T2TViT

# The zoo's fixtures (fake COCO / ADE20K layouts, package bases, fast initialisation).

RELEASE = 'https://github.com/yitu-opensource/T2T-ViT/releases/download/main/'
# tag in the config names: arch, the authors' release file, token layers
VARIANTS = {
    't2t_vit_14': ('14', '81.5_T2T_ViT_14.pth.tar', 'performer'),
    't2t_vit_t_14': ('t_14', '81.7_T2T_ViTt_14.pth.tar', 'transformer'),
}
DIMS, DEPTH = 384, 14  # both variants' encoder
LEVEL_CHANNELS = (DIMS // 4, DIMS // 2, DIMS, DIMS)  # strides 4, 8, 16, 32


def config_name(method: str, tag: str) -> str:
    return f'fpn_{tag}_ade20k.py' if method == 'fpn' else f'{method}_{tag}.py'


ALL = [config_name(m, t) for t in VARIANTS for m in ('retinanet', 'mask_rcnn', 'fpn')]


def tag_of(name: str) -> str:
    return max((t for t in VARIANTS if t in name), key=len)


def load(name: str) -> Config:
    return zoo.load(name)


def build_on_meta(cfg: Config) -> nn.Module:
    """The full-size model with its real shapes and no storage."""
    with torch.device('meta'):
        return zoo.build_model(cfg)


# -- the recipe as configured --------------------------------------------------------------------
@pytest.mark.parametrize('name', ALL)
def test_backbone_block_loads_the_release_and_decays_by_layer(name):
    cfg = load(name)
    arch, release, _ = VARIANTS[tag_of(name)]
    assert cfg.custom_imports == dict(imports=['mmpvt'], allow_failed_imports=False)
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch, backbone.img_size) == ('T2TViT', arch, 224)
    assert (backbone.frozen_stages, backbone.with_cp) == (-1, False)
    assert zoo.drop_path_of(zoo.backbone_of(cfg)) == pytest.approx(0.1)
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=RELEASE + release)
    assert 'pretrained' not in cfg.model or cfg.model.pretrained is None
    # RetinaNet's FPN starts at stride 8: the stride-4 level is not built.
    levels = (1, 2, 3) if name.startswith('retinanet') else (0, 1, 2, 3)
    assert tuple(backbone.out_indices) == levels
    assert cfg.model.neck.in_channels == [LEVEL_CHANNELS[i] for i in levels]

    wrapper = cfg.optim_wrapper
    assert (wrapper.type, wrapper.constructor) == ('OptimWrapper', 'LayerDecayOptimWrapperConstructor')
    paramwise = wrapper.paramwise_cfg
    assert set(paramwise) == {'layer_decay_rate', 'norm_decay_mult', 'no_decay_names'}
    assert (paramwise.layer_decay_rate, paramwise.norm_decay_mult) == (0.75, 0.)
    assert tuple(paramwise.no_decay_names) == ('cls_token', )


@pytest.mark.parametrize('tag', VARIANTS)
@pytest.mark.parametrize('method, lr', [('retinanet', 1e-4), ('mask_rcnn', 2e-4)])
def test_1x_detection_recipe(method, lr, tag):
    cfg = load(config_name(method, tag))
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', lr, 1e-4)
    assert set(optimizer) == {'type', 'lr', 'weight_decay'}  # no SGD momentum left over
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.train_cfg.max_epochs == 12
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end, warmup.by_epoch) == ('LinearLR', 0.001, 500, False)
    assert (steps.type, steps.milestones) == ('MultiStepLR', [8, 11])
    resize, flip = cfg.train_dataloader.dataset.pipeline[2:4]
    assert (resize.type, resize.scale, resize.keep_ratio) == ('Resize', (1333, 800), True)
    assert (flip.type, flip.prob) == ('RandomFlip', 0.5)
    assert cfg.val_dataloader.dataset.pipeline[1].scale == (1333, 800)
    assert cfg.data_root == 'data/coco/'
    assert cfg.val_evaluator.ann_file == 'data/coco/annotations/instances_val2017.json'
    if method == 'retinanet':  # P3-P5 from the backbone, P6 and P7 from its last map
        neck = cfg.model.neck
        assert (neck.start_level, neck.add_extra_convs, neck.num_outs) == (0, 'on_input', 5)
    else:
        assert cfg.train_dataloader.dataset.pipeline[1].with_mask


@pytest.mark.parametrize('tag', VARIANTS)
def test_semantic_fpn_recipe(tag):
    cfg = load(config_name('fpn', tag))
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', 2e-4, 1e-4)
    assert set(optimizer) == {'type', 'lr', 'weight_decay'}
    (poly,) = cfg.param_scheduler
    assert (poly.type, poly.power, poly.eta_min, poly.end) == ('PolyLR', 0.9, 0.0, 40000)
    assert (cfg.train_cfg.type, cfg.train_cfg.max_iters) == ('IterBasedTrainLoop', 40000)
    assert cfg.train_dataloader.batch_size == 4 and cfg.auto_scale_lr.base_batch_size == 32
    crop = next(t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomCrop')
    assert crop.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
    resize = next(t for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize')
    assert (resize.scale, resize.keep_ratio) == ((2048, 512), True)
    assert cfg.model.decode_head.num_classes == 150 and cfg.model.decode_head.type == 'FPNHead'
    assert cfg.data_root == 'data/ade/ADEChallengeData2016'


# -- every model builds ----------------------------------------------------------------------------
METAFILE = {Path(m['Config']).name: m for m in
            yaml.safe_load((zoo.CONFIGS / 'metafile.yml').read_text())['Models']}


@pytest.mark.parametrize('name', ALL)
def test_full_size_model_builds_and_counts_as_listed(name):
    cfg = load(name)
    model = build_on_meta(cfg)
    backbone = model.backbone
    assert type(backbone) is T2TViT
    settings = backbone.arch_settings
    assert (settings['embed_dims'], len(backbone.blocks)) == (DIMS, DEPTH)
    assert settings['tokens_type'] == VARIANTS[tag_of(name)][2]
    # The neck takes what the backbone gives, at the strides FPN expects.
    assert tuple(model.neck.in_channels) == backbone.out_channels
    expected_strides = (8, 16, 32) if name.startswith('retinanet') else (4, 8, 16, 32)
    assert backbone.out_strides == expected_strides
    # The parameters the model zoo lists are the built model's trainable ones (the fixed
    # position table and performer projections are buffers).
    entry = METAFILE[name]
    assert entry['Metadata']['Parameters (M)'] == zoo.count_params(model)
    assert entry['Metadata']['Pretrained'] == cfg.model.backbone.init_cfg.checkpoint
    assert 'Results' not in entry  # nothing published to compare a run with


# -- the optimizer wrapper gives the layer-decay scales ------------------------------------------
def expected_layer(name: str) -> int:
    """Layer-decay numbering: the token-to-token module and the class token 0,
    block i is i + 1, what follows the blocks (final norm, pyramid) DEPTH + 1."""
    if name == 'backbone.cls_token' or name.startswith('backbone.tokens_to_token.'):
        return 0
    if name.startswith('backbone.blocks.'):
        return int(name.split('.')[2]) + 1
    return DEPTH + 1


@pytest.mark.parametrize('name', ['mask_rcnn_t2t_vit_14.py', 'retinanet_t2t_vit_t_14.py',
                                  'fpn_t2t_vit_14_ade20k.py'])
def test_optimizer_follows_the_layer_decay_and_weight_decay_rules(name):
    cfg = load(name)
    model = build_on_meta(cfg)
    wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))

    optimizer = cfg.optim_wrapper.optimizer
    rate = cfg.optim_wrapper.paramwise_cfg.layer_decay_rate
    norms = {f'{m}.{p}' if m else p for m, module in model.named_modules()
             if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
             for p, _ in module.named_parameters(recurse=False)}
    assert any(n.startswith('backbone.blocks.') for n in norms)
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    checked = 0
    for pname, param in model.named_parameters():
        group = group_of[id(param)]
        inside = pname.startswith('backbone.')
        scale = rate ** (DEPTH + 1 - expected_layer(pname)) if inside else 1.
        assert math.isclose(group['lr'], optimizer.lr * scale, rel_tol=1e-9), pname
        decayed = not (pname in norms or pname == 'backbone.cls_token')
        assert group['weight_decay'] == (optimizer.weight_decay if decayed else 0.), pname
        checked += 1
    assert checked == len(group_of) == len(list(model.parameters()))
    # spot values: the token-to-token module at rate ** 15, the last block at rate, the class token undecayed
    groups = {n: group_of[id(p)] for n, p in model.named_parameters()}
    first = next(n for n in groups if n.startswith('backbone.tokens_to_token.'))
    assert math.isclose(groups[first]['lr'], optimizer.lr * rate ** (DEPTH + 1))
    last = next(n for n in groups if n.startswith(f'backbone.blocks.{DEPTH - 1}.'))
    assert math.isclose(groups[last]['lr'], optimizer.lr * rate)
    assert groups['backbone.cls_token']['weight_decay'] == 0.


# -- the ImageNet weights, and training without them -----------------------------------------------
@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and an empty hub cache: any download fails."""
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', refuse)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))


def test_the_release_is_fetched_and_from_scratch_is_one_override_away(offline, fast_init):
    cfg = load('mask_rcnn_t2t_vit_t_14.py')
    backbone = zoo.registry(cfg).build(cfg.model.backbone)
    with pytest.raises(CheckpointError) as info:
        backbone.init_weights()
    assert RELEASE + '81.7_T2T_ViTt_14.pth.tar' in str(info.value)
    assert '--cfg-options model.backbone.init_cfg=None' in str(info.value)

    cfg.merge_from_dict({'model.backbone.init_cfg': None})  # --cfg-options model.backbone.init_cfg=None
    backbone = zoo.registry(cfg).build(cfg.model.backbone)
    backbone.init_weights()  # random weights, no download
    assert backbone.init_cfg is None


# -- one batch through each method, with a tiny T2T-ViT in the same wiring -----------------------
def tiny(name: str, root: Path) -> Config:
    """The config at CPU size: a 64-wide, 2-block T2T-ViT with the config's token layers, images
    and crops scaled down 8x, fewer boxes."""
    cfg = load(name)
    zoo.set_data_root(cfg, root)
    tokens_type = VARIANTS[tag_of(name)][2]
    cfg.model.backbone.arch = dict(embed_dims=64, depth=2, num_heads=2, mlp_ratio=2., tokens_type=tokens_type)
    channels = [(16, 32, 64, 64)[i] for i in cfg.model.backbone.out_indices]
    cfg.merge_from_dict({'model.backbone.init_cfg': None, 'model.neck.in_channels': channels})
    zoo.cpu_sized(cfg)
    return cfg


# RetinaNet and Semantic FPN with performer token layers, Mask R-CNN with transformer ones.
@pytest.mark.parametrize('name, with_masks', [('retinanet_t2t_vit_14.py', False),
                                              ('mask_rcnn_t2t_vit_t_14.py', True)])
def test_detector_trains_and_predicts_one_batch(name, with_masks, coco_root, fast_init):
    cfg = tiny(name, coco_root)
    assert cfg.model.backbone.arch['embed_dims'] == 64  # the small arch
    zoo.detector_trains_and_predicts(cfg, with_masks)


def test_segmentor_trains_and_predicts_one_batch(ade_root, fast_init):
    cfg = tiny('fpn_t2t_vit_14_ade20k.py', ade_root)
    zoo.segmentor_trains_and_predicts(cfg)
