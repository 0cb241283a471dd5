"""ViTDet: the shared window / position layers, the backbone and its neck, parity with timm,
and every checkpoint layout it loads.

References: timm's ``vision_transformer`` (plain ViT) and ``vision_transformer_sam`` (the
ViTDet design: windows, decomposed relative position) for features and position helpers;
the key names of detectron2's ``ViT``/``SimpleFeaturePyramid`` and of mmdet's ViTDet
project (``ViT``, ``SimpleFPN`` built from mmcv ``ConvModule``), written out below by
writers independent of mmpvt's converter.
"""
import argparse
import importlib.util
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import timm
import timm.models.vision_transformer_sam as timm_sam
import torch
import torch.nn.functional as F
from mmengine.registry import DefaultScope
from torch import nn

from mmpvt.checkpoint import CheckpointError, load_checkpoint_file
from mmpvt.models import ViTDet, ViTDetNeck
from mmpvt.models.attention import decomposed_rel_pos, window_partition, window_unpartition
from mmpvt.models.layers import LayerNorm2d, abs_pos_embed_to_grid
from mmpvt.models.vitdet import VITDET_ARCHS

ROOT_DIR = Path(__file__).resolve().parents[1]
# A small column for everything that runs: 4 blocks, the last of each half global.
SMALL = dict(embed_dims=64, depth=4, num_heads=2, global_attn_indexes=(1, 3))


def small(**kwargs):
    kwargs.setdefault('drop_path_rate', 0.)
    return ViTDet(arch=dict(SMALL), **kwargs)


