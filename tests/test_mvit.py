"""MViTv2: the stage rules, parity with timm, the windowed detection blocks against a slow
reference, any input size, training controls, and every checkpoint layout it loads.

References: timm's ``mvitv2`` (the official blocks; ``forward_intermediates`` for stage
maps), detectron2's ``MViT`` constructor rules (written out below as expected tables), and
the key names of the official release, timm, detectron2 and mmpretrain, written by writers
independent of mmpvt's converter.
"""
import functools
import importlib.util
import itertools
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
from torch import nn

from mmpvt.checkpoint import CheckpointError, load_checkpoint_file
from mmpvt.models import MViTv2, PVTv2, ViTDet
from mmpvt.models.attention import rel_pos_lookup
from mmpvt.models.mvit import MVIT_ARCHS

ROOT_DIR = Path(__file__).resolve().parents[1]
# A small network for everything that runs: every stage rule applies (q stride, kv strides
# 4/2/1/1, window halving, global blocks with doubled kv stride), on 16-channel heads.
SMALL = dict(embed_dims=(16, 32, 64, 128), depths=(1, 2, 3, 2), num_heads=(1, 2, 4, 8))
OUT_NORMS = ('scale2_norm', 'scale3_norm', 'scale4_norm', 'scale5_norm')


def small(**kwargs):
    kwargs.setdefault('drop_path_rate', 0.)
    return MViTv2(arch=dict(SMALL), **kwargs)


def randomise_(model, std=.2):
    """Every tensor random (norm weights around 1), large enough that attention is far from
    uniform and the relative positions matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = p.dim() == 1 and 'norm' in name and name.endswith('weight')
            p.normal_(1. if is_norm_weight else 0., std)
    return model.eval()


def random_timm(build):
    """A timm MViTv2 with random weights: built on the meta device (timm's own initialisation
    would be overwritten anyway), then every parameter drawn by randomise_."""
    with torch.device('meta'):
        ref = build()
    assert not list(ref.buffers())  # nothing that randomise_ would leave unset
    return randomise_(ref.to_empty(device='cpu'))


def relative_diff(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


def unit_norm_nchw(x):
    """A LayerNorm with unit weight and zero bias (eps 1e-6) over the channels of a map."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)


# -- variants and stage rules -----------------------------------------------------------------
# Backbone parameter counts, output norms included (transformer_facts.md 1.3): detectron2's
# constructor for T/S/B/L/H; for L IN-1k timm's mvitv2_large without head, less its final
# norm, plus four output norms.
PARAMS = {'tiny': 23_405_664, 'small': 34_102_560, 'base': 50_705_088, 'large': 212_484_384,
          'huge': 665_345_408, 'large_in1k': 216_841_968}


@functools.cache
def meta_model(arch):
    """The published variant on the meta device: no memory, no initialisation cost (665M for H)."""
    with torch.device('meta'):
        return MViTv2(arch=arch)


@pytest.mark.parametrize('arch', list(PARAMS))
def test_parameter_counts(arch):
    assert sum(p.numel() for p in meta_model(arch).parameters()) == PARAMS[arch]


