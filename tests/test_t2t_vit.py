"""T2T-ViT: the variants and their faithful modules, any input size, parity with an independent
reference of the authors' model, and every checkpoint layout it loads.

The reference below is written from the paper and the authors' code (yitu-opensource/T2T-ViT:
models/t2t_vit.py, token_transformer.py, token_performer.py, transformer_block.py): plain
tensor arithmetic on a state dict under the authors' keys, explicit softmax, the performer's
kernel attention as an explicit N x N weight matrix, no mmpvt code. Writers of the other
layouts (the timm training script's files, mmpretrain's ``T2T_ViT``) use the key names of the
code that writes them, never mmpvt's converter run backwards.
"""
import argparse
import importlib.util
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
from torch import nn

from mmpvt.checkpoint import CheckpointError, load_checkpoint_file
from mmpvt.models import PVTv2, T2TViT, ViTDet
from mmpvt.models.layers import LayerNorm2d
from mmpvt.models.t2t_vit import T2T_ARCHS, sinusoid_table

ROOT_DIR = Path(__file__).resolve().parents[1]
# Small columns for everything that runs: narrow token layers, four blocks.
SMALL = dict(embed_dims=64, depth=4, num_heads=2, mlp_ratio=2., token_dims=16)


def small(tokens='performer', **kwargs):
    kwargs.setdefault('drop_path_rate', 0.)
    return T2TViT(arch=dict(SMALL, tokens_type=tokens), **kwargs)