def randomised(model):
    """``model`` with every tensor random, the zero-started rel-pos tables too."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def relative_diff(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


# -- shared layers ----------------------------------------------------------------------------
def test_window_partition_zero_pads_and_round_trips():
    x = torch.randn(2, 17, 23, 5)
    windows, padded = window_partition(x, 7)
    assert padded == (21, 28) and windows.shape == (2 * 3 * 4, 7, 7, 5)
    assert torch.equal(windows[0], x[0, :7, :7])
    # Row 0, column 3 covers columns 21..27: two real columns, then zero padding.
    assert torch.equal(windows[3, :, :2], x[0, :7, 21:23]) and not windows[3, :, 2:].any()
    assert torch.equal(windows[12], x[1, :7, :7])  # the second image starts after 3 x 4 windows
    assert torch.equal(window_unpartition(windows, 7, padded, (17, 23)), x)


@pytest.mark.parametrize('q_hw,k_hw,rows', [
    ((5, 7), (5, 7), (9, 13)),      # tables of the right length
    ((5, 7), (5, 7), (27, 27)),     # resized down, as 14x14-window tables on a small map
    ((9, 6), (9, 6), (5, 7)),       # resized up
    ((8, 8), (4, 4), (15, 15)),     # pooled keys (MViTv2): the q/k ratio scales the indices
    ((4, 6), (8, 12), (11, 17)),
])
def test_decomposed_rel_pos_matches_timm(q_hw, k_hw, rows):
    head_dims = 8
    q = torch.randn(3, q_hw[0] * q_hw[1], head_dims)
    rel_h, rel_w = torch.randn(rows[0], head_dims), torch.randn(rows[1], head_dims)
    ref = timm_sam.get_decomposed_rel_pos_bias(q, rel_h, rel_w, q_hw, k_hw)
    ours = decomposed_rel_pos(q.view(3, 1, -1, head_dims), rel_h, rel_w, q_hw, k_hw)
    assert ours.shape == (3, 1, q_hw[0] * q_hw[1], k_hw[0] * k_hw[1])
    assert torch.allclose(ours[:, 0], ref, atol=1e-5)


def test_abs_pos_embed_drops_class_row_and_resizes_bicubically():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    grid = pos[:, 1:].reshape(1, 14, 14, 32)
    assert torch.equal(abs_pos_embed_to_grid(pos, (14, 14)), grid)
    ref = F.interpolate(grid.permute(0, 3, 1, 2), size=(20, 9), mode='bicubic', align_corners=False)
    assert torch.allclose(abs_pos_embed_to_grid(pos, (20, 9)), ref.permute(0, 2, 3, 1), atol=1e-6)
    with pytest.raises(ValueError, match='not a square grid'):
        abs_pos_embed_to_grid(pos[:, :-1], (14, 14))


def test_channel_layer_norm_is_detectron2s():
    norm = LayerNorm2d(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    ref = norm.weight[:, None, None] * (x - mean) / torch.sqrt(var + 1e-6) + norm.bias[:, None, None]
    assert torch.allclose(norm(x), ref, atol=1e-5)


# -- variants, contract, training controls ----------------------------------------------------
# detectron2's ViT (trunk) and SimpleFeaturePyramid sizes (transformer_facts.md, issue 14).
PARAMS = {'base': (85_889_024, 88_544_960, 91_449_024),
          'large': (303_432_704, None, 311_237_888),
          'huge': (631_116_800, None, 641_756_992)}


@pytest.mark.parametrize('arch', list(PARAMS))
def test_parameter_counts_match_detectron2(arch):
    with torch.device('meta'):  # no memory, no initialisation cost for the 600M model
        model = ViTDet(arch=arch)
        neck = ViTDetNeck(model.out_channels)
    count = lambda named: sum(p.numel() for _, p in named)  # noqa: E731
    trunk = count((k, p) for k, p in model.named_parameters() if not k.startswith('scale_x'))
    backbone = count(model.named_parameters())
    expected_trunk, expected_backbone, expected_total = PARAMS[arch]
    assert trunk == expected_trunk
    assert backbone == (expected_backbone or backbone)
    assert backbone + count(neck.named_parameters()) == expected_total


def test_variant_table_and_output_contract():
    assert {k: (v['embed_dims'], v['depth'], v['num_heads']) for k, v in VITDET_ARCHS.items()} == {
        'tiny': (192, 12, 3), 'small': (384, 12, 6), 'base': (768, 12, 12), 'large': (1024, 24, 16),
        'huge': (1280, 32, 16)}
    with torch.device('meta'):
        base, large, huge = (ViTDet(arch=a) for a in ('base', 'large', 'huge'))
    assert base.out_channels == (192, 384, 768, 768) and base.out_strides == (4, 8, 16, 32)
    assert base.size_divisor == 32 and base.min_input_size == 32
    for model, globals_ in ((base, (2, 5, 8, 11)), (large, (5, 11, 17, 23)), (huge, (7, 15, 23, 31))):
        assert tuple(i for i, b in enumerate(model.blocks) if b.window_size == 0) == globals_
        assert all(b.window_size == 14 for i, b in enumerate(model.blocks) if i not in globals_)
    # Relative-position tables: 2 * 14 - 1 rows in windows, 2 * 1024 / 16 - 1 in global blocks.
    assert base.blocks[0].attn.rel_pos_h.shape == (27, 64)
    assert base.blocks[2].attn.rel_pos_w.shape == (127, 64)
    assert base.pos_embed.shape == (1, 197, 768)
    eps = {m.eps for m in base.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-6} and not hasattr(base, 'norm') and not hasattr(base, 'cls_token')


@pytest.mark.parametrize('shape', [(1, 3, 32, 32), (1, 3, 33, 47), (1, 3, 97, 161), (2, 3, 224, 320)])
def test_awkward_input_sizes(shape):
    model = small().eval()
    with torch.no_grad():
        outs = model(torch.randn(shape))
    grid = (shape[2] // 16, shape[3] // 16)  # the patch embedding floors
    sizes = [(4 * grid[0], 4 * grid[1]), (2 * grid[0], 2 * grid[1]), grid, (grid[0] // 2, grid[1] // 2)]
    assert [tuple(o.shape) for o in outs] == [(shape[0], c, *s) for c, s in zip(model.out_channels, sizes)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_levels_derive_from_the_stride16_map():
    model = randomised(small())
    with torch.no_grad():
        x4, x8, x16, x32 = model(torch.randn(1, 3, 64, 96))
        assert torch.equal(x32, F.max_pool2d(x16, 2, 2))
        assert torch.allclose(x8, model.scale_x2(x16)) and torch.allclose(x4, model.scale_x4(x16))
    assert [type(m) for m in model.scale_x4] == [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d]


def test_only_requested_levels_are_built():
    full = small()
    for out_indices, built in (((2, 3), ()), ((1,), ('scale_x2',)), ((0, 2), ('scale_x4',))):
        model = small(out_indices=out_indices).eval()
        assert [n for n in ('scale_x4', 'scale_x2') if hasattr(model, n)] == list(built)
        with torch.no_grad():
            outs = model(torch.randn(1, 3, 64, 64))
        assert [o.shape[1] for o in outs] == [full.level_channels[i] for i in out_indices]


def test_plain_global_vit_option():
    model = small(window_size=0, use_rel_pos=False, use_abs_pos=False)
    assert all(b.window_size == 0 and b.attn.rel_pos_h is None for b in model.blocks)
    assert model.pos_embed is None and 'pos_embed' not in model.state_dict()


def test_frozen_stages_freeze_embeddings_and_quarters_of_the_blocks():
    model = small(frozen_stages=2)
    model.train()
    frozen = [model.patch_embed, *model.blocks[:2]]
    assert not model.pos_embed.requires_grad
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for f in frozen for m in f.modules())
    trainable = [*model.blocks[2:], model.scale_x4, model.scale_x2]
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    assert all(m.training for t in trainable for m in t.modules())
    model = small(frozen_stages=4).train()
    assert not any(p.requires_grad for b in model.blocks for p in b.parameters())
    assert all(p.requires_grad for p in model.scale_x4.parameters())
    assert all(p.requires_grad for p in small(frozen_stages=0).parameters())
    with pytest.raises(ValueError, match='frozen_stages'):
        small(frozen_stages=5)


def test_layer_ids_for_layer_decay():
    model = small()
    assert model.num_layers == 4
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids['patch_embed.proj.weight'] == 0 and ids['pos_embed'] == 0
    assert ids['blocks.0.norm1.weight'] == 1 and ids['blocks.3.attn.rel_pos_h'] == 4
    assert ids['scale_x4.0.weight'] == ids['scale_x2.0.bias'] == 5
    with pytest.raises(ValueError, match='no parameter'):
        model.layer_id('neck.lateral_convs.0.conv.weight')


def test_with_cp_gives_equal_loss_and_gradients():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 80)
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(5)
        model = randomised(small(with_cp=with_cp)).train()
        loss = sum(o.square().mean() for o in model(x))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))
    # The relative-position tables learn through the attention mask.
    names = [n for n, _ in small().named_parameters()]
    assert all(g.abs().sum() > 0 for g, n in zip(grads[0][1], names) if 'rel_pos' in n)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match='unknown arch .*valid names: tiny, small, base, large, huge'):
        ViTDet(arch='gigantic')
    with pytest.raises(ValueError, match='lacks num_heads'):
        ViTDet(arch=dict(embed_dims=64, depth=2))
    with pytest.raises(ValueError, match=r'global_attn_indexes must be distinct .*\[0, 3\]'):
        ViTDet(arch=dict(SMALL, global_attn_indexes=(1, 4)))
    with pytest.raises(ValueError, match='divisible by num_heads'):
        ViTDet(arch=dict(SMALL, num_heads=3))
    with pytest.raises(ValueError, match='H, W >= 32'):
        small()(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match='patch_size must be 16'):
        small(patch_size=8)


def test_neck_completes_the_pyramid():
    neck = ViTDetNeck([16, 32, 64, 64], out_channels=24, num_outs=5)
    maps = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip([16, 32, 64, 64], [4, 8, 16, 32])]
    outs = neck(maps)
    assert [tuple(o.shape) for o in outs] == [(1, 24, 16, 24), (1, 24, 8, 12), (1, 24, 4, 6), (1, 24, 2, 3),
                                              (1, 24, 1, 2)]
    assert torch.equal(outs[4], outs[3][:, :, ::2, ::2])
    first = neck.lateral_convs[0]
    assert first.conv.bias is None and first.conv.kernel_size == (1, 1)
    assert isinstance(first.norm, LayerNorm2d)
    assert neck.output_convs[0].conv.kernel_size == (3, 3) and neck.output_convs[0].conv.bias is None
    with pytest.raises(ValueError, match='expected 4 input maps'):
        neck(maps[:3])


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_the_neck_builds_under_each_scope(scope):
    """ViTDetNeck is no backbone, so the contract suite's name test does not cover it; mmdet's
    ViTDet project calls its neck SimpleFPN and its norm LN2d, names mmpvt leaves to it."""
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS
    registry = MMDET_MODELS if scope == 'mmdet' else MMSEG_MODELS
    assert ViTDetNeck.__name__ not in {'SimpleFPN', 'LN2d'}
    with DefaultScope.overwrite_default_scope(scope):
        neck = registry.build(dict(type='ViTDetNeck', in_channels=[64], num_outs=2))
    assert type(neck) is ViTDetNeck


# -- parity with timm -------------------------------------------------------------------------
def load_through_init_cfg(path, **kwargs):
    model = small(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('arch,timm_kwargs', [
    (dict(SMALL), dict(embed_dim=64, depth=4, num_heads=2)),
    pytest.param(dict(embed_dims=768, depth=12, num_heads=12), {}, marks=pytest.mark.slow, id='vit-b'),
])
def test_plain_vit_matches_timm_without_class_token(arch, timm_kwargs, tmp_path):
    """In float64: with weights this large the column is chaotic, and float32 rounding in
    another summation order (another CPU's kernels) grows through the blocks (1.4e-3 of the
    scale measured for the 12-block ViT-B on an AVX2 machine, where float64 leaves 6e-12)."""
    torch.manual_seed(6)
    ref = timm.create_model('vit_base_patch16_224', pretrained=False, class_token=False, global_pool='avg',
                            **timm_kwargs).eval()
    with torch.no_grad():  # weights large enough that every nonlinearity works in its curved range
        for name, p in ref.named_parameters():
            p.normal_(1. if 'norm' in name and name.endswith('weight') else 0., .2)
    model = ViTDet(arch=arch, img_size=224, window_size=0, use_rel_pos=False, out_indices=(2, 3))
    if timm_kwargs:  # the small column goes through a file and init_cfg, the full one directly
        torch.save(ref.state_dict(), tmp_path / 'vit.pth')
        model.init_cfg = dict(type='Pretrained', checkpoint=str(tmp_path / 'vit.pth'))
        model.init_weights()
    else:
        model.load_state_dict(ViTDet.convert_state_dict(ref.state_dict()), strict=True)
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        x16, x32 = model.double().eval()(x)
        ref16 = ref.double().forward_intermediates(x, indices=1, norm=False, intermediates_only=True)[-1]
    assert relative_diff(x16, ref16) <= 1e-9
    assert relative_diff(x32, F.max_pool2d(ref16, 2, 2)) <= 1e-9


def test_windowed_rel_pos_blocks_match_timm_samvit_at_a_non_square_size(monkeypatch):
    """timm's SAM image encoder is the ViTDet column; aligned to ViTDet's LayerNorm eps and
    position-embedding resize (bicubic from the 14x14 pre-training grid, no antialiasing)."""
    torch.manual_seed(7)
    ref = timm.create_model('samvit_base_patch16', pretrained=False, depth=4, global_attn_indexes=[1, 3])
    for m in ref.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-6
    grid = torch.randn(1, 14, 14, 768) * .3
    ref.pos_embed = nn.Parameter(grid.clone())
    monkeypatch.setattr(timm_sam, 'resample_abs_pos_embed_nhwc', lambda pos, size, **_: F.interpolate(
        pos.permute(0, 3, 1, 2), size=tuple(size), mode='bicubic', align_corners=False).permute(0, 2, 3, 1))
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith(('neck.', 'head.'))}
    with torch.no_grad():
        for k, v in state.items():
            if 'rel_pos' in k:  # timm starts them at zero; random tables make them count
                v.normal_(0, .3)
    state['pos_embed'] = torch.cat([torch.zeros(1, 1, 768), grid.flatten(1, 2)], dim=1)
    model = ViTDet(arch=dict(embed_dims=768, depth=4, num_heads=12, global_attn_indexes=(1, 3)),
                   out_indices=(2,)).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 320, 448)  # 20x28 tokens: padded windows, resized global tables
    with torch.no_grad():
        ours = model(x)[0]
        theirs = ref.eval().forward_intermediates(x, indices=1, norm=False, intermediates_only=True)[-1]
    assert ours.shape == (1, 768, 20, 28)
    assert relative_diff(ours, theirs) <= 1e-4


# -- checkpoint layouts -----------------------------------------------------------------------
# Writers of each layout from an mmpvt ViTDet state dict, with the key names of the code that
# writes them (never mmpvt's converter run backwards).
def _trunk(state):
    return {k: v for k, v in state.items() if not k.startswith('scale_x')}


def to_detectron2(state, neck_channels=(16, 32, 64, 64), out=16):
    """detectron2's ViTDet detector: ``SimpleFeaturePyramid`` names its ViT ``net`` and its
    per-stride stacks ``simfp_{log2 stride}``: stride 4 is [deconv, LN, GELU, deconv, conv,
    conv], stride 8 [deconv, conv, conv], 16 [conv, conv], 32 [max-pool, conv, conv]; a
    Conv2d with a norm holds it as ``.norm``."""
    d2 = {f'backbone.net.{k}': v for k, v in _trunk(state).items()}
    for k, v in state.items():
        if k.startswith('scale_x4.'):  # deconv 0, LN 1, deconv 3
            d2['backbone.simfp_2.' + k[len('scale_x4.'):]] = v
        elif k.startswith('scale_x2.'):
            d2['backbone.simfp_3.' + k[len('scale_x2.'):]] = v
    convs = {'simfp_2': (4, 5), 'simfp_3': (1, 2), 'simfp_4': (0, 1), 'simfp_5': (1, 2)}
    for (stack, (lateral, output)), channels in zip(convs.items(), neck_channels):
        d2[f'backbone.{stack}.{lateral}.weight'] = torch.randn(out, channels, 1, 1)
        d2[f'backbone.{stack}.{output}.weight'] = torch.randn(out, out, 3, 3)
        for i in (lateral, output):
            d2[f'backbone.{stack}.{i}.norm.weight'] = torch.ones(out)
            d2[f'backbone.{stack}.{i}.norm.bias'] = torch.zeros(out)
    d2['proposal_generator.rpn_head.conv.conv0.weight'] = torch.randn(out, out, 3, 3)
    d2['roi_heads.box_predictor.cls_score.weight'] = torch.randn(81, 1024)
    d2['pixel_mean'] = torch.zeros(3, 1, 1)
    return d2


def to_mmdet_project(state, out=16):
    """mmdet's projects/ViTDet detector: ``ViT`` keeps timm's names under ``backbone.``,
    ``SimpleFPN`` holds the scale changes as ``fpn1`` (deconv, LN2d, GELU, deconv) and
    ``fpn2``, then mmcv ConvModules whose LN2d mmcv names ``norm_layer``."""
    from mmcv.cnn.bricks.norm import infer_abbr

    class LN2d(nn.Module):  # the project's class name: what mmcv derives the key from
        pass

    norm = infer_abbr(LN2d)
    assert norm == 'norm_layer'
    mm = {f'backbone.{k}': v for k, v in _trunk(state).items()}
    for k, v in state.items():
        if k.startswith('scale_x4.'):
            mm['neck.fpn1.' + k[len('scale_x4.'):]] = v
        elif k.startswith('scale_x2.'):
            mm['neck.fpn2.' + k[len('scale_x2.'):]] = v
    for i, channels in enumerate((16, 32, 64, 64)):
        mm[f'neck.lateral_convs.{i}.conv.weight'] = torch.randn(out, channels, 1, 1)
        mm[f'neck.fpn_convs.{i}.conv.weight'] = torch.randn(out, out, 3, 3)
        for convs in ('lateral_convs', 'fpn_convs'):
            mm[f'neck.{convs}.{i}.{norm}.weight'] = torch.ones(out)
            mm[f'neck.{convs}.{i}.{norm}.bias'] = torch.zeros(out)
    mm['rpn_head.rpn_conv.0.conv.weight'] = torch.randn(out, out, 3, 3)
    return {'meta': {'epoch': 100, 'cfg': 'model = dict(...)'}, 'state_dict': mm}


def timm_vit(variant='vit_base_patch16_224', **kwargs):
    torch.manual_seed(8)
    kwargs = dict(embed_dim=64, depth=4, num_heads=2, **kwargs)
    return timm.create_model(variant, pretrained=False, **kwargs).state_dict()


def mae_pretraining_file(timm_state):
    """An MAE pre-training checkpoint as MAE's main_pretrain.py saves it: the encoder under
    timm's names, the decoder (models_mae.py), and the training state beside the weights."""
    model = dict(timm_state)
    model['mask_token'] = torch.randn(1, 1, 32)
    model['decoder_embed.weight'], model['decoder_pos_embed'] = torch.randn(32, 64), torch.randn(1, 197, 32)
    model['decoder_blocks.0.attn.qkv.weight'] = torch.randn(96, 32)
    model['decoder_norm.weight'], model['decoder_pred.weight'] = torch.ones(32), torch.randn(768, 32)
    optimizer = {'state': {0: {'step': torch.tensor(3.), 'exp_avg': torch.zeros(4)}},
                 'param_groups': [{'lr': 1.5e-4, 'weight_decay': 0.05, 'params': [0]}]}
    args = argparse.Namespace(model='mae_vit_base_patch16', mask_ratio=0.75, blr=1.5e-4, output_dir='./out')
    return {'model': model, 'optimizer': optimizer, 'epoch': 799, 'scaler': {'scale': 65536.0}, 'args': args}