def test_variant_table_and_output_contract():
    assert {k: (v['embed_dims'], v['depths'], v['num_heads']) for k, v in MVIT_ARCHS.items()} == {
        'tiny': ((96, 192, 384, 768), (1, 2, 5, 2), (1, 2, 4, 8)),
        'small': ((96, 192, 384, 768), (1, 2, 11, 2), (1, 2, 4, 8)),
        'base': ((96, 192, 384, 768), (2, 3, 16, 3), (1, 2, 4, 8)),
        'large': ((144, 288, 576, 1152), (2, 6, 36, 4), (2, 4, 8, 16)),
        'large_in1k': ((144, 288, 576, 1152), (2, 6, 36, 4), (2, 4, 8, 16)),
        'huge': ((192, 384, 768, 1536), (4, 8, 60, 8), (3, 6, 12, 24))}
    models = {name: meta_model(name) for name in MVIT_ARCHS}
    assert {name: m.blocks[-1].drop_path.drop_prob for name, m in models.items()} == pytest.approx({
        'tiny': 0.2, 'small': 0.2, 'base': 0.4, 'large': 0.5, 'large_in1k': 0.5, 'huge': 0.6})
    for name, channels in (('tiny', (96, 192, 384, 768)), ('large', (144, 288, 576, 1152)),
                           ('large_in1k', (144, 288, 576, 1152)), ('huge', (192, 384, 768, 1536))):
        assert models[name].out_channels == channels
        assert [getattr(models[name], n).normalized_shape[0] for n in OUT_NORMS] == list(channels)
    tiny = models['tiny']
    assert tiny.out_strides == (4, 8, 16, 32) and tiny.size_divisor == 32 and tiny.min_input_size == 32
    stem = tiny.patch_embed.proj
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7), (4, 4), (3, 3))
    assert not [n for n, _ in tiny.patch_embed.named_modules() if 'norm' in n]
    assert {m.eps for m in tiny.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    names = [n for n, _ in tiny.named_parameters()]
    assert not any(n.startswith(('cls_token', 'pos_embed', 'norm.', 'head')) for n in names)
    # Pooling in every block: one (head_dims, 1, 3, 3) depthwise kernel shared by the heads.
    for block in tiny.blocks:
        for pool in (block.attn.pool_q, block.attn.pool_k, block.attn.pool_v):
            assert pool.weight.shape == (96, 1, 3, 3) and pool.bias is None and pool.groups == 96
        assert block.attn.norm_q.normalized_shape == (96,)


def test_stage_rules_of_tiny_are_detectron2s():
    """detectron2's MViT constructor for last_block_indexes (0, 2, 7, 9), written out."""
    tiny = meta_model('tiny')
    attn = [b.attn for b in tiny.blocks]
    assert [a.q_stride for a in attn] == [1, 2, 1, 2, 1, 1, 1, 1, 2, 1]
    # adaptive kv stride 4/2/1/1, doubled in the global last blocks of stages 2 and 3
    assert [a.kv_stride for a in attn] == [4, 2, 4, 1, 1, 1, 1, 2, 1, 1]
    # windows 56/28/14/7 halved after a stage's first block; the last block of stages 2-4 global
    assert [a.window_size for a in attn] == [56, 56, 0, 28, 14, 14, 14, 0, 14, 0]
    # tables sized from the 224 grid: the official shapes
    assert [a.rel_pos_h.shape[0] for a in attn] == [111, 55, 55, 55, 27, 27, 27, 27, 27, 13]
    assert [a.rel_pos_w.shape for a in attn] == [a.rel_pos_h.shape for a in attn]
    # width changes in the first block of a stage, its shortcut a Linear
    assert [b.proj is not None for b in tiny.blocks] == [False, True, False, True, False, False, False, False,
                                                         True, False]
    assert tiny.stage_ends == (0, 2, 7, 9)
    with torch.device('meta'):
        plain = MViTv2(arch='tiny', window_size=0, global_kv_stride_x2=False)
    assert [b.attn.window_size for b in plain.blocks] == [0] * 10
    assert [b.attn.kv_stride for b in plain.blocks] == [4, 2, 2, 1, 1, 1, 1, 1, 1, 1]


def test_mlp_widening_design_widens_before_each_stage():
    model = meta_model('large_in1k')
    proj = {i: tuple(b.proj.weight.shape) for i, b in enumerate(model.blocks) if b.proj is not None}
    # the last block of stages 1-3 (blocks 1, 7, 43) widens in its MLP; heads change with the stage
    assert proj == {1: (288, 144), 7: (576, 288), 43: (1152, 576)}
    assert all(not model.blocks[i].widen_in_attention for i in proj)
    assert model.blocks[1].mlp.fc2.weight.shape == (288, 576) and model.blocks[1].attn.num_heads == 2
    assert model.blocks[2].attn.qkv.weight.shape == (3 * 288, 288) and model.blocks[2].attn.num_heads == 4


# -- parity with timm (the classification model: windows off, no kv doubling) ---------------
def timm_to_official(state, depths):
    """The official release's layout (PySlowFast ``.pyth``) of a timm mvitv2 state dict:
    ``model_state``, blocks numbered over the network, the width-change Linear ``proj``, the
    head ``head.projection``."""
    first = [sum(depths[:s]) for s in range(len(depths))]
    model_state = {}
    for key, value in state.items():
        if m := re.match(r'stages\.(\d+)\.blocks\.(\d+)\.(.*)', key):
            rest = re.sub(r'^shortcut_proj_(attn|mlp)\.', 'proj.', m[3])
            key = f'blocks.{first[int(m[1])] + int(m[2])}.{rest}'
        model_state[key.replace('head.fc.', 'head.projection.')] = value
    return {'model_state': model_state, 'epoch': 300, 'cfg': 'MVIT:\n  DEPTH: 10\n'}


@pytest.mark.parametrize('variant,arch', [('mvitv2_tiny', 'tiny'), ('mvitv2_small', 'small')])
def test_stage_maps_match_timm_through_the_official_layout(variant, arch, tmp_path):
    torch.manual_seed(11)
    ref = random_timm(lambda: timm.create_model(variant, pretrained=False))
    torch.save(timm_to_official(ref.state_dict(), ref.depths), tmp_path / 'MViTv2.pyth')
    model = MViTv2(arch=arch, window_size=0, global_kv_stride_x2=False,
                   init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'MViTv2.pyth')))
    model.init_weights()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model.eval()(x)
        theirs = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, intermediates_only=True)
    assert [tuple(o.shape) for o in ours] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14),
                                              (1, 768, 7, 7)]
    for level, (out, ref_map) in enumerate(zip(ours, theirs)):
        assert (out - unit_norm_nchw(ref_map)).abs().max() <= 1e-4, level


