"""The model zoo in configs/: every config loads, builds, counts its parameters as published,
carries the published recipe, and trains and predicts one batch on fake COCO / ADE20K data.

Nothing is downloaded: models are built without loading their ImageNet weights (building
does not call ``init_weights``), and where weights are initialised ``init_cfg`` is None.
The one-batch runs use PVTv2-b0 / PVT-Tiny backbones and images scaled down 8x.
"""
from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from zoo import (
    CONFIGS,
    backbone_of,
    build_model,
    count_params,
    cpu_sized,
    detector_trains_and_predicts,
    drop_path_of,
    load,
    segmentor_trains_and_predicts,
    set_data_root,
    walk,
)

import mmpvt  # noqa: F401  (registers PVT and PVTv2)

RELEASE = 'https://github.com/whai362/PVT/releases/download/v2/'

# tag: (type, arch, release file)
BACKBONES = {
    'pvt_t': ('PVT', 'tiny', 'pvt_tiny'),
    'pvt_s': ('PVT', 'small', 'pvt_small'),
    'pvt_m': ('PVT', 'medium', 'pvt_medium'),
    'pvt_l': ('PVT', 'large', 'pvt_large'),
    'pvt_v2_b0': ('PVTv2', 'b0', 'pvt_v2_b0'),
    'pvt_v2_b1': ('PVTv2', 'b1', 'pvt_v2_b1'),
    'pvt_v2_b2': ('PVTv2', 'b2', 'pvt_v2_b2'),
    'pvt_v2_b2_li': ('PVTv2', 'b2_li', 'pvt_v2_b2_li'),
    'pvt_v2_b3': ('PVTv2', 'b3', 'pvt_v2_b3'),
    'pvt_v2_b4': ('PVTv2', 'b4', 'pvt_v2_b4'),
    'pvt_v2_b5': ('PVTv2', 'b5', 'pvt_v2_b5'),
}
BIG = {'pvt_l', 'pvt_v2_b4', 'pvt_v2_b5'}  # lr / 1.4 with 1 image per GPU
NO_DROP_PATH = {'pvt_m', 'pvt_l'}  # the release trains these detectors without stochastic depth

# Whole-model parameters in millions (shared/reference/pvt_facts.md): RetinaNet 1x, Mask R-CNN
# 1x, Semantic FPN.
REFERENCE_PARAMS = {
    'pvt_t': (22.96, 32.88, 16.98),
    'pvt_s': (34.22, 44.14, 28.24),
    'pvt_m': (53.94, 63.86, 47.96),
    'pvt_l': (71.10, 81.02, 65.12),
    'pvt_v2_b0': (12.95, 23.45, 7.55),
    'pvt_v2_b1': (23.75, 33.66, 17.76),
    'pvt_v2_b2': (35.10, 45.02, 29.12),
    'pvt_v2_b2_li': (32.29, 42.21, 26.31),
    'pvt_v2_b3': (54.98, 64.89, 48.99),
    'pvt_v2_b4': (72.29, 82.21, 66.31),
    'pvt_v2_b5': (91.69, 101.61, 85.71),
}
COUNTED = {
    **{f'retinanet_{t}.py': p[0] for t, p in REFERENCE_PARAMS.items()},
    **{f'mask_rcnn_{t}.py': p[1] for t, p in REFERENCE_PARAMS.items()},
    **{f'fpn_{t}_ade20k.py': p[2] for t, p in REFERENCE_PARAMS.items()},
}
RECIPES_3X = {
    'mask_rcnn': ('pvt_v2_b0', 'pvt_v2_b2', 'pvt_v2_b2_li'),
    **{m: ('pvt_v2_b2', 'pvt_v2_b2_li') for m in ('cascade_mask_rcnn', 'atss', 'gfl', 'sparse_rcnn')},
}
EXPECTED = sorted([
    *COUNTED,
    *(f'{m}_{t}_3x.py' for m, tags in RECIPES_3X.items() for t in tags),
    'detr_pvt_s.py', 'deformable_detr_pvt_v2_b2.py', 'upernet_pvt_v2_b2_ade20k.py',
])
# The other families' configs, whose recipes and builds their own files test
# (tests/test_vitdet_configs.py); the zoo's completeness and its listings cover them here.
OTHER_FAMILIES = sorted([
    'mask_rcnn_vitdet_b_100e.py', 'cascade_mask_rcnn_vitdet_b_100e.py', 'cascade_mask_rcnn_vitdet_l_100e.py',
    'cascade_mask_rcnn_vitdet_h_100e.py', 'retinanet_vitdet_b.py', 'fpn_vitdet_b_ade20k.py',
    # tests/test_t2t_configs.py
    'retinanet_t2t_vit_14.py', 'mask_rcnn_t2t_vit_14.py', 'fpn_t2t_vit_14_ade20k.py',
    'retinanet_t2t_vit_t_14.py', 'mask_rcnn_t2t_vit_t_14.py', 'fpn_t2t_vit_t_14_ade20k.py',
    # tests/test_mvit_v1_configs.py
    'retinanet_mvitv1_b16.py', 'mask_rcnn_mvitv1_b16.py', 'fpn_mvitv1_b16_ade20k.py',
    'mask_rcnn_mvitv1_t_3x.py', 'mask_rcnn_mvitv1_s_3x.py', 'mask_rcnn_mvitv1_b_3x.py',
    # tests/test_mvit_configs.py
    'mask_rcnn_mvitv2_t_3x.py', 'cascade_mask_rcnn_mvitv2_t_3x.py', 'cascade_mask_rcnn_mvitv2_s_3x.py',
    'cascade_mask_rcnn_mvitv2_b_3x.py', 'cascade_mask_rcnn_mvitv2_l_lsj.py',
    'cascade_mask_rcnn_mvitv2_h_lsj.py', 'retinanet_mvitv2_t.py', 'mask_rcnn_mvitv2_t.py',
    'fpn_mvitv2_t_ade20k.py',
])