def relative_diff(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


# -- an independent reference of the authors' model ---------------------------------------------
def official_sinusoid(positions, dims):
    """The authors' get_sinusoid_encoding, in numpy as they write it."""
    table = np.array([[p / np.power(10000, 2 * (j // 2) / dims) for j in range(dims)]
                      for p in range(positions)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.FloatTensor(table).unsqueeze(0)


def official_state_dict(arch, img_size=224, seed=0, in_channels=3, classes=1000, token_qkv_gain=1.):
    """Random weights under the authors' keys and shapes: a T2T_ViT with its classifier.

    Scales keep every nonlinearity in its curved range: unit-variance projections, and
    performer keys and queries of squared norm ~6, where the random features neither vanish
    nor explode. ``token_qkv_gain`` scales the transformer token layers' q, k, v.
    """
    gen = torch.Generator().manual_seed(seed)
    dims, tokens = arch['embed_dims'], arch.get('token_dims', 64)
    state = {}

    def linear(name, out_dims, in_dims, bias=True, gain=1.):
        state[f'{name}.weight'] = torch.randn(out_dims, in_dims, generator=gen) * gain / math.sqrt(in_dims)
        if bias:
            state[f'{name}.bias'] = torch.randn(out_dims, generator=gen) * .1

    def norm(name, n):
        state[f'{name}.weight'] = 1 + torch.randn(n, generator=gen) * .1
        state[f'{name}.bias'] = torch.randn(n, generator=gen) * .1

    state['cls_token'] = torch.randn(1, 1, dims, generator=gen) * .5
    state['pos_embed'] = official_sinusoid((img_size // 16) ** 2 + 1, dims)
    for i, in_dims in ((1, in_channels * 7 * 7), (2, tokens * 3 * 3)):
        p = f'tokens_to_token.attention{i}'
        if arch['tokens_type'] == 'performer':  # Token_performer(dim=in_dims, in_dim=tokens)
            m = tokens // 2
            q, _ = torch.linalg.qr(torch.randn(tokens, m, generator=gen))  # orthonormal columns
            state[f'{p}.w'] = q.t() * math.sqrt(m)
            linear(f'{p}.kqv', 3 * tokens, in_dims, gain=.3)
            linear(f'{p}.proj', tokens, tokens)
            norm(f'{p}.norm1', in_dims)
            norm(f'{p}.norm2', tokens)
            linear(f'{p}.mlp.0', tokens, tokens)
            linear(f'{p}.mlp.2', tokens, tokens)
        else:  # Token_transformer(dim=in_dims, in_dim=tokens, num_heads=1, mlp_ratio=1.0)
            norm(f'{p}.norm1', in_dims)
            linear(f'{p}.attn.qkv', 3 * tokens, in_dims, bias=False, gain=token_qkv_gain)
            linear(f'{p}.attn.proj', tokens, tokens)
            norm(f'{p}.norm2', tokens)
            linear(f'{p}.mlp.fc1', tokens, tokens)
            linear(f'{p}.mlp.fc2', tokens, tokens)
    linear('tokens_to_token.project', dims, tokens * 3 * 3)
    hidden = int(dims * arch['mlp_ratio'])
    for i in range(arch['depth']):
        norm(f'blocks.{i}.norm1', dims)
        linear(f'blocks.{i}.attn.qkv', 3 * dims, dims, bias=False)
        linear(f'blocks.{i}.attn.proj', dims, dims)
        norm(f'blocks.{i}.norm2', dims)
        linear(f'blocks.{i}.mlp.fc1', hidden, dims)
        linear(f'blocks.{i}.mlp.fc2', dims, hidden)
    norm('norm', dims)
    linear('head', classes, dims)
    return state


def ref_layer_norm(x, state, name):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * state[f'{name}.weight'] + state[f'{name}.bias']


def ref_linear(x, state, name):
    y = x @ state[f'{name}.weight'].t()
    return y + state[f'{name}.bias'] if f'{name}.bias' in state else y


def ref_softmax(logits):
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_mlp(x, state, fc1, fc2):
    return ref_linear(ref_gelu(ref_linear(x, state, fc1)), state, fc2)


def ref_token_transformer(x, state, p, logit_scale=None):
    """Token_transformer: one head, logits scaled by the input width ** -0.5, skip from v."""
    scale = x.shape[-1] ** -0.5 if logit_scale is None else logit_scale
    q, k, v = ref_linear(ref_layer_norm(x, state, f'{p}.norm1'), state, f'{p}.attn.qkv').chunk(3, dim=-1)
    y = v + ref_linear(ref_softmax((q * scale) @ k.transpose(1, 2)) @ v, state, f'{p}.attn.proj')
    return y + ref_mlp(ref_layer_norm(y, state, f'{p}.norm2'), state, f'{p}.mlp.fc1', f'{p}.mlp.fc2')


def ref_token_performer(x, state, p):
    """Token_performer: k, q, v in that order; attention weights phi(q) . phi(k), normalised
    over the keys (+1e-8), with phi(x) = exp(w x - |x|^2 / 2) / sqrt(m); skip from v."""
    k, q, v = ref_linear(ref_layer_norm(x, state, f'{p}.norm1'), state, f'{p}.kqv').chunk(3, dim=-1)
    w = state[f'{p}.w']

    def phi(t):
        return torch.exp(t @ w.t() - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    weights = phi(q) @ phi(k).transpose(1, 2)  # (B, N, N): explicit, unlike the performer's trick
    y = v + ref_linear(weights @ v / (weights.sum(-1, keepdim=True) + 1e-8), state, f'{p}.proj')
    return y + ref_mlp(ref_layer_norm(y, state, f'{p}.norm2'), state, f'{p}.mlp.0', f'{p}.mlp.2')


def ref_unfold_size(n, kernel, stride, padding):
    return (n + 2 * padding - kernel) // stride + 1


def ref_position_table(table, hw):
    """The table for an (h, w) grid, resized the authors' way for transfer: the class row
    kept, the square grid resized bicubically (align_corners=False)."""
    side = math.isqrt(table.shape[1] - 1)
    if (side, side) == tuple(hw):
        return table
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(hw), mode='bicubic', align_corners=False)
    return torch.cat([table[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


def reference_t2t(state, arch, x, token_logit_scale=None):
    """The authors' forward_features up to the final norm, with the patch tokens as a
    (B, C, h, w) map: the stride-16 map the backbone puts out at level 2."""
    layer = ref_token_performer if arch['tokens_type'] == 'performer' else (
        lambda t, s, p: ref_token_transformer(t, s, p, token_logit_scale))
    B = x.shape[0]
    hw = tuple(x.shape[2:])
    t = x
    for i, (kernel, stride, padding) in enumerate(((7, 4, 2), (3, 2, 1), (3, 2, 1))):
        if i:  # back to the token grid
            t = t.transpose(1, 2).reshape(B, -1, *hw)
        t = F.unfold(t, kernel, padding=padding, stride=stride).transpose(1, 2)  # the soft split
        hw = tuple(ref_unfold_size(n, kernel, stride, padding) for n in hw)
        if i < 2:
            t = layer(t, state, f'tokens_to_token.attention{i + 1}')
    t = ref_linear(t, state, 'tokens_to_token.project')
    t = torch.cat([state['cls_token'].expand(B, -1, -1), t], dim=1)
    t = t + ref_position_table(state['pos_embed'], hw)
    heads = arch['num_heads']
    for i in range(arch['depth']):
        p = f'blocks.{i}'
        N, C = t.shape[1:]
        qkv = ref_linear(ref_layer_norm(t, state, f'{p}.norm1'), state, f'{p}.attn.qkv')
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ref_softmax((q * (C // heads) ** -0.5) @ k.transpose(-2, -1))
        t = t + ref_linear((attn @ v).transpose(1, 2).reshape(B, N, C), state, f'{p}.attn.proj')
        t = t + ref_mlp(ref_layer_norm(t, state, f'{p}.norm2'), state, f'{p}.mlp.fc1', f'{p}.mlp.fc2')
    t = ref_layer_norm(t, state, 'norm')
    return t[:, 1:].transpose(1, 2).reshape(B, -1, *hw)


# -- writers of the other layouts -----------------------------------------------------------------
def training_script_file(state, ema_state, model='t2t_vit_7'):
    """A checkpoint as timm's train.py (the authors' training script) saves it: the model
    and its EMA under ``module.`` (DataParallel), the optimizer's state, the AMP scaler's,
    and the script's arguments as an argparse.Namespace."""
    param = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=5e-4, weight_decay=0.05)
    param.square().sum().backward()
    optimizer.step()
    args = argparse.Namespace(model=model, lr=5e-4, weight_decay=0.05, drop_path=0.1, img_size=224,
                              model_ema=True, model_ema_decay=0.99996, amp=True, output='', mean=None)
    return {'epoch': 309, 'arch': model, 'version': 2, 'metric': 71.7,
            'state_dict': {f'module.{k}': v for k, v in state.items()},
            'state_dict_ema': {f'module.{k}': v for k, v in ema_state.items()},
            'optimizer': optimizer.state_dict(), 'args': args,
            'amp_scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
                           'growth_interval': 2000, '_growth_tracker': 0}}


def to_mmpretrain(state):
    """mmpretrain's ImageClassifier around T2T_ViT: ``backbone.encoder.{i}`` with ``ln1``,
    ``ln2``, ``ffn.layers.0.0``, ``ffn.layers.1`` (mmcv's FFN) in the blocks and in the token
    layers, the classifier at ``head.layers.head``."""
    renames = (('.norm1.', '.ln1.'), ('.norm2.', '.ln2.'), ('.mlp.fc1.', '.ffn.layers.0.0.'),
               ('.mlp.fc2.', '.ffn.layers.1.'))
    out = {}
    for key, value in state.items():
        if key.startswith('head.'):
            out['head.layers.' + key] = value
            continue
        if key.startswith('blocks.'):
            key = 'encoder.' + key[len('blocks.'):]
        for old, new in renames:
            key = key.replace(old, new)
        out['backbone.' + key] = value
    return {'meta': {'epoch': 310, 'mmpretrain_version': '1.2.0'}, 'state_dict': out}


def mmpvt_detector(state):
    detector = {f'backbone.{k}': v for k, v in state.items()}
    detector['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    detector['bbox_head.cls_convs.0.conv.weight'] = torch.zeros(1)
    return {'meta': {'epoch': 12}, 'state_dict': detector}


def load_through_init_cfg(path, arch, **kwargs):
    model = T2TViT(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    model.init_weights()
    return model.eval()


# -- variants and their faithful modules --------------------------------------------------------
# The authors' builds without the 1000-class head (transformer_facts.md 2.2): every tensor,
# frozen ones included (the official count), and the trainable ones (mmpretrain's convention,
# the sinusoid table and the performers' w left out).
ALL_TENSORS = {'7': 4_053_222, '10': 5_632_230, '12': 6_684_902, '14': 21_160_550, '19': 38_728_422,
               '24': 63_592_934, 't_14': 21_156_070, 't_19': 38_723_942, 't_24': 63_588_454,
               '14_resnext': 21_160_550, '14_wide': 24_387_302}
TRAINABLE = {'7': 3_998_694, '10': 5_577_702, '12': 6_630_374, '14': 21_080_806, '19': 38_636_070,
             '24': 63_487_974, 't_14': 21_080_422, 't_19': 38_635_686, 't_24': 63_487_590,
             '14_resnext': 21_080_806, '14_wide': 24_231_910}


@pytest.mark.parametrize('arch', list(ALL_TENSORS))
def test_parameter_counts_match_the_official_build(arch):
    with torch.device('meta'):
        model = T2TViT(arch=arch)
    in_pyramid = lambda name: name.startswith(('scale_x4.', 'scale_x2.'))  # noqa: E731
    column = sum(t.numel() for k, t in model.state_dict().items() if not in_pyramid(k))
    trainable = sum(p.numel() for k, p in model.named_parameters() if p.requires_grad and not in_pyramid(k))
    assert column == ALL_TENSORS[arch]
    assert trainable == TRAINABLE[arch]
    # The pyramid apart: deconv C -> C/2 (+ LayerNorm, deconv C/2 -> C/4) and deconv C -> C/2.
    C = model.arch_settings['embed_dims']
    pyramid = sum(p.numel() for k, p in model.named_parameters() if in_pyramid(k))
    assert pyramid == (2 * C * C + C // 2) + C + (C * C // 2 + C // 4) + (2 * C * C + C // 2)


def test_variant_table_and_output_contract():
    fields = ('embed_dims', 'depth', 'num_heads', 'mlp_ratio', 'token_dims')
    with torch.device('meta'):  # each variant as the model resolves it (its defaults filled in)
        resolved = {k: T2TViT(arch=k).arch_settings for k in T2T_ARCHS}
    table = {k: (v['tokens_type'][0], *(v[f] for f in fields)) for k, v in resolved.items()}
    assert table == {
        '7': ('p', 256, 7, 4, 2, 64), '10': ('p', 256, 10, 4, 2, 64), '12': ('p', 256, 12, 4, 2, 64),
        '14': ('p', 384, 14, 6, 3, 64), '19': ('p', 448, 19, 7, 3, 64), '24': ('p', 512, 24, 8, 3, 64),
        't_14': ('t', 384, 14, 6, 3, 64), 't_19': ('t', 448, 19, 7, 3, 64), 't_24': ('t', 512, 24, 8, 3, 64),
        '14_resnext': ('p', 384, 14, 32, 3, 64), '14_wide': ('p', 768, 4, 12, 3, 64)}
    with torch.device('meta'):
        model = T2TViT(arch='14')
    assert model.out_channels == (96, 192, 384, 384) and model.out_strides == (4, 8, 16, 32)
    assert model.size_divisor == 32 and model.min_input_size == 32
    assert model.pos_embed.shape == (1, 197, 384) and model.pos_grid == (14, 14)


def test_token_layers_and_blocks_keep_the_authors_quirks():
    with torch.device('meta'):
        performer, transformer = T2TViT(arch='14'), T2TViT(arch='t_14')
        mmpretrain = T2TViT(arch='t_14', token_scale='mmpretrain')
    t2t = performer.tokens_to_token
    for layer, in_dims in ((t2t.attention1, 147), (t2t.attention2, 576)):
        assert layer.kqv.weight.shape == (192, in_dims) and layer.kqv.bias is not None
        assert layer.w.shape == (32, 64) and 'w' not in dict(layer.named_parameters())  # a buffer: frozen
        assert layer.dp.p == layer.mlp[3].p == 0.1  # hard-coded dropouts
    for i, in_dims in ((1, 147), (2, 576)):
        layer = getattr(transformer.tokens_to_token, f'attention{i}')
        assert layer.attn.qkv.bias is None and layer.attn.qkv.weight.shape == (192, in_dims)
        assert layer.attn.logit_scale == in_dims ** -0.5  # the input width's scale, not 64's
        assert getattr(mmpretrain.tokens_to_token, f'attention{i}').attn.logit_scale == 8.0
    assert all(b.attn.qkv.bias is None for b in transformer.blocks)
    eps = {m.eps for m in transformer.modules() if type(m) is nn.LayerNorm}
    assert eps == {1e-5}
    assert set(transformer.state_dict()) >= {'cls_token', 'pos_embed', 'norm.weight'}
    assert 'pos_embed' not in dict(transformer.named_parameters())


def test_position_table_is_the_authors_sinusoid():
    assert torch.allclose(sinusoid_table(197, 384), official_sinusoid(197, 384), atol=1e-6, rtol=0)
    assert torch.equal(small().pos_embed, sinusoid_table(197, 64))


def test_performer_features_come_from_the_checkpoint_not_a_new_draw():
    torch.manual_seed(1)
    a = small().eval()
    torch.manual_seed(2)
    b = small().eval()
    assert not torch.equal(a.tokens_to_token.attention1.w, b.tokens_to_token.attention1.w)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(a(x), b(x)))


def test_performer_dropout_is_active_in_training_only():
    model = small()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(model.train()(x)[2], model(x)[2])
        assert torch.equal(model.eval()(x)[2], model(x)[2])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_performer_kernel_runs_in_float32_under_autocast(monkeypatch, dtype):
    """Under autocast the performers' linear layers run in the autocast dtype, their kernel
    arithmetic (features, key-value sums, normaliser) in float32: its exponentials overflow
    and its 1e-8 vanishes in half precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmpvt.models import t2t_vit

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.ops.append((func.overloadpacket.__name__, out.dtype))
            return out

    recorded = []
    forward = t2t_vit.TokenPerformer.forward

    def recording_forward(self, x):
        with Dtypes() as mode:
            out = forward(self, x)
        recorded.append(mode.ops)
        return out

    monkeypatch.setattr(t2t_vit.TokenPerformer, 'forward', recording_forward)
    with torch.no_grad(), torch.autocast('cpu', dtype):
        out = small().eval()(torch.randn(1, 3, 64, 64))
    assert len(recorded) == 2 and torch.isfinite(out[2]).all()
    for ops in recorded:
        assert {dt for op, dt in ops if op == 'addmm'} == {dtype}  # kqv, proj, the MLP
        kernel = [dt for op, dt in ops if op in ('mm', 'bmm', 'exp', 'div')]
        assert len(kernel) >= 8 and set(kernel) == {torch.float32}, ops


# -- any input size -----------------------------------------------------------------------------
def expected_sizes(h, w):
    """The four levels' sizes from the soft splits' arithmetic (unfold 7/4/2, 3/2/1, 3/2/1)."""
    for kernel, stride, padding in ((7, 4, 2), (3, 2, 1), (3, 2, 1)):
        h, w = ref_unfold_size(h, kernel, stride, padding), ref_unfold_size(w, kernel, stride, padding)
    return [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (h // 2, w // 2)]


@pytest.mark.parametrize('shape', [(1, 3, 224, 224), (1, 3, 225, 290), (2, 3, 512, 768)])
def test_maps_at_any_size(shape):
    sizes = expected_sizes(*shape[2:])

    def expected(model):
        return [(shape[0], c, *s) for c, s in zip(model.out_channels, sizes)]

    cases = [('performer', small('performer'))]
    if shape[-1] < 512:  # the transformer tokens' first layer is quadratic: the big size runs on meta
        cases.append(('transformer', small('transformer')))
    for _, model in cases:
        with torch.no_grad():
            outs = model.eval()(torch.randn(shape))
        assert [tuple(o.shape) for o in outs] == expected(model)
        assert all(torch.isfinite(o).all() for o in outs)
    with torch.device('meta'):
        for arch in ('14', 't_14'):
            model = T2TViT(arch=arch).eval()
            outs = model(torch.empty(shape))
            assert [tuple(o.shape) for o in outs] == expected(model)


def test_levels_derive_from_the_stride16_map():
    model = small().eval()
    with torch.no_grad():
        x4, x8, x16, x32 = model(torch.randn(1, 3, 64, 96))
        assert torch.equal(x32, F.max_pool2d(x16, 2, 2))
        assert torch.allclose(x8, model.scale_x2(x16)) and torch.allclose(x4, model.scale_x4(x16))
    assert [type(m) for m in model.scale_x4] == [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d]
    assert not hasattr(small(out_indices=(2, 3)), 'scale_x4')


def test_first_token_layer_never_forms_the_n_by_n_matrix():
    """67,200 tokens at 800x1344 would need an 18 GB matrix; at 256x256 (4,096 tokens) a
    64 MB one would show up in the profiler's allocations."""
    model = T2TViT(arch=dict(embed_dims=64, depth=1, num_heads=2, mlp_ratio=2., tokens_type='transformer'),
                   out_indices=(2,)).eval()
    x = torch.randn(1, 3, 256, 256)
    tokens = (256 // 4) ** 2
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                  profile_memory=True) as prof:
        model(x)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest < tokens * tokens * 4 / 4, largest


# -- parity with the reference --------------------------------------------------------------------
def test_performer_variant_7_from_a_release_file_matches_the_reference(tmp_path, log_lines):
    """T2T-ViT-7 at 224, loaded through init_cfg from a training-script file: its EMA weights
    (module.-prefixed), not the plain ones, give the reference's map."""
    arch = T2T_ARCHS['7']
    ema, plain = official_state_dict(arch, seed=1), official_state_dict(arch, seed=2)
    torch.save(training_script_file(plain, ema), tmp_path / 't2t_vit_7.pth.tar')
    model = load_through_init_cfg(tmp_path / 't2t_vit_7.pth.tar', '7', out_indices=(2, 3))
    assert 'T2TViT: missing keys: none' in log_lines and 'T2TViT: unexpected keys: none' in log_lines
    assert any('EMA weights' in line for line in log_lines)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        x16, x32 = model(x)
        ref = reference_t2t(ema, arch, x)
    assert x16.shape == (1, 256, 14, 14)
    assert relative_diff(x16, ref) <= 1e-5
    assert relative_diff(x32, F.max_pool2d(ref, 2, 2)) <= 1e-5


def test_transformer_variant_t14_matches_the_reference():
    arch = T2T_ARCHS['t_14']
    state = official_state_dict(arch, seed=3)
    with torch.device('meta'):  # no initialisation: every tensor comes from the state dict
        model = T2TViT(arch='t_14', out_indices=(2,)).eval()
    model.load_state_dict(T2TViT.convert_state_dict(state), strict=True, assign=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model(x)[0]
        ref = reference_t2t(state, arch, x)
    assert relative_diff(ours, ref) <= 1e-5


@pytest.mark.parametrize('tokens', ['performer', 'transformer'])
def test_non_square_input_matches_the_reference_with_the_resized_table(tokens):
    arch = dict(embed_dims=64, depth=2, num_heads=2, mlp_ratio=2., tokens_type=tokens)  # token_dims 64
    state = official_state_dict(arch, seed=4)
    model = T2TViT(arch=arch, out_indices=(2,)).eval()
    model.load_state_dict(T2TViT.convert_state_dict(state), strict=True)
    x = torch.randn(1, 3, 225, 290)
    with torch.no_grad():
        ours = model(x)[0]
        ref = reference_t2t(state, arch, x)
    assert ours.shape == ref.shape == (1, 64, 14, 18)
    assert relative_diff(ours, ref) <= 1e-5


# -- checkpoint layouts ---------------------------------------------------------------------------
# token_dims 64, the published width, so that mmpretrain's factor is its 8.
SMALL_T64 = dict(embed_dims=64, depth=2, num_heads=2, mlp_ratio=2., tokens_type='transformer')


def test_mmpretrain_layout_needs_its_logit_scale(tmp_path, log_lines):
    # Smaller q, k: mmpretrain's logits (8 q . k) stay in softmax's curved range.
    state = official_state_dict(SMALL_T64, seed=5, token_qkv_gain=.15)
    torch.save(to_mmpretrain(state), tmp_path / 't2t-t-14_mmpretrain.pth')
    x = torch.randn(1, 3, 96, 128)
    model = load_through_init_cfg(tmp_path / 't2t-t-14_mmpretrain.pth', SMALL_T64, token_scale='mmpretrain',
                                  out_indices=(2,))
    assert 'T2TViT: missing keys: none' in log_lines and 'T2TViT: unexpected keys: none' in log_lines
    assert not any('token_scale' in line for line in log_lines)
    with torch.no_grad():  # mmpretrain 1.2.0's token layers: logits times sqrt(64)
        ours = model(x)[0]
        assert relative_diff(ours, reference_t2t(state, SMALL_T64, x, token_logit_scale=8.)) <= 1e-5
    official = load_through_init_cfg(tmp_path / 't2t-t-14_mmpretrain.pth', SMALL_T64, out_indices=(2,))
    assert any("token_scale='mmpretrain'" in line for line in log_lines)
    with torch.no_grad():
        theirs = official(x)[0]
        assert relative_diff(theirs, reference_t2t(state, SMALL_T64, x)) <= 1e-5
    assert relative_diff(theirs, ours) > 1e-2  # the scale is no detail
    with pytest.raises(ValueError, match='applies to transformer token layers only'):
        small('performer', token_scale='mmpretrain')
    with pytest.raises(ValueError, match='token_scale must be one of official, mmpretrain'):
        small('transformer', token_scale='timm')


def test_classification_files_keep_the_pyramid_initialised(tmp_path, log_lines):
    state = official_state_dict(dict(SMALL, tokens_type='performer'), seed=6)
    torch.save({'state_dict': state}, tmp_path / 'release.pth.tar')
    torch.manual_seed(7)
    fresh = small()
    torch.manual_seed(7)
    model = load_through_init_cfg(tmp_path / 'release.pth.tar', dict(SMALL, tokens_type='performer'))
    assert any('no pyramid scale changes' in line and '8 tensors keep their initialisation' in line
               for line in log_lines)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded if not k.startswith('scale_x'))
    assert all(torch.equal(loaded[k], fresh.state_dict()[k]) for k in loaded if k.startswith('scale_x'))
    partial = {**state, 'scale_x2.0.weight': torch.zeros(64, 32, 2, 2)}
    torch.save(partial, tmp_path / 'partial.pth')
    with pytest.raises(CheckpointError, match=r'scale_x4\.0\.weight is missing from the checkpoint'):
        load_through_init_cfg(tmp_path / 'partial.pth', dict(SMALL, tokens_type='performer'))


def test_detector_and_own_layouts_load_every_tensor(tmp_path, log_lines):
    source = small('transformer').state_dict()
    for name, checkpoint in (('detector', mmpvt_detector(source)), ('own', source)):
        torch.save(checkpoint, tmp_path / f'{name}.pth')
        assert T2TViT.checkpoint_format.layout(checkpoint) == 'mmpvt'
        model = load_through_init_cfg(tmp_path / f'{name}.pth', dict(SMALL, tokens_type='transformer'))
        loaded = model.state_dict()
        assert loaded.keys() == source.keys() and all(torch.equal(loaded[k], source[k]) for k in source)
    assert 'T2TViT: missing keys: none' in log_lines and 'T2TViT: unexpected keys: none' in log_lines


def test_the_other_token_type_is_refused_naming_missing_and_unexpected_keys(tmp_path):
    torch.save(small('performer').state_dict(), tmp_path / 'performer.pth')
    with pytest.raises(CheckpointError) as info:
        load_through_init_cfg(tmp_path / 'performer.pth', dict(SMALL, tokens_type='transformer'))
    message = str(info.value)
    assert "token layers are performers, this model's are transformers" in message
    missing, unexpected = message.split('missing keys: ')[1].split('; unexpected keys: ')
    assert 'tokens_to_token.attention1.attn.qkv.weight' in missing
    assert 'tokens_to_token.attention2.mlp.fc2.bias' in missing
    assert 'tokens_to_token.attention1.w' in unexpected
    assert 'tokens_to_token.attention2.kqv.bias' in unexpected
    assert 'norm1' not in missing + unexpected  # both types have their norms
    with pytest.raises(CheckpointError, match='token layers are transformers'):
        small('performer').load_state_dict(small('transformer').state_dict())


def test_another_width_is_refused_by_key_and_shapes(tmp_path):
    torch.save(T2TViT(arch=dict(SMALL, tokens_type='performer', embed_dims=128)).state_dict(),
               tmp_path / 'wide.pth')
    with pytest.raises(CheckpointError, match=r'wide\.pth: .*cls_token has shape \(1, 1, 128\) in the '
                                              r'checkpoint and \(1, 1, 64\) in the model'):
        load_through_init_cfg(tmp_path / 'wide.pth', dict(SMALL, tokens_type='performer'))


def test_a_table_of_another_grid_is_resized_on_load(tmp_path):
    """The authors' 384 release has a 24x24 table (577 rows)."""
    state = official_state_dict(dict(SMALL, tokens_type='performer'), img_size=384, seed=8)
    assert state['pos_embed'].shape == (1, 577, 64)
    torch.save({'state_dict_ema': state}, tmp_path / 'release_384.pth.tar')
    loaded = load_through_init_cfg(tmp_path / 'release_384.pth.tar', dict(SMALL, tokens_type='performer'),
                                   out_indices=(2,)).pos_embed
    assert torch.allclose(loaded, ref_position_table(state['pos_embed'], (14, 14)), atol=1e-6, rtol=0)
    assert torch.equal(loaded[:, 0], state['pos_embed'][:, 0])  # the class row kept
    at_384 = load_through_init_cfg(tmp_path / 'release_384.pth.tar', dict(SMALL, tokens_type='performer'),
                                   img_size=384, out_indices=(2,))
    assert torch.equal(at_384.pos_embed, state['pos_embed'])


@pytest.mark.parametrize('layout', ['official', 'training_script', 'mmpretrain', 'detector', 'own'])
def test_conversion_is_pure_and_idempotent(layout):
    source = small('transformer').state_dict()
    official = official_state_dict(dict(SMALL, tokens_type='transformer'), seed=9)
    checkpoint = {'official': lambda: {'state_dict': official},
                  'training_script': lambda: training_script_file(official, official),
                  'mmpretrain': lambda: to_mmpretrain(official),
                  'detector': lambda: mmpvt_detector(source),
                  'own': lambda: source}[layout]()
    flat = checkpoint.get('state_dict', checkpoint)
    before = {k: v.clone() for k, v in flat.items()}
    once = T2TViT.convert_state_dict(checkpoint)
    twice = T2TViT.convert_state_dict(once)
    assert list(once) == list(twice) and all(torch.equal(once[k], twice[k]) for k in once)
    assert flat.keys() == before.keys() and all(torch.equal(flat[k], before[k]) for k in flat)
    assert set(once) <= set(source) and not any(k.startswith('head') for k in once)
    with_pyramid = layout in ('detector', 'own')
    expected = {k for k in source if with_pyramid or not k.startswith('scale_x')}
    assert set(once) == expected


def vitdet_file():
    torch.manual_seed(10)
    return timm.create_model('vit_base_patch16_224', pretrained=False, embed_dim=64, depth=1,
                             num_heads=2).state_dict()


def test_layout_detectors_keep_to_their_family():
    performer = official_state_dict(dict(SMALL, tokens_type='performer'))
    transformer = official_state_dict(dict(SMALL, tokens_type='transformer'))
    t2t_files = [{'state_dict': performer, 'state_dict_ema': performer}, {'state_dict': transformer},
                 to_mmpretrain(transformer), small().state_dict(), mmpvt_detector(small().state_dict())]
    for checkpoint in t2t_files:
        T2TViT.checkpoint_format.layout(checkpoint)
        with pytest.raises(ValueError, match='not a plain ViT'):
            ViTDet.checkpoint_format.layout(checkpoint)
        with pytest.raises(ValueError, match='not a PVT state dict'):
            PVTv2.checkpoint_format.layout(checkpoint)
    others = [vitdet_file(), timm.create_model('pvt_v2_b0', pretrained=False).state_dict(),
              MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16), num_classes=10).state_dict()]
    for checkpoint in others:
        with pytest.raises(ValueError, match='not a T2T-ViT state dict'):
            T2TViT.convert_state_dict({'model': checkpoint})


class _TrainerState:
    """A harmless object of a class no allow-list names."""


def test_training_script_files_load_safely_and_exactly(tmp_path):
    state = official_state_dict(dict(SMALL, tokens_type='performer'))
    checkpoint = training_script_file(state, state)
    torch.save(checkpoint, tmp_path / 'checkpoint-309.pth.tar')
    loaded = load_checkpoint_file(tmp_path / 'checkpoint-309.pth.tar')  # weights_only=True
    assert loaded['args'] == checkpoint['args'] and loaded['optimizer']['param_groups'][0]['lr'] == 5e-4
    torch.save(dict(checkpoint, trainer=_TrainerState()), tmp_path / 'other.pth.tar')
    with pytest.raises(CheckpointError, match=r'could run code \(.*_TrainerState'):
        load_checkpoint_file(tmp_path / 'other.pth.tar')


def test_convert_checkpoint_cli_handles_t2t(tmp_path, python, capsys):
    ema = official_state_dict(dict(SMALL, tokens_type='performer'), seed=11)
    plain = official_state_dict(dict(SMALL, tokens_type='performer'), seed=12)
    torch.save(training_script_file(plain, ema), tmp_path / 'model_best.pth.tar')
    result = subprocess.run(
        [python, 'tools/convert_checkpoint.py', tmp_path / 'model_best.pth.tar', tmp_path / 'out.pth'],
        cwd=ROOT_DIR, capture_output=True, text=True, check=True)
    assert 't2t family, official layout' in result.stdout
    assert 'dropped (not used by the backbone): head.bias, head.weight' in result.stdout
    model = small(out_indices=(2, 3))
    model.load_state_dict(torch.load(tmp_path / 'out.pth', weights_only=True), strict=True)
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    spec = importlib.util.spec_from_file_location('tool', ROOT_DIR / 'tools' / 'convert_checkpoint.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for checkpoint in (torch.load(tmp_path / 'out.pth', weights_only=True), to_mmpretrain(ema)):
        assert tool.detect_family(checkpoint) == 't2t'
    assert tool.detect_family(vitdet_file()) == 'vitdet'
    assert tool.main(['--type', 'vitdet', str(tmp_path / 'out.pth'), str(tmp_path / 'x.pth')]) == 1
    assert 'not a plain ViT state dict' in capsys.readouterr().err and not (tmp_path / 'x.pth').exists()
    assert tool.main(['--type', 't2t', str(tmp_path / 'out.pth'), str(tmp_path / 'again.pth')]) == 0
    assert re.search(r't2t family, official layout, \d+ tensors', capsys.readouterr().out)


# -- training controls and bad arguments ----------------------------------------------------------
def test_frozen_stages_freeze_the_tokens_module_class_token_and_quarters():
    model = small(frozen_stages=2).train()
    frozen = [model.tokens_to_token, *model.blocks[:2]]
    assert not model.cls_token.requires_grad
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for f in frozen for m in f.modules())
    trainable = (*model.blocks[2:], model.norm, model.scale_x4)
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    model = small(frozen_stages=4).train()
    assert not any(p.requires_grad for m in (*model.blocks, model.norm) for p in m.parameters())
    assert all(p.requires_grad for p in model.scale_x2.parameters()) and not model.norm.training


@pytest.mark.parametrize('tokens', ['performer', 'transformer'])
def test_with_cp_recomputes_the_token_layers_too(tokens):
    """The token layers at 1/4 and 1/8 of the input's resolution hold most of the activations
    (about 60% here): recomputing the blocks alone would keep ~70% of the bytes."""
    x = torch.randn(1, 3, 128, 128)
    kept = []
    for with_cp in (False, True):
        model = small(tokens, with_cp=with_cp).train()
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        kept.append(total)
    assert kept[1] < 0.5 * kept[0], kept


def test_layer_ids_for_layer_decay():
    model = small()
    assert model.num_layers == 4
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids['cls_token'] == ids['tokens_to_token.attention1.kqv.weight'] == 0
    assert ids['tokens_to_token.project.bias'] == 0
    assert ids['blocks.0.norm1.weight'] == 1 and ids['blocks.3.mlp.fc2.bias'] == 4
    assert ids['norm.weight'] == ids['scale_x4.0.weight'] == ids['scale_x2.0.bias'] == 5
    with pytest.raises(ValueError, match='no parameter'):
        model.layer_id('neck.lateral_convs.0.conv.weight')


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="unknown arch '14_deep'; valid names: 7, 10, 12, 14, 19, 24, t_14"):
        T2TViT(arch='14_deep')
    with pytest.raises(ValueError, match='lacks tokens_type'):
        T2TViT(arch=dict(embed_dims=64, depth=2, num_heads=2, mlp_ratio=2.))
    with pytest.raises(ValueError, match="tokens_type must be one of performer, transformer, got 'conv'"):
        T2TViT(arch=dict(SMALL, tokens_type='conv'))
    with pytest.raises(ValueError, match='divisible by num_heads'):
        T2TViT(arch=dict(SMALL, tokens_type='performer', num_heads=3))
    with pytest.raises(ValueError, match='img_size must be an int or'):
        small(img_size=16)
    with pytest.raises(ValueError, match='H, W >= 32'):
        small()(torch.randn(1, 3, 31, 64))