def save_pickle(obj, path, protocol):
    """detectron2's model-zoo .pkl: a plain pickle of numpy arrays under ``model``."""
    numpy_state = {k: v.numpy() for k, v in obj.items()}
    with open(path, 'wb') as f:
        pickle.dump({'model': numpy_state, '__author__': 'Detectron2 Model Zoo', 'matching_heuristics': True},
                    f, protocol=protocol)


def write_layout(layout, source, path):
    """Writes ``layout`` built from ``source`` (an mmpvt state dict) to ``path``."""
    if layout == 'detectron2_pth':
        torch.save({'model': to_detectron2(source), 'iteration': 184375}, path)
    elif layout.startswith('detectron2_pkl'):
        save_pickle(to_detectron2(source), path, protocol=int(layout[-1]))
    elif layout == 'mmdet':
        torch.save(to_mmdet_project(source), path)
    elif layout == 'mmpvt_detector':
        detector = {f'backbone.{k}': v for k, v in source.items()}
        detector['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
        torch.save({'meta': {'epoch': 12}, 'state_dict': detector}, path)
    else:
        torch.save(source, path)


@pytest.mark.parametrize('layout,detected', [
    ('detectron2_pth', 'detectron2'), ('detectron2_pkl2', 'detectron2'), ('detectron2_pkl4', 'detectron2'),
    ('mmdet', 'mmdet'), ('mmpvt_detector', 'mmpvt'), ('mmpvt', 'mmpvt')])
def test_detector_layouts_load_every_backbone_tensor(layout, detected, tmp_path, log_lines):
    source = randomised(small()).state_dict()
    path = tmp_path / ('model.pkl' if 'pkl' in layout else 'model.pth')
    write_layout(layout, source, path)
    checkpoint = load_checkpoint_file(path)
    assert ViTDet.checkpoint_format.layout(checkpoint) == detected
    model = load_through_init_cfg(path)
    assert 'ViTDet: missing keys: none' in log_lines and 'ViTDet: unexpected keys: none' in log_lines
    loaded = model.state_dict()
    assert loaded.keys() == source.keys() and all(torch.equal(loaded[k], source[k]) for k in source)


@pytest.mark.parametrize('layout', ['timm', 'deit_distilled', 'mae'])
def test_pretraining_layouts_load_with_expected_missing_tables(layout, tmp_path, log_lines):
    if layout == 'timm':
        state = timm_vit()  # with its class token, final norm and head
        checkpoint = {'model': state}  # DeiT's release wrapper
    elif layout == 'deit_distilled':
        state = timm_vit('deit_tiny_distilled_patch16_224')
        assert state['pos_embed'].shape == (1, 198, 64) and 'head_dist.weight' in state
        checkpoint = {'model': state}
    else:
        state = timm_vit()
        checkpoint = mae_pretraining_file(state)
    torch.save(checkpoint, tmp_path / 'pretrained.pth')
    torch.manual_seed(9)
    fresh = small()
    torch.manual_seed(9)  # the same initialisation, then the load
    model = load_through_init_cfg(tmp_path / 'pretrained.pth')
    assert 'ViTDet: missing keys: none' in log_lines and 'ViTDet: unexpected keys: none' in log_lines
    assert any('no relative-position tables' in line and '8 tensors keep their initialisation' in line
               for line in log_lines)
    loaded = model.state_dict()
    # Class-token row first, then the grid (the distillation token's row dropped).
    pos = state['pos_embed']
    assert torch.equal(loaded['pos_embed'], torch.cat([pos[:, :1], pos[:, -196:]], 1))
    assert all(torch.equal(loaded[k], state[k]) for k in loaded if k.startswith(('blocks.', 'patch_embed.'))
               and 'rel_pos' not in k)
    assert all(not loaded[k].any() for k in loaded if 'rel_pos' in k)
    assert all(torch.equal(loaded[k], fresh.state_dict()[k]) for k in loaded if k.startswith('scale_x'))


def test_timm_vit_without_class_token_gets_a_class_row():
    state = timm_vit(class_token=False, global_pool='avg')
    converted = ViTDet.convert_state_dict(state)
    assert converted['pos_embed'].shape == (1, 197, 64) and not converted['pos_embed'][:, 0].any()
    assert torch.equal(converted['pos_embed'][:, 1:], state['pos_embed'])
    assert not any(k.startswith(('fc_norm', 'head')) for k in converted)


@pytest.mark.parametrize('layout', ['timm', 'deit_distilled', 'mae', 'detectron2', 'mmdet', 'mmpvt'])
def test_conversion_is_pure_and_idempotent(layout):
    source = randomised(small()).state_dict()
    checkpoint = {
        'timm': lambda: timm_vit(),
        'deit_distilled': lambda: timm_vit('deit_tiny_distilled_patch16_224'),
        'mae': lambda: mae_pretraining_file(timm_vit()),
        'detectron2': lambda: {'model': to_detectron2(source)},
        'mmdet': lambda: to_mmdet_project(source),
        'mmpvt': lambda: source}[layout]()
    flat = checkpoint.get('model', checkpoint.get('state_dict', checkpoint))
    before = {k: v.clone() for k, v in flat.items()}
    once = ViTDet.convert_state_dict(checkpoint)
    twice = ViTDet.convert_state_dict(once)
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    assert flat.keys() == before.keys() and all(torch.equal(flat[k], before[k]) for k in flat)
    assert set(once) <= set(source) and once['pos_embed'].shape == (1, 197, 64)


def test_other_variants_are_refused_by_key_and_shapes(tmp_path):
    torch.save(ViTDet(arch=dict(SMALL, embed_dims=128)).state_dict(), tmp_path / 'wide.pth')
    with pytest.raises(CheckpointError, match=r'wide\.pth: .*pos_embed has shape '
                                              r'\(1, 197, 128\) in the checkpoint and \(1, 197, 64\)'):
        load_through_init_cfg(tmp_path / 'wide.pth')
    shorter = ViTDet(arch=dict(SMALL, depth=2, global_attn_indexes=(1,)))
    torch.save(shorter.state_dict(), tmp_path / 'short.pth')
    with pytest.raises(CheckpointError, match=r'blocks\.2\..* is missing from the checkpoint'):
        load_through_init_cfg(tmp_path / 'short.pth')
    with pytest.raises(ValueError, match='not a plain ViT state dict'):
        ViTDet.convert_state_dict(timm.create_model('pvt_v2_b0', pretrained=False).state_dict())


def test_partly_missing_rel_pos_tables_are_refused(tmp_path):
    state = small().state_dict()
    del state['blocks.1.attn.rel_pos_h']
    torch.save(state, tmp_path / 'partial.pth')
    with pytest.raises(CheckpointError, match=r'blocks\.1\.attn\.rel_pos_h is missing from the checkpoint'):
        load_through_init_cfg(tmp_path / 'partial.pth')


def test_tables_and_embeddings_of_other_sizes_are_resized(tmp_path):
    source = randomised(small(img_size=512, pretrain_img_size=384)).state_dict()
    assert source['pos_embed'].shape == (1, 1 + 24 * 24, 64)
    assert source['blocks.1.attn.rel_pos_h'].shape == (63, 32)
    torch.save(source, tmp_path / 'other_sizes.pth')
    loaded = load_through_init_cfg(tmp_path / 'other_sizes.pth').state_dict()
    grid = source['pos_embed'][:, 1:].reshape(1, 24, 24, 64).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(14, 14), mode='bicubic', align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(loaded['pos_embed'][:, 1:], ref, atol=1e-6)
    assert torch.equal(loaded['pos_embed'][:, 0], source['pos_embed'][:, 0])
    table = source['blocks.1.attn.rel_pos_h']  # global: 2 * 512 / 16 - 1 rows -> 2 * 1024 / 16 - 1
    ref = F.interpolate(table.t()[None], size=127, mode='linear', align_corners=False)[0].t()
    assert torch.allclose(loaded['blocks.1.attn.rel_pos_h'], ref, atol=1e-6)
    assert torch.equal(loaded['blocks.0.attn.rel_pos_w'], source['blocks.0.attn.rel_pos_w'])  # windows: 27


def test_levels_outside_out_indices_are_skipped_on_load(tmp_path, log_lines):
    source = randomised(small()).state_dict()
    torch.save(source, tmp_path / 'full.pth')
    model = load_through_init_cfg(tmp_path / 'full.pth', out_indices=(1, 2))
    assert any('skipped 6 checkpoint tensors of pyramid levels outside out_indices (1, 2)' in line
               for line in log_lines)
    assert torch.equal(model.scale_x2[0].weight, source['scale_x2.0.weight'])


class _Payload:
    """Unpickling this would run ``touch``; a safe loader never gets that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class _TrainerState:
    """A harmless object of a class no allow-list names."""


@pytest.mark.parametrize('suffix', ['.pth', '.pkl'])
def test_files_that_would_run_code_are_refused(suffix, tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / f'evil{suffix}'
    if suffix == '.pth':
        torch.save({'model': small().state_dict(), 'args': _Payload(marker)}, path)
    else:
        with open(path, 'wb') as f:
            pickle.dump({'model': {'pos_embed': _Payload(marker)}}, f)
    with pytest.raises(CheckpointError, match='refused because loading it could run code'):
        load_through_init_cfg(path)
    assert not marker.exists()


def test_release_file_extras_are_allowed_exactly(tmp_path):
    checkpoint = mae_pretraining_file(timm_vit())
    torch.save(checkpoint, tmp_path / 'mae.pth')
    loaded = load_checkpoint_file(tmp_path / 'mae.pth')
    assert loaded['args'] == checkpoint['args'] and loaded['epoch'] == 799
    # Any other class beside it is still refused.
    torch.save(dict(checkpoint, state=_TrainerState()), tmp_path / 'trainer.pth')
    with pytest.raises(CheckpointError, match=r'could run code \(.*_TrainerState'):
        load_checkpoint_file(tmp_path / 'trainer.pth')


def test_convert_checkpoint_cli_handles_vitdet(tmp_path, python, capsys):
    source = randomised(small()).state_dict()
    save_pickle(to_detectron2(source), tmp_path / 'model_final.pkl', protocol=4)
    result = subprocess.run(
        [python, 'tools/convert_checkpoint.py', tmp_path / 'model_final.pkl', tmp_path / 'out.pth'],
        cwd=ROOT_DIR, capture_output=True, text=True, check=True)
    assert 'vitdet family, detectron2 layout' in result.stdout
    # 24 neck tensors, 2 head tensors and pixel_mean: the first 12 named, the rest counted.
    assert 'backbone.simfp_2.4.norm.bias' in result.stdout and 'and 15 more' in result.stdout
    model = small()
    model.load_state_dict(torch.load(tmp_path / 'out.pth', weights_only=True), strict=True)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    # The same tool in this process: another family forced by --type is an error, not a guess.
    spec = importlib.util.spec_from_file_location('tool', ROOT_DIR / 'tools' / 'convert_checkpoint.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(['--type', 'pvt', str(tmp_path / 'model_final.pkl'), str(tmp_path / 'x.pth')]) == 1
    assert 'not a PVT state dict' in capsys.readouterr().err and not (tmp_path / 'x.pth').exists()
    assert tool.detect_family(torch.load(tmp_path / 'out.pth', weights_only=True)) == 'vitdet'
    pvt = timm.create_model('pvt_v2_b0', pretrained=False).state_dict()
    assert tool.detect_family(pvt) == 'pvt'