def tag_of(name: str) -> str:
    """The backbone tag in a config name: retinanet_pvt_v2_b2_li.py -> pvt_v2_b2_li."""
    stem = name.removesuffix('.py').removesuffix('_3x').removesuffix('_ade20k')
    return max((t for t in BACKBONES if stem.endswith('_' + t)), key=len)


def to_small_backbone(cfg: Config) -> None:
    """PVTv2-b0 / PVT-Tiny with the same wiring, no pretrained weights, BN instead of SyncBN."""
    backbone = cfg.model.backbone
    if backbone.type == 'PVT':
        backbone.arch = 'tiny'  # the widths of every v1 variant
    elif backbone.arch != 'b0':
        backbone.arch = 'b0'
        wide = {64: 32, 128: 64, 320: 160, 512: 256}  # stage widths of the others -> b0's
        for key in ('neck', 'decode_head'):
            if key in cfg.model and isinstance(cfg.model[key].get('in_channels'), list):
                cfg.model[key].in_channels = [wide[c] for c in cfg.model[key].in_channels]
        if 'auxiliary_head' in cfg.model:
            cfg.model.auxiliary_head.in_channels = wide[cfg.model.auxiliary_head.in_channels]
    backbone.init_cfg = None

    def no_sync_bn(d):
        if d.get('type') == 'SyncBN':
            d['type'] = 'BN'  # SyncBN needs a process group; the runner reverts it the same way

    walk(cfg.model, no_sync_bn)


# -- the zoo is complete ------------------------------------------------------------------------
def test_the_zoo_has_every_published_config():
    present = sorted(p.name for p in CONFIGS.glob('*.py'))
    assert present == sorted(EXPECTED + OTHER_FAMILIES)
    assert (CONFIGS / 'retinanet_pvt_s.py').is_file()  # tools/dist_train.sh configs/retinanet_pvt_s.py 8