def test_mlp_widening_design_matches_timm_in_both_layouts(tmp_path):
    """MViTv2-L IN-1k's design (timm expand_attn=False) on small widths: level s is the map
    after the last attention at stage s's width, the input of that block's norm2."""
    torch.manual_seed(12)
    cfg = MultiScaleVitCfg(depths=SMALL['depths'], embed_dim=SMALL['embed_dims'],
                           num_heads=SMALL['num_heads'], expand_attn=False)
    ref = random_timm(lambda: MultiScaleVit(cfg, num_classes=10))
    assert 'stages.0.blocks.0.shortcut_proj_mlp.weight' in ref.state_dict()
    taps = []
    for stage in ref.stages[:3]:
        stage.blocks[-1].norm2.register_forward_pre_hook(lambda module, args: taps.append(args[0]))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        last = ref.forward_intermediates(x, indices=[3], norm=False, intermediates_only=True)[0]
    sides = (56, 28, 14)
    expected = [unit_norm_nchw(t.reshape(1, s, s, -1).permute(0, 3, 1, 2)) for t, s in zip(taps, sides)]
    expected.append(unit_norm_nchw(last))
    torch.save(ref.state_dict(), tmp_path / 'timm.pth')
    model = MViTv2(arch=dict(SMALL, dim_mul_in_attention=False), drop_path_rate=0., window_size=0,
                   global_kv_stride_x2=False,
                   init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'timm.pth')))
    model.init_weights()
    with torch.no_grad():
        outs = model.eval()(x)
    assert [o.shape[1] for o in outs] == list(SMALL['embed_dims'])
    for level, (out, ref_map) in enumerate(zip(outs, expected)):
        assert (out - ref_map).abs().max() <= 1e-4, level
    # The official layout of the same weights (``blocks.{i}.proj`` at the end of each stage)
    # converts to the same state.
    from_timm = MViTv2.convert_state_dict(ref.state_dict())
    from_official = MViTv2.convert_state_dict(timm_to_official(ref.state_dict(), SMALL['depths']))
    assert list(from_timm) == list(from_official) and all(torch.equal(from_timm[k], from_official[k])
                                                          for k in from_timm)
    assert 'blocks.0.proj.weight' in from_timm and 'blocks.2.proj.weight' in from_timm


# -- the windowed detection blocks against a slow reference -----------------------------------
# detectron2's rules for SMALL's depths (1, 2, 3, 2) and a stage-1 window of 16, written out:
# (stage, q stride, kv stride, window) of each block.
SMALL_PLAN_16 = [(0, 1, 4, 16), (1, 2, 2, 16), (1, 1, 4, 0), (2, 2, 1, 8), (2, 1, 1, 4), (2, 1, 2, 0),
                 (3, 2, 1, 4), (3, 1, 1, 0)]


def d2_rel_rows(table, q_len, k_len):
    """detectron2's get_rel_pos: the table linearly resized to 2 * max(q, k) - 1 rows, then the
    row of each query/key distance, coordinates stretched by the length ratio in float32 and
    truncated."""
    length = 2 * max(q_len, k_len) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode='linear', align_corners=False)[0].t()
    f32 = np.float32
    q_scale, k_scale = f32(max(k_len / q_len, 1.)), f32(max(q_len / k_len, 1.))
    offset = f32((k_len - 1) * max(q_len / k_len, 1.))
    rows = [[int((f32(i) * q_scale - f32(j) * k_scale) + offset) for j in range(k_len)] for i in range(q_len)]
    return table[torch.tensor(rows)]


def window_attention(q, k, v, table_h, table_w):
    """Softmax attention of one window's queries ``(a, b, C)`` over its keys ``(c, d, C)``, with
    the decomposed relative-position terms q . R_h[i, m] + q . R_w[j, n] of query (i, j) and key
    (m, n) added to the scaled logits."""
    (a, b, dims), (c, d) = q.shape, k.shape[:2]
    rel_h, rel_w = d2_rel_rows(table_h, a, c), d2_rel_rows(table_w, b, d)  # (a, c, C), (b, d, C)
    logits = (q.reshape(a * b, dims) * dims ** -0.5) @ k.reshape(c * d, dims).t()
    logits = logits.view(a, b, c, d)
    logits = logits + torch.einsum('ijC,imC->ijm', q, rel_h)[:, :, :, None]
    logits = logits + torch.einsum('ijC,jnC->ijn', q, rel_w)[:, :, None, :]
    logits = logits.reshape(a * b, c * d)
    weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
    weights = weights / weights.sum(-1, keepdim=True)
    return (weights @ v.reshape(c * d, dims)).view(a, b, dims)


def zero_pad_to(maps, side):
    """``(B, heads, H, W, C)`` zero-padded at the bottom and right to multiples of ``side``."""
    B, heads, H, W, C = maps.shape
    out = maps.new_zeros(B, heads, math.ceil(H / side) * side, math.ceil(W / side) * side, C)
    out[:, :, :H, :W] = maps
    return out