@pytest.mark.parametrize('name', EXPECTED)
def test_config_loads_with_the_release_backbone(name):
    cfg = load(name)
    assert cfg.custom_imports == dict(imports=['mmpvt'], allow_failed_imports=False)
    typ, arch, release = BACKBONES[tag_of(name)]
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.arch) == (typ, arch)
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=f'{RELEASE}{release}.pth')
    expected_drop_path = 0.0 if tag_of(name) in NO_DROP_PATH and 'ade20k' not in name else 0.1
    assert drop_path_of(backbone_of(cfg)) == pytest.approx(expected_drop_path)
    assert 'pretrained' not in cfg.model or cfg.model.pretrained is None
    # Standard layouts, so that a dataset elsewhere is only a data_root away.
    if cfg.default_scope == 'mmdet':
        assert cfg.data_root == 'data/coco/'
        assert cfg.train_dataloader.dataset.data_prefix.img == 'train2017/'
        assert cfg.val_dataloader.dataset.ann_file == 'annotations/instances_val2017.json'
        assert cfg.val_evaluator.ann_file == 'data/coco/annotations/instances_val2017.json'
    else:
        assert cfg.data_root == 'data/ade/ADEChallengeData2016'
        assert cfg.train_dataloader.dataset.data_prefix == dict(
            img_path='images/training', seg_map_path='annotations/training')
    # the GPUs x images the lr was published for
    assert cfg.auto_scale_lr.base_batch_size % cfg.train_dataloader.batch_size == 0


@pytest.mark.parametrize('name', EXPECTED)
def test_config_builds_its_model(name, fast_init):
    cfg = load(name)
    model = build_model(cfg)
    backbone = model.backbone
    assert type(backbone).__name__ == cfg.model.backbone.type
    if name in COUNTED:
        assert count_params(model) == pytest.approx(COUNTED[name], abs=0.005)


# -- the published recipes ----------------------------------------------------------------------
@pytest.mark.parametrize('tag', BACKBONES)
@pytest.mark.parametrize('method, lr', [('retinanet', 1e-4), ('mask_rcnn', 2e-4)])
def test_1x_detection_recipe(method, lr, tag):
    cfg = load(f'{method}_{tag}.py')
    big = tag in BIG
    optimizer = cfg.optim_wrapper.optimizer
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    assert (optimizer.type, optimizer.weight_decay) == ('AdamW', 1e-4)
    assert optimizer.lr == pytest.approx(lr / 1.4 if big else lr)
    assert set(optimizer) == {'type', 'lr', 'weight_decay'}  # no SGD momentum left over
    assert cfg.train_dataloader.batch_size == (1 if big else 2)
    assert cfg.auto_scale_lr.base_batch_size == (8 if big else 16)  # 8 GPUs
    assert cfg.train_cfg.max_epochs == 12
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end, warmup.by_epoch) == ('LinearLR', 0.001, 500, False)
    assert (steps.type, steps.milestones) == ('MultiStepLR', [8, 11])
    resize, flip = cfg.train_dataloader.dataset.pipeline[2:4]
    assert (resize.type, resize.scale, resize.keep_ratio) == ('Resize', (1333, 800), True)
    assert (flip.type, flip.prob) == ('RandomFlip', 0.5)
    assert cfg.val_dataloader.dataset.pipeline[1].scale == (1333, 800)
    if method == 'retinanet':
        assert cfg.model.neck.start_level == 1 and cfg.model.neck.add_extra_convs == 'on_input'