def reference_attention(attn, x, heads, q_stride, kv_stride, window):
    B, H, W, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    dims = qkv.shape[-1] // 3
    parts = qkv.view(B, H, W, 3, heads, dims // heads)
    pooled = []
    for i, (name, stride) in enumerate((('q', q_stride), ('k', kv_stride), ('v', kv_stride))):
        pool, norm = getattr(attn, f'pool_{name}'), getattr(attn, f'norm_{name}')
        per_head = []
        for h in range(heads):  # each head pooled on its own, with the one shared kernel
            m = F.conv2d(parts[:, :, :, i, h].permute(0, 3, 1, 2), pool.weight, stride=stride, padding=1,
                         groups=dims // heads)
            m = F.layer_norm(m.permute(0, 2, 3, 1), (dims // heads,), norm.weight, norm.bias, 1e-6)
            per_head.append(m)
        pooled.append(torch.stack(per_head, 1))  # (B, heads, H', W', head_dims)
    q, k, v = pooled
    if window:
        q_box, kv_box = (window // q_stride,) * 2, (window // kv_stride,) * 2
        qp, kp, vp = zero_pad_to(q, q_box[0]), zero_pad_to(k, kv_box[0]), zero_pad_to(v, kv_box[0])
    else:
        q_box, kv_box = q.shape[2:4], k.shape[2:4]
        qp, kp, vp = q, k, v
    grid = (qp.shape[2] // q_box[0], qp.shape[3] // q_box[1])
    assert grid == (kp.shape[2] // kv_box[0], kp.shape[3] // kv_box[1])  # as many key windows as query ones
    out = torch.zeros_like(qp)
    for b, h, r, c in itertools.product(range(B), range(heads), range(grid[0]), range(grid[1])):
        qs = (slice(r * q_box[0], (r + 1) * q_box[0]), slice(c * q_box[1], (c + 1) * q_box[1]))
        ks = (slice(r * kv_box[0], (r + 1) * kv_box[0]), slice(c * kv_box[1], (c + 1) * kv_box[1]))
        out[b, h, qs[0], qs[1]] = window_attention(qp[b, h, qs[0], qs[1]], kp[b, h, ks[0], ks[1]],
                                                   vp[b, h, ks[0], ks[1]], attn.rel_pos_h, attn.rel_pos_w)
    out = out[:, :, :q.shape[2], :q.shape[3]] + q  # residual pooling
    out = out.permute(0, 2, 3, 1, 4).reshape(B, q.shape[2], q.shape[3], dims)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def reference_forward(model, x, plan, num_heads):
    """The backbone's arithmetic written out slowly: per block, per head, per window."""
    def ln(t, norm):
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, 1e-6)

    t = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=4, padding=3)
    t = t.permute(0, 2, 3, 1)
    outs = []
    for i, (block, (stage, q_stride, kv_stride, window)) in enumerate(zip(model.blocks, plan)):
        t_norm = ln(t, block.norm1)
        attended = reference_attention(block.attn, t_norm, num_heads[stage], q_stride, kv_stride, window)
        skip = t if block.proj is None else F.linear(t_norm, block.proj.weight, block.proj.bias)
        if q_stride > 1:
            skip = F.max_pool2d(skip.permute(0, 3, 1, 2), 3, 2, 1).permute(0, 2, 3, 1)
        t = skip + attended
        hidden = F.gelu(F.linear(ln(t, block.norm2), block.mlp.fc1.weight, block.mlp.fc1.bias))
        t = t + F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)
        if i + 1 == len(plan) or plan[i + 1][0] != stage:  # the stage's last block: its level
            outs.append(ln(t, getattr(model, OUT_NORMS[stage])).permute(0, 3, 1, 2))
    return outs


def test_windowed_detection_blocks_match_a_slow_reference():
    size = (100, 140)  # stage 1: a 25x35 grid in 16-token windows, zero-padded to 32x48
    torch.manual_seed(13)
    model = randomise_(small(window_size=16))
    assert [(s.stage, s.q_stride, s.kv_stride, s.window_size) for s in model.block_specs] == SMALL_PLAN_16
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(model, x, SMALL_PLAN_16, SMALL['num_heads'])
    sides = [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (4, 8, 16, 32)]
    assert [tuple(o.shape[2:]) for o in ours] == sides
    for level, (out, ref_map) in enumerate(zip(ours, ref)):
        assert relative_diff(out, ref_map) <= 1e-4, level


def test_windowed_detection_blocks_train_as_the_slow_reference():
    """A training step's gradients, which take the written-out attention and leave out the
    padding's queries in windows cut by the map's edge, equal the slow reference's."""
    size = (100, 140)  # every stride-1 and stride-2 block has full windows and cut ones
    torch.manual_seed(14)
    model = randomise_(small(window_size=16)).double().train()
    x = torch.randn(1, 3, *size, dtype=torch.float64, requires_grad=True)
    params = [x, *model.parameters()]
    grads = torch.autograd.grad(sum(o.square().mean() for o in model(x)), params)
    ref = reference_forward(model, x, SMALL_PLAN_16, SMALL['num_heads'])
    ref_grads = torch.autograd.grad(sum(o.square().mean() for o in ref), params)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_rel_pos_rows_follow_detectron2s_float32_arithmetic():
    """Where q and k lengths differ, detectron2 scales coordinates in float32 and truncates;
    for some lengths this picks another table row than exact arithmetic would. mmpvt picks
    detectron2's rows."""
    differing = []
    for q_len, k_len in itertools.product(range(1, 41), repeat=2):
        i, j = np.arange(q_len)[:, None], np.arange(k_len)[None, :]
        if k_len >= q_len:  # exact: floor(i * k / q - j + k - 1)
            exact = (i * k_len) // q_len - j + k_len - 1
        else:  # exact: floor(i + (k - 1 - j) * q / k)
            exact = i + ((k_len - 1 - j) * q_len) // k_len
        f32 = np.float32
        q_scale, k_scale = f32(max(k_len / q_len, 1.)), f32(max(q_len / k_len, 1.))
        offset = f32((k_len - 1) * max(q_len / k_len, 1.))
        d2 = ((i.astype(f32) * q_scale - j.astype(f32) * k_scale) + offset).astype(np.int64)
        if (d2 != exact).any():
            differing.append((q_len, k_len, d2))
    assert differing, 'float32 truncation never differs from exact arithmetic in this range'
    for q_len, k_len, d2 in differing:
        rows = 2 * max(q_len, k_len) - 1
        table = torch.arange(rows, dtype=torch.float32)[:, None]  # each row holds its own index
        assert torch.equal(rel_pos_lookup(q_len, k_len, table)[..., 0].long(), torch.from_numpy(d2))


# -- any input size -------------------------------------------------------------------------
def test_tiny_runs_at_detection_sizes_where_the_releases_fail():
    """timm and the official code index out of their tables above 224; detectron2's
    run-time resize lets any size of at least 32x32 through."""
    with torch.device('meta'):  # random weights suffice here: skip the initialisation
        model = MViTv2(arch='tiny')
    model = randomise_(model.to_empty(device='cpu'), std=.02)
    for shape in [(1, 3, 225, 290), (1, 3, 800, 1216)]:
        with torch.no_grad():
            outs = model(torch.randn(shape))
        sizes = [(math.ceil(shape[2] / s), math.ceil(shape[3] / s)) for s in (4, 8, 16, 32)]
        assert [tuple(o.shape) for o in outs] == [(1, c, *s) for c, s in zip((96, 192, 384, 768), sizes)]
        assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('shape', [(1, 3, 32, 32), (2, 3, 33, 47)])
def test_awkward_input_sizes_with_windows(shape):
    model = randomise_(small(window_size=16))
    with torch.no_grad():
        outs = model(torch.randn(shape))
    sizes = [(math.ceil(shape[2] / s), math.ceil(shape[3] / s)) for s in (4, 8, 16, 32)]
    assert [tuple(o.shape) for o in outs] == [(shape[0], c, *s) for c, s in zip(SMALL['embed_dims'], sizes)]
    assert all(torch.isfinite(o).all() for o in outs)


# -- training controls ----------------------------------------------------------------------
def test_output_norms_apply_to_a_copy_and_only_requested_levels_are_built():
    model = randomise_(small(window_size=16))
    x = torch.randn(1, 3, 64, 96)
    maps = {}
    for stage in range(4):  # the trunk's map at each stage's end
        model.blocks[model.stage_ends[stage]].register_forward_hook(
            lambda module, args, out, stage=stage: None if stage in maps else maps.update({stage: out[0]}))
    with torch.no_grad():
        outs = model(x)
        # the next stage got the un-normalised map: rerunning it from there gives the same output
        x2, _ = model.blocks[1](maps[0])
        x2, _ = model.blocks[2](x2)
    assert torch.equal(x2, maps[1])
    for level, out in enumerate(outs):
        norm = getattr(model, OUT_NORMS[level])
        assert torch.equal(out, norm(maps[level]).permute(0, 3, 1, 2))
    part = small(out_indices=(1, 2), window_size=16)
    assert [n for n in OUT_NORMS if hasattr(part, n)] == ['scale3_norm', 'scale4_norm']
    part.load_state_dict(model.state_dict())  # the other levels' norms are skipped
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(part.eval()(x), outs[1:3]))


def test_frozen_stages_freeze_the_stem_and_whole_stages():
    model = small(frozen_stages=2).train()
    frozen = [model.patch_embed, *model.blocks[:3]]  # stages 1 and 2: blocks 0, 1, 2
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(p.requires_grad for b in model.blocks[3:] for p in b.parameters())
    model = small(frozen_stages=4).train()
    assert not any(p.requires_grad for b in model.blocks for p in b.parameters())
    # the output norms are new layers: never frozen
    assert all(p.requires_grad for n in OUT_NORMS for p in getattr(model, n).parameters())


def test_layer_ids_for_layer_decay():
    model = small()
    assert model.num_layers == 8
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids['patch_embed.proj.weight'] == 0
    assert ids['blocks.0.attn.pool_q.weight'] == 1 and ids['blocks.7.mlp.fc2.bias'] == 8
    assert ids['blocks.3.proj.weight'] == 4
    # an output norm counts with the last block of its stage
    assert [ids[f'{n}.weight'] for n in OUT_NORMS] == [1, 3, 6, 8]
    for name in ('neck.lateral_convs.0.conv.weight', 'blocks.8.norm1.weight'):
        with pytest.raises(ValueError, match='no parameter'):
            model.layer_id(name)
    with pytest.raises(ValueError, match='no parameter'):
        small(out_indices=(3,)).layer_id('scale2_norm.weight')


def test_with_cp_gives_equal_loss_and_gradients():
    x = torch.randn(2, 3, 64, 80)
    results = []
    for with_cp in (False, True):
        torch.manual_seed(5)
        model = MViTv2(arch=dict(SMALL), drop_path_rate=0.3, window_size=16, with_cp=with_cp)
        model = randomise_(model).train()
        torch.manual_seed(6)  # the same stochastic-depth draws
        loss = sum(o.square().mean() for o in model(x))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_cp, grads_cp) = results
    assert torch.equal(loss_plain, loss_cp)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_cp[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # Without stochastic depth (which may drop a whole attention branch), every relative-position
    # table and pooling kernel learns.
    model = randomise_(small(window_size=16)).train()
    sum(o.square().mean() for o in model(x)).backward()
    learning = [n for n, p in model.named_parameters() if 'rel_pos' in n or '.pool_' in n]
    assert len(learning) == 8 * 5 and all(model.get_parameter(n).grad.abs().sum() > 0 for n in learning)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match='valid names: tiny, small, base, large, large_in1k, huge'):
        MViTv2(arch='gigantic')
    with pytest.raises(ValueError, match='arch dict lacks depths'):
        MViTv2(arch=dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)))
    message = r'depths must be 4 positive integers, one per stage; got \(1, 2, 3\)'
    with pytest.raises(ValueError, match=message):
        MViTv2(arch=dict(SMALL, depths=(1, 2, 3)))
    with pytest.raises(ValueError, match=r'must divide embed_dims in every stage; stage\(s\) \[2\]'):
        MViTv2(arch=dict(SMALL, num_heads=(1, 2, 3, 8)))
    for window in (12, -8):
        with pytest.raises(ValueError, match=f'window_size must be 0 .* multiple of 8.*got {window}'):
            small(window_size=window)
    with pytest.raises(ValueError, match='H, W >= 32'):
        small()(torch.randn(1, 3, 64, 31))