@pytest.mark.parametrize('tag', BACKBONES)
def test_semantic_fpn_recipe(tag):
    cfg = load(f'fpn_{tag}_ade20k.py')
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', 2e-4, 1e-4)
    assert set(optimizer) == {'type', 'lr', 'weight_decay'}
    (poly,) = cfg.param_scheduler
    assert (poly.type, poly.power, poly.eta_min, poly.end) == ('PolyLR', 0.9, 0.0, 40000)
    assert (cfg.train_cfg.type, cfg.train_cfg.max_iters) == ('IterBasedTrainLoop', 40000)
    assert cfg.train_dataloader.batch_size == 4 and cfg.auto_scale_lr.base_batch_size == 32
    crop = next(t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomCrop')
    assert crop.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
    # Test: keep the ratio, short side 512 with the long side at most 2048, pad to 32.
    resize = next(t for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize')
    assert (resize.scale, resize.keep_ratio) == ((2048, 512), True)
    assert cfg.model.data_preprocessor.test_cfg == dict(size_divisor=32)
    assert cfg.model.decode_head.num_classes == 150 and cfg.model.decode_head.type == 'FPNHead'
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'  # the paper's head, kept as shipped


@pytest.mark.parametrize('name', [n for n in EXPECTED if n.endswith('_3x.py')])
def test_3x_recipe(name):
    cfg = load(name)
    assert cfg.train_cfg.max_epochs == 36
    assert cfg.param_scheduler[-1].milestones == [27, 33]
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    choice = cfg.train_dataloader.dataset.pipeline[3]
    assert choice.type == 'RandomChoice'
    crop = choice.transforms[1][1]
    assert (crop.type, crop.crop_size) == ('RandomCrop', (384, 600))
    assert [s[0] for s in choice.transforms[0][0].scales] == list(range(480, 801, 32))
    optimizer = cfg.optim_wrapper.optimizer
    if name.startswith('sparse_rcnn'):
        assert (optimizer.lr, optimizer.weight_decay) == (2.5e-5, 1e-4)
        assert cfg.model.rpn_head.num_proposals == 300
    else:
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
        assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', 1e-4, 0.05)
        assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {
            'norm': dict(decay_mult=0.), 'pos_embed': dict(decay_mult=0.)}
        masks = name.startswith(('mask_rcnn', 'cascade'))
        assert cfg.train_dataloader.dataset.pipeline[1].get('with_mask', False) == masks


def test_3x_no_weight_decay_on_norms(fast_init):
    """The paramwise rule reaches every LayerNorm of the backbone and nothing else of it."""
    from mmengine.optim import build_optim_wrapper

    cfg = load('mask_rcnn_pvt_v2_b0_3x.py')
    model = build_model(cfg)
    # AmpOptimWrapper needs a GPU; the parameter groups are the same.
    wrapper = build_optim_wrapper(model, dict(cfg.optim_wrapper, type='OptimWrapper'))
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    for name, module in model.backbone.named_modules():
        for param in module.parameters(recurse=False):
            expected = 0.0 if isinstance(module, torch.nn.LayerNorm) else 0.05
            assert decay[id(param)] == expected, name


def test_detr_recipe():
    cfg = load('detr_pvt_s.py')
    assert cfg.model.backbone.out_indices == (3,) and cfg.model.neck.in_channels == [512]
    assert cfg.train_cfg.max_epochs == 50 and cfg.param_scheduler[0].milestones == [33]
    resize = cfg.train_dataloader.dataset.pipeline[2]
    assert resize.scales == [(1333, s) for s in range(640, 801, 32)]
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys.backbone.lr_mult == 0.1


def test_from_scratch_is_one_override_away(fast_init):
    cfg = load('retinanet_pvt_v2_b0.py')
    cfg.merge_from_dict({'model.backbone.init_cfg': None})  # --cfg-options model.backbone.init_cfg=None
    model = build_model(cfg)
    model.init_weights()  # no download
    assert model.backbone.init_cfg is None


def test_an_unreachable_url_names_itself_and_the_override(tmp_path, monkeypatch, fast_init):
    from mmpvt.checkpoint import CheckpointError

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    model = build_model(load('retinanet_pvt_v2_b0.py'))
    with pytest.raises(CheckpointError) as info:
        model.backbone.init_weights()
    assert f'{RELEASE}pvt_v2_b0.pth' in str(info.value)
    assert '--cfg-options model.backbone.init_cfg=None' in str(info.value)


def prepare(name: str, root: Path) -> Config:
    cfg = load(name)
    set_data_root(cfg, root)
    to_small_backbone(cfg)
    cpu_sized(cfg)
    if 'num_queries' in cfg.model:
        cfg.model.num_queries = min(cfg.model.num_queries, 100)
    if 'num_proposals' in cfg.model.get('rpn_head', {}):
        cfg.model.rpn_head.num_proposals = 100
    return cfg


DETECTION_FAMILIES = [
    # config, predicts masks
    ('retinanet_pvt_v2_b0.py', False),
    ('retinanet_pvt_t.py', False),
    ('mask_rcnn_pvt_v2_b0.py', True),
    ('mask_rcnn_pvt_v2_b0_3x.py', True),
    ('cascade_mask_rcnn_pvt_v2_b2_3x.py', True),
    ('atss_pvt_v2_b2_3x.py', False),
    ('gfl_pvt_v2_b2_3x.py', False),
    ('sparse_rcnn_pvt_v2_b2_3x.py', False),
    ('detr_pvt_s.py', False),
    ('deformable_detr_pvt_v2_b2.py', False),
]


@pytest.mark.parametrize('name, with_masks', DETECTION_FAMILIES)
def test_detector_trains_and_predicts_one_batch(name, with_masks, coco_root, fast_init):
    detector_trains_and_predicts(prepare(name, coco_root), with_masks)


@pytest.mark.parametrize('name', ['fpn_pvt_v2_b0_ade20k.py', 'fpn_pvt_t_ade20k.py',
                                  'upernet_pvt_v2_b2_ade20k.py'])
def test_segmentor_trains_and_predicts_one_batch(name, ade_root, fast_init):
    segmentor_trains_and_predicts(prepare(name, ade_root))


def test_real_scale_pipelines(coco_root, ade_root):
    """The shipped pipelines at their published sizes (no model), on the fake datasets."""
    def sample(name, root, split='train'):
        cfg = load(name)
        set_data_root(cfg, root)
        loader = dict(cfg[f'{split}_dataloader'], num_workers=0, persistent_workers=False)
        init_default_scope(cfg.default_scope)
        return Runner.build_dataloader(dict(loader, batch_size=1)).dataset[0]

    img = sample('retinanet_pvt_s.py', coco_root)['inputs']
    assert max(img.shape[1:]) == 1067 and min(img.shape[1:]) == 800  # 160x120 to short side 800
    for _ in range(3):
        img = sample('atss_pvt_v2_b2_3x.py', coco_root)['inputs']
        assert 480 <= min(img.shape[1:]) <= 800 and max(img.shape[1:]) <= 1333
    img = sample('mask_rcnn_pvt_v2_b2.py', coco_root, 'val')['inputs']
    assert img.shape[1:] == (800, 1067)
    img = sample('fpn_pvt_v2_b2_ade20k.py', ade_root, 'val')['inputs']
    assert img.shape[1:] == (512, 683)  # short side 512, ratio kept; padding happens in the model


# -- documentation ------------------------------------------------------------------------------
UNPUBLISHED = {'mask_rcnn_pvt_v2_b2_li_3x.py', 'deformable_detr_pvt_v2_b2.py', 'upernet_pvt_v2_b2_ade20k.py',
               'retinanet_vitdet_b.py', 'fpn_vitdet_b_ade20k.py',
               # no detection or segmentation result of T2T-ViT is published
               'retinanet_t2t_vit_14.py', 'mask_rcnn_t2t_vit_14.py', 'fpn_t2t_vit_14_ade20k.py',
               'retinanet_t2t_vit_t_14.py', 'mask_rcnn_t2t_vit_t_14.py', 'fpn_t2t_vit_t_14_ade20k.py',
               # MViTv2-T in the zoo's 1x / 40k recipes: beyond detectron2's release
               'retinanet_mvitv2_t.py', 'mask_rcnn_mvitv2_t.py', 'fpn_mvitv2_t_ade20k.py',
               # no MViT v1 detector or segmentor recipe is published
               'retinanet_mvitv1_b16.py', 'mask_rcnn_mvitv1_b16.py', 'fpn_mvitv1_b16_ade20k.py'}


def test_readme_and_metafile_list_every_config():
    readme = (CONFIGS / 'README.md').read_text()
    meta = yaml.safe_load((CONFIGS / 'metafile.yml').read_text())
    models = meta['Models']
    assert sorted(Path(m['Config']).name for m in models) == sorted(EXPECTED + OTHER_FAMILIES)
    for model in models:
        name = Path(model['Config']).name
        assert f'[{name}]' in readme or f'`{name}`' in readme, name
        assert model['Config'] == f'configs/{name}'
        if name in COUNTED:
            assert model['Metadata']['Parameters (M)'] == COUNTED[name]
        assert bool(model.get('Results')) == (name not in UNPUBLISHED), name


def test_readme_and_metafile_list_the_same_trained_weights():
    """mmdet's published RetinaNet checkpoints, each with the AP mmdet published for it and the
    paper's, in the index and in the README's table; every other model has none."""
    readme = (CONFIGS / 'README.md').read_text()
    models = yaml.safe_load((CONFIGS / 'metafile.yml').read_text())['Models']
    with_weights = [m for m in models if m.get('Weights')]
    assert sorted(m['Name'] for m in with_weights) == sorted(
        [f'retinanet_pvt_{v}' for v in 'tsm'] + [f'retinanet_pvt_v2_b{k}' for k in range(6)])
    import mmdet  # its installed metafile is the source the index names
    source = Path(mmdet.__file__).parent / '.mim' / 'configs' / 'pvt' / 'metafile.yml'
    published = {m['Name']: m for m in yaml.safe_load(source.read_text())['Models']}
    for model in with_weights:
        name, url = Path(model['Config']).name, model['Weights']
        prefix = 'https://github.com/open-mmlab/mmdetection/blob/v3.3.0/configs/pvt/metafile.yml ('
        assert model['Metadata']['Weights Source'].startswith(prefix)
        theirs = published[model['Metadata']['Weights Source'][len(prefix):-1]]
        assert url == theirs['Weights']
        assert model['Metadata']['Weights Results'] == theirs['Results']
        own = model['Metadata']['Weights Results'][0]['Metrics']['box AP']
        paper = model['Results'][0]['Metrics']['box AP']
        row = f'| [{name}]({name}) | [{url.rsplit("/", 1)[-1]}]({url}) | {own} | {paper} |'
        assert row in readme, row
    assert readme.count('https://download.openmmlab.com/') == len(with_weights)


def test_every_model_lists_its_measured_parameters_and_flops():
    """Parameters (M) of the built model, and FLOPs (G) of one forward pass of the whole model
    up to the heads' raw outputs at FLOPs Input, the config's test size."""
    for model in yaml.safe_load((CONFIGS / 'metafile.yml').read_text())['Models']:
        meta = model['Metadata']
        assert meta['Parameters (M)'] > 0 and meta['FLOPs (G)'] > 0, model['Name']
        assert re.fullmatch(r'\d+x\d+', meta['FLOPs Input']), model['Name']


@pytest.mark.slow
@pytest.mark.parametrize('name', ['retinanet_pvt_v2_b0', 'mask_rcnn_pvt_t', 'fpn_pvt_v2_b0_ade20k',
                                  'sparse_rcnn_pvt_v2_b2_li_3x'])
def test_the_index_holds_what_get_flops_measures(name):
    """The index's FLOPs and parameters are tools/analysis/get_flops.py's for the config."""
    import subprocess
    import sys
    meta = next(m for m in yaml.safe_load((CONFIGS / 'metafile.yml').read_text())['Models']
                if m['Name'] == name)['Metadata']
    out = subprocess.run([sys.executable, str(CONFIGS.parent / 'tools' / 'analysis' / 'get_flops.py'),
                          str(CONFIGS / f'{name}.py'), '--cfg-options', 'model.backbone.init_cfg=None'],
                         capture_output=True, text=True, check=True).stdout
    assert f'(padded from {meta["FLOPs Input"]})' in out
    row = next(line for line in out.splitlines() if line.startswith('| model |')).split('|')
    assert round(int(row[4]) / 1e9, 1) == meta['FLOPs (G)']
    assert round(int(row[6]) / 1e6, 2) == meta['Parameters (M)']


# -- one source for each default: the variant tables ----------------------------------------------
FAMILY_BASES = ['pvt.py', 'mvitv2.py', 'vitdet.py', 't2t_vit.py']
VARIANT_DEFAULTS = ('drop_path_rate', 'window_size')


def family_class(name: str):
    from mmpvt.registry import MODELS
    return MODELS.get(name)


@pytest.mark.parametrize('base', FAMILY_BASES)
def test_family_blocks_leave_the_variant_defaults_to_the_table(base):
    """configs/_base_/<family>.py names no drop path or window: a config that changes only the
    arch gets that variant's (a pinned 0.2 trained MViTv2-B, whose rate is 0.4, at 0.2)."""
    block = Config.fromfile(str(CONFIGS / '_base_' / base))
    backbone = block[base.removesuffix('.py')].backbone
    assert not set(VARIANT_DEFAULTS) & set(backbone), (base, dict(backbone))


@pytest.mark.parametrize('name', sorted(EXPECTED + OTHER_FAMILIES))
def test_every_config_trains_with_its_variants_stochastic_depth(name):
    """The rate the built backbone trains with is the variant table's, or what the config
    itself says (PVT-M/L detectors: none, as released)."""
    cfg = load(name)
    backbone = cfg.model.backbone
    built = backbone_of(cfg)
    table = built.arch_settings['drop_path_rate']
    expected = backbone.get('drop_path_rate', table)
    assert drop_path_of(built) == pytest.approx(expected), (name, table)
    if 'drop_path_rate' in backbone:
        assert expected != table, f'{name} restates its variant\'s drop path ({table})'
    if hasattr(built, 'window_size'):
        assert built.window_size == backbone.get('window_size', built.arch_settings['window_size'])


@pytest.mark.parametrize('spec, drop_path, window', [
    # detectron2's COCO values and the ViTDet paper's, stated here independently of the tables
    (dict(type='MViTv2', arch='base'), 0.4, 56), (dict(type='MViTv2', arch='huge'), 0.6, 56),
    (dict(type='MViTv2', arch='tiny'), 0.2, 56), (dict(type='ViTDet', arch='large'), 0.4, 14),
    (dict(type='ViTDet', arch='huge'), 0.5, 14), (dict(type='ViTDet', arch='base'), 0.1, 14),
    (dict(type='PVTv2', arch='b2'), 0.1, None), (dict(type='T2TViT', arch='14'), 0.1, None),
])
def test_a_backbone_naming_only_its_arch_gets_the_papers_defaults(spec, drop_path, window):
    built = backbone_of(Config(dict(model=dict(backbone=spec))))
    assert drop_path_of(built) == pytest.approx(drop_path)
    assert getattr(built, 'window_size', None) == window


def release_of(backbone) -> str | None:
    """The variant table's release URL for a config's backbone."""
    return family_class(backbone.type).arch_zoo[backbone.arch].get('pretrained')


@pytest.mark.parametrize('name', sorted(EXPECTED + OTHER_FAMILIES))
def test_configs_load_the_release_their_variant_table_names(name):
    """Or no weights where none were released (MViTv1-T and B-24)."""
    backbone = load(name).model.backbone
    release = release_of(backbone)
    assert backbone.init_cfg == (dict(type='Pretrained', checkpoint=release) if release else None)


def test_metafile_and_readme_give_the_variant_tables_release_urls():
    meta = yaml.safe_load((CONFIGS / 'metafile.yml').read_text())
    for model in meta['Models']:
        backbone = load(Path(model['Config']).name).model.backbone
        assert model['Metadata'].get('Pretrained') == release_of(backbone), model['Name']
    # What each variant table names: the file its configs load, and for MViT-B-16 also the page
    # of the official zoo's file (a Google Drive page, no direct download).
    releases = {url for cls in ('PVT', 'PVTv2', 'MViTv1', 'MViTv2', 'ViTDet', 'T2TViT')
                for variant in family_class(cls).arch_zoo.values() for key in ('pretrained', 'release_page')
                if (url := variant.get(key))}
    readme = (CONFIGS / 'README.md').read_text()
    weights = {model['Weights'] for model in meta['Models'] if model.get('Weights')}
    for url in re.findall(r'https://[^\s)`\'"|]+', readme):
        if url in weights:  # trained detectors (test_readme_and_metafile_list_the_same_trained_weights)
            continue
        if '<' in url:  # a pattern: 'releases/download/v2/<name>.pth'
            assert any(r.startswith(url.split('<')[0]) for r in releases), url
            continue
        choices = re.search(r'\{([^}]*)\}', url)
        expanded = [url.replace(choices[0], c) for c in choices[1].split(',')] if choices else [url]
        assert set(expanded) <= releases, url