# -- checkpoint layouts ---------------------------------------------------------------------
def load_through_init_cfg(path, **kwargs):
    model = small(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


def _trunk(state):
    """The state without the output norms, which only detectron2 and mmpvt files hold."""
    return {k: v for k, v in state.items() if not k.startswith(OUT_NORMS)}


def to_official(state):
    """The official release: ``model_state`` with the final norm and the head."""
    model_state = dict(_trunk(state))
    model_state.update({'norm.weight': torch.randn(128), 'norm.bias': torch.randn(128),
                        'head.projection.weight': torch.randn(10, 128),
                        'head.projection.bias': torch.zeros(10)})
    return {'model_state': model_state, 'epoch': 300}


def to_timm(state, depths=SMALL['depths']):
    """timm's mvitv2: blocks numbered per stage, shortcut_proj_attn, final norm and head.fc."""
    stage_of = [s for s, d in enumerate(depths) for _ in range(d)]
    first = [sum(depths[:s]) for s in range(len(depths))]
    out = {}
    for key, value in _trunk(state).items():
        if m := re.match(r'blocks\.(\d+)\.(.*)', key):
            i, rest = int(m[1]), re.sub(r'^proj\.', 'shortcut_proj_attn.', m[2])
            key = f'stages.{stage_of[i]}.blocks.{i - first[stage_of[i]]}.{rest}'
        out[key] = value
    out.update({'norm.weight': torch.ones(128), 'norm.bias': torch.zeros(128),
                'head.fc.weight': torch.randn(10, 128), 'head.fc.bias': torch.zeros(10)})
    return out


def to_detectron2(state):
    """detectron2's detector: FPN(bottom_up=MViT) is the backbone; its output norms are MViT's."""
    d2 = {f'backbone.bottom_up.{k}': v for k, v in state.items()}
    for k in (2, 3):
        d2[f'backbone.fpn_lateral{k}.weight'] = torch.randn(8, 16 * 2 ** (k - 2), 1, 1)
        d2[f'backbone.fpn_output{k}.weight'] = torch.randn(8, 8, 3, 3)
    d2['proposal_generator.rpn_head.conv.conv0.weight'] = torch.randn(8, 8, 3, 3)
    d2['roi_heads.box_predictor.cls_score.weight'] = torch.randn(81, 16)
    d2['pixel_mean'] = torch.zeros(3, 1, 1)
    return d2


def to_mmpretrain(state):
    """mmpretrain's ImageClassifier with MViT: ``backbone.``, mmcv's ``patch_embed.projection``,
    the final norm as ``norm3`` and ``head.fc``."""
    mm = {'backbone.' + k.replace('patch_embed.proj.', 'patch_embed.projection.'): v
          for k, v in _trunk(state).items()}
    mm.update({'backbone.norm3.weight': torch.randn(128), 'backbone.norm3.bias': torch.randn(128),
               'head.fc.weight': torch.randn(10, 128), 'head.fc.bias': torch.zeros(10)})
    return {'meta': {'epoch': 100}, 'state_dict': mm}


def save_pickle(state, path, protocol):
    """detectron2's model-zoo .pkl: a plain pickle of numpy arrays under ``model``."""
    with open(path, 'wb') as f:
        pickle.dump({'model': {k: v.numpy() for k, v in state.items()}, '__author__': 'Detectron2 Model Zoo',
                     'matching_heuristics': True}, f, protocol=protocol)


def write_layout(layout, source, path):
    if layout == 'official':
        torch.save(to_official(source), path)
    elif layout == 'timm':
        torch.save(to_timm(source), path)
    elif layout == 'detectron2_pth':
        torch.save({'model': to_detectron2(source), 'iteration': 67499}, path)
    elif layout.startswith('detectron2_pkl'):
        save_pickle(to_detectron2(source), path, protocol=int(layout[-1]))
    elif layout == 'mmpretrain':
        torch.save(to_mmpretrain(source), path)
    elif layout == 'mmpvt_detector':
        detector = {f'backbone.{k}': v for k, v in source.items()}
        detector['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
        torch.save({'meta': {'epoch': 12}, 'state_dict': detector}, path)
    else:
        torch.save(source, path)


CLASSIFICATION_LAYOUTS = ('official', 'timm', 'mmpretrain')


@pytest.mark.parametrize('layout,detected', [
    ('official', 'official'), ('timm', 'timm'), ('detectron2_pth', 'detectron2'),
    ('detectron2_pkl2', 'detectron2'), ('detectron2_pkl4', 'detectron2'), ('mmpretrain', 'mmpretrain'),
    ('mmpvt', 'mmpvt'), ('mmpvt_detector', 'mmpvt')])
def test_every_layout_loads_every_backbone_tensor(layout, detected, tmp_path, log_lines):
    source = randomise_(small()).state_dict()
    path = tmp_path / ('model_final.pkl' if 'pkl' in layout else 'model.pth')
    write_layout(layout, source, path)
    assert MViTv2.checkpoint_format.layout(load_checkpoint_file(path)) == detected
    torch.manual_seed(3)
    fresh = small().state_dict()
    torch.manual_seed(3)  # the same initialisation, then the load
    loaded = load_through_init_cfg(path).state_dict()
    assert 'MViTv2: missing keys: none' in log_lines and 'MViTv2: unexpected keys: none' in log_lines
    assert loaded.keys() == source.keys()
    classification = layout in CLASSIFICATION_LAYOUTS
    for key in source:
        expected = fresh[key] if classification and key.startswith(OUT_NORMS) else source[key]
        assert torch.equal(loaded[key], expected), key
    warned = [line for line in log_lines if 'has no output norms' in line]
    assert warned == (['MViTv2: the checkpoint has no output norms (expected of a pre-training or '
                       'classification file): 8 tensors keep their initialisation'] if classification else [])


def test_classifier_final_norms_never_become_output_norms():
    """The official/timm ``norm`` and mmpretrain's ``norm3`` normalise the classifier's last
    stage; detectron2's output norms are new. Both are dropped, never renamed."""
    source = randomise_(small()).state_dict()
    for checkpoint in (to_official(source), to_timm(source), to_mmpretrain(source)):
        converted = MViTv2.convert_state_dict(checkpoint)
        assert not any(k.startswith(('norm', 'head', 'backbone.', 'scale')) for k in converted)
        assert converted.keys() == _trunk(source).keys()


@pytest.mark.parametrize('layout', ['official', 'timm', 'detectron2', 'mmpretrain', 'mmpvt'])
def test_conversion_is_pure_and_idempotent(layout):
    source = randomise_(small()).state_dict()
    checkpoint = {'official': lambda: to_official(source), 'timm': lambda: to_timm(source),
                  'detectron2': lambda: {'model': to_detectron2(source)},
                  'mmpretrain': lambda: to_mmpretrain(source), 'mmpvt': lambda: source}[layout]()
    flat = MViTv2.checkpoint_format.unwrap(checkpoint)
    before = {k: v.clone() for k, v in flat.items()}
    once = MViTv2.convert_state_dict(checkpoint)
    twice = MViTv2.convert_state_dict(once)
    assert list(once) == list(twice) and all(torch.equal(once[k], twice[k]) for k in once)
    assert flat.keys() == before.keys() and all(torch.equal(flat[k], before[k]) for k in flat)
    assert set(once) <= set(source)


def test_other_variants_and_partial_files_are_refused_by_key_and_shapes(tmp_path):
    wide = MViTv2(arch=dict(SMALL, embed_dims=(32, 64, 128, 256)))
    torch.save(wide.state_dict(), tmp_path / 'wide.pth')
    with pytest.raises(CheckpointError, match=r'wide\.pth: .*patch_embed\.proj\.weight has shape '
                                              r'\(32, 3, 7, 7\) in the checkpoint and \(16, 3, 7, 7\)'):
        load_through_init_cfg(tmp_path / 'wide.pth')
    shorter = MViTv2(arch=dict(SMALL, depths=(1, 2, 3, 1)))
    torch.save(to_official(shorter.state_dict()), tmp_path / 'short.pyth')
    with pytest.raises(CheckpointError, match=r'blocks\.7\..* is missing from the checkpoint'):
        load_through_init_cfg(tmp_path / 'short.pyth')
    state = small().state_dict()
    del state['scale3_norm.weight']  # some output norms but not all: not a classification file
    torch.save(state, tmp_path / 'partial.pth')
    with pytest.raises(CheckpointError, match=r'scale3_norm\.weight is missing from the checkpoint'):
        load_through_init_cfg(tmp_path / 'partial.pth')
    state = _trunk(small().state_dict())
    del state['blocks.2.attn.rel_pos_w']  # a classification file missing a trunk tensor
    torch.save(state, tmp_path / 'trunk.pth')
    with pytest.raises(CheckpointError, match=r'blocks\.2\.attn\.rel_pos_w is missing from the checkpoint'):
        load_through_init_cfg(tmp_path / 'trunk.pth')


def test_tables_of_other_lengths_are_resized_on_load(tmp_path):
    source = randomise_(small()).state_dict()
    table = torch.randn(63, 16)  # a table learned for a 32-token grid instead of 56
    source['blocks.0.attn.rel_pos_h'] = table
    torch.save(source, tmp_path / 'other_size.pth')
    loaded = load_through_init_cfg(tmp_path / 'other_size.pth').state_dict()
    ref = F.interpolate(table.t()[None], size=111, mode='linear', align_corners=False)[0].t()
    assert torch.allclose(loaded['blocks.0.attn.rel_pos_h'], ref, atol=1e-6)
    assert torch.equal(loaded['blocks.0.attn.rel_pos_w'], source['blocks.0.attn.rel_pos_w'])


def test_output_norms_outside_out_indices_are_skipped_on_load(tmp_path, log_lines):
    source = randomise_(small()).state_dict()
    torch.save(source, tmp_path / 'full.pth')
    model = load_through_init_cfg(tmp_path / 'full.pth', out_indices=(1, 2))
    assert any('skipped 4 checkpoint tensors of output norms outside out_indices (1, 2)' in line
               for line in log_lines)
    assert torch.equal(model.scale3_norm.weight, source['scale3_norm.weight'])


def mvit_files():
    """An MViTv2 state in every layout, as each family's unwrapping sees it."""
    source = small().state_dict()
    return {'official': to_official(source), 'timm': to_timm(source),
            'detectron2': {'model': to_detectron2(source)}, 'mmpretrain': to_mmpretrain(source),
            'mmpvt': source}


def test_families_recognise_only_their_own_files():
    for checkpoint in mvit_files().values():
        with pytest.raises(ValueError, match='not a plain ViT state dict'):
            ViTDet.checkpoint_format.layout(checkpoint)
        with pytest.raises(ValueError, match='not a PVT state dict'):
            PVTv2.checkpoint_format.layout(checkpoint)
    torch.manual_seed(8)
    vit = timm.create_model('vit_base_patch16_224', pretrained=False, embed_dim=64, depth=2, num_heads=2)
    for other in (vit.state_dict(), timm.create_model('pvt_v2_b0', pretrained=False).state_dict()):
        with pytest.raises(ValueError, match='not an MViTv2 state dict'):
            MViTv2.convert_state_dict(other)


def test_convert_checkpoint_cli_handles_mvit(tmp_path, capsys):
    source = randomise_(small()).state_dict()
    save_pickle(to_detectron2(source), tmp_path / 'model_final.pkl', protocol=4)
    # The tool's entry point in this process (a subprocess would only add the interpreter start).
    spec = importlib.util.spec_from_file_location('tool', ROOT_DIR / 'tools' / 'convert_checkpoint.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path / 'model_final.pkl'), str(tmp_path / 'out.pth')]) == 0
    stdout = capsys.readouterr().out
    assert 'mvit family, detectron2 layout' in stdout
    listed = stdout.split('dropped (not used by the backbone): ')[1].strip().split(', ')
    fpn = [f'backbone.fpn_{kind}{k}.weight' for kind in ('lateral', 'output') for k in (2, 3)]
    heads = ['pixel_mean', 'proposal_generator.rpn_head.conv.conv0.weight',
             'roi_heads.box_predictor.cls_score.weight']
    assert sorted(listed) == sorted(fpn + heads)
    model = small()
    model.load_state_dict(torch.load(tmp_path / 'out.pth', weights_only=True), strict=True)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    # every layout is recognised as MViTv2 without --type; forcing another family is an error
    assert {layout: tool.detect_family(c) for layout, c in mvit_files().items()} == dict.fromkeys(
        mvit_files(), 'mvit')
    assert tool.main(['--type', 'pvt', str(tmp_path / 'model_final.pkl'), str(tmp_path / 'x.pth')]) == 1
    assert 'not a PVT state dict' in capsys.readouterr().err and not (tmp_path / 'x.pth').exists()
