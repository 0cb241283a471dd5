"""MViT v1 (the original Multiscale Vision Transformer): family facts.

The independent reference is torchvision's generic ``MViT`` class configured as the 2-D v1
image model (one frame, q pooled only in the q-stride blocks, no residual pooling, no
relative positions, the width growing in the MLP), whose outputs equal PySlowFast's own
model's bit for bit (measured when the reference facts were written). It is built at each
input size, since it cannot resize its position table: at another size it gets our table
resized to that grid. The contract suite covers the rest (shapes, freezing, loading, every
arch).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.video.mvit import MSBlockConfig, MViT

from mmpvt.models import MViTv1, MViTv2
from mmpvt.models.layers import abs_pos_embed_to_grid


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (norms and pooling included), so that a swapped or
    unused tensor shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.5 if name.endswith('norm.weight') or '.norm' in name else 0.08
            param.copy_(torch.randn(param.shape, generator=generator) * scale
                        + (1.0 if name.endswith('weight') and param.dim() == 1 else 0.0))
    return model.eval()


def torchvision_v1(model: MViTv1, hw: tuple[int, int], num_classes: int = 10) -> MViT:
    """torchvision's MViT as the 2-D v1 model of ``model``'s blocks, for inputs of ``hw``."""
    blocks = [MSBlockConfig(num_heads=s.num_heads, input_channels=s.dims, output_channels=s.out_dims,
                            kernel_q=[1, 3, 3] if s.q_stride > 1 else [1, 1, 1], kernel_kv=[1, 3, 3],
                            stride_q=[1, s.q_stride, s.q_stride], stride_kv=[1, s.kv_stride, s.kv_stride])
              for s in model.block_specs]
    return MViT(spatial_size=hw, temporal_size=1, block_setting=blocks, residual_pool=False,
                residual_with_cls_embed=False, rel_pos_embed=False, proj_after_attn=False, dropout=0.0,
                num_classes=num_classes, patch_embed_kernel=(1, 7, 7), patch_embed_stride=(1, 4, 4),
                patch_embed_padding=(0, 3, 3)).eval()


def to_torchvision(model: MViTv1, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Our state dict in torchvision's names, the position table resized to ``grid``."""
    state = model.state_dict()
    grid_rows = abs_pos_embed_to_grid(state['pos_embed'], grid).flatten(1, 2)
    pos = torch.cat([state['pos_embed'][:, :1], grid_rows], dim=1)
    out = {'conv_proj.weight': state['patch_embed.proj.weight'][:, :, None],
           'conv_proj.bias': state['patch_embed.proj.bias'],
           'pos_encoding.class_token': state['cls_token'].reshape(-1),
           'pos_encoding.class_pos': pos[0, 0], 'pos_encoding.spatial_pos': pos[0, 1:],
           'pos_encoding.temporal_pos': torch.zeros(1, pos.shape[-1]),
           'norm.weight': state['norm.weight'], 'norm.bias': state['norm.bias']}
    renames = {'attn.proj.': 'attn.project.0.', 'mlp.fc1.': 'mlp.0.', 'mlp.fc2.': 'mlp.3.',
               'proj.': 'project.'}
    for key, value in state.items():
        if not key.startswith('blocks.'):
            continue
        block, rest = key.split('.', 2)[1], key.split('.', 2)[2]
        for pool in 'qkv':
            if rest == f'attn.pool_{pool}.weight':
                rest, value = f'attn.pool_{pool}.pool.weight', value[:, :, None]
            elif rest.startswith(f'attn.norm_{pool}.'):
                rest = f'attn.pool_{pool}.norm_act.0.' + rest.split('.')[-1]
        for old, new in renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[f'blocks.{block}.{rest}'] = value
    return out


def stage_outputs(reference: MViT, model: MViTv1, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The reference's stage-end maps (``(B, C, h, w)``, before any norm) and its logits."""
    taken = []
    hooks = [reference.blocks[end].register_forward_hook(lambda m, i, o: taken.append(o))
             for end in model.stage_ends]
    logits = reference(x[:, :, None])
    for hook in hooks:
        hook.remove()
    maps = [tokens[:, 1:].unflatten(1, thw[1:]).permute(0, 3, 1, 2) for tokens, thw in taken]
    return maps, logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Within ``rtol`` of the expected tensor's largest magnitude."""
    assert actual.shape == expected.shape
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error < rtol, error


# -- published variants ----------------------------------------------------------------------
@pytest.mark.parametrize('arch, params', [('b16', 36_213_600), ('b24', 52_747_392), ('b24_wide', 72_064_832)])
def test_parameters_equal_the_official_build(arch, params):
    """The official model's counts without its 1000-class head (b24_wide at 320). The output
    norms of levels 0-2 are the detection design's addition and are not counted."""
    with torch.device('meta'):
        model = MViTv1(arch)
    counted = sum(p.numel() for name, p in model.named_parameters() if not name.startswith('scale'))
    assert counted == params
    assert model.out_channels == ((192, 384, 768, 768) if arch != 'b24_wide' else (224, 448, 896, 896))


def test_block_schedule_is_the_papers():
    """B-16: widths, heads and strides per block as the official config builds them."""
    specs = MViTv1('b16').block_specs
    assert [(s.dims, s.out_dims) for s in specs][:4] == [(96, 192), (192, 192), (192, 384), (384, 384)]
    assert [s.out_dims for s in specs][12:] == [384, 768, 768, 768]
    assert [i for i, s in enumerate(specs) if s.q_stride == 2] == [1, 3, 14]
    assert [s.kv_stride for s in specs] == [4, 2, 2, 1] + [1] * 12
    assert [s.num_heads for s in specs] == [1, 2, 2] + [4] * 11 + [8, 8]
    assert all(s.pool_q == (s.q_stride == 2) and not s.rel_pos_rows and not s.residual_pooling for s in specs)


# -- parity with the independent reference ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('arch', ['b16', 'b24'])
def test_equals_torchvision_at_224_per_stage_and_logits(arch):
    model = randomized(MViTv1(arch))
    reference = torchvision_v1(model, (224, 224))
    head = torch.nn.Linear(768, 10)
    state = to_torchvision(model, (56, 56))
    state.update({'head.1.weight': head.weight.detach(), 'head.1.bias': head.bias.detach()})
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, expected_logits = stage_outputs(reference, model, x)
        last = {}
        block = model.blocks[-1]
        forward_tokens = block.forward_tokens

        def keep_tokens(*args):
            last['tokens'], hw = forward_tokens(*args)
            return last['tokens'], hw
        block.forward_tokens = keep_tokens
        outs = model(x)
        logits = head(model.norm(last['tokens'][:, 0]))
    assert_close(logits, expected_logits)
    for level, (out, ref) in enumerate(zip(outs, expected)):
        norm = getattr(model, model._level_norm_name(level))
        ref = F.layer_norm(ref.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        assert_close(out, ref.permute(0, 3, 1, 2))


@pytest.mark.slow
@pytest.mark.parametrize('hw', [(200, 200), (228, 300)])
def test_equals_torchvision_built_at_another_size_with_the_resized_table(hw):
    """The table learned at 224 resized (bicubic, class row kept) to the input's grid equals
    the reference built at that size with the resized table loaded. (torchvision, like
    PySlowFast, sizes its table as ``H // 4``: it runs at multiples of 4 only; the paper's
    reference below takes the other sizes.)"""
    model = randomized(MViTv1('b16', out_indices=(3,)))
    grid = (-(-hw[0] // 4), -(-hw[1] // 4))
    reference = torchvision_v1(model, hw)
    state = to_torchvision(model, grid)
    state.update({k: v for k, v in reference.state_dict().items() if k.startswith('head.')})
    reference.load_state_dict(state)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = stage_outputs(reference, model, x)
        out, = model(x)
    ref = F.layer_norm(expected[-1].permute(0, 2, 3, 1), (768,), model.norm.weight, model.norm.bias, 1e-6)
    assert_close(out, ref.permute(0, 3, 1, 2))


# -- the paper's model, written out slowly ---------------------------------------------------
def windowed_attention(q, k, v, q_hw, k_hw, q_win, k_win):
    """One head's attention inside windows, one window at a time: the query at grid ``(i, j)``
    attends to the keys of window ``(i // q_win, j // q_win)`` of the key grid, which is
    zero-padded to whole windows (the padded keys take part in the softmax, as detectron2
    trained them). ``q``: ``(B, q_h * q_w, d)``, ``k``, ``v``: ``(B, k_h * k_w, d)``."""
    B, d = q.shape[0], q.shape[-1]
    rows, cols = -(-k_hw[0] // k_win) * k_win, -(-k_hw[1] // k_win) * k_win
    k = F.pad(k.reshape(B, *k_hw, d), (0, 0, 0, cols - k_hw[1], 0, rows - k_hw[0]))
    v = F.pad(v.reshape(B, *k_hw, d), (0, 0, 0, cols - k_hw[1], 0, rows - k_hw[0]))
    q = q.reshape(B, *q_hw, d)
    out = torch.zeros_like(q)
    for a in range(-(-q_hw[0] // q_win)):
        for b in range(-(-q_hw[1] // q_win)):
            qs = q[:, a * q_win:(a + 1) * q_win, b * q_win:(b + 1) * q_win]
            ks = k[:, a * k_win:(a + 1) * k_win, b * k_win:(b + 1) * k_win].reshape(B, -1, d)
            vs = v[:, a * k_win:(a + 1) * k_win, b * k_win:(b + 1) * k_win].reshape(B, -1, d)
            weights = torch.softmax(qs.reshape(B, -1, d) @ ks.transpose(1, 2) / d ** 0.5, dim=-1)
            out[:, a * q_win:(a + 1) * q_win, b * q_win:(b + 1) * q_win] = (weights @ vs).reshape(qs.shape)
    return out.reshape(B, -1, d)


def paper_mvit_v1(model: MViTv1, x: torch.Tensor) -> list[torch.Tensor]:
    """MViT v1 from the paper and the official modules, one head at a time with the attention
    matrix written out, on ``model``'s weights: the stage-end maps before any norm.

    Tokens are ``[class token, grid row-major]``. Pooling (a 3x3 depthwise convolution with
    padding 1, the same weights for every head) runs on the grid, the class token bypasses it,
    and one LayerNorm then normalises both. The skip path of a q-pooling block is a 3x3 max
    pool with stride 2 and padding 1 on the grid. The window design (``model.cls_token`` is
    None) has no class token and attends inside windows in the blocks with a window size.
    """
    front = 0 if model.cls_token is None else 1

    def ln(t, norm):
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def pooled(t, hw, pool, norm, stride):  # t: (B, front + h*w, head_dims) of one head
        if pool is None:
            return t, hw
        grid = t[:, front:].reshape(t.shape[0], *hw, -1).permute(0, 3, 1, 2)
        grid = F.conv2d(grid, pool.weight, None, stride, 1, 1, grid.shape[1])
        out = torch.cat([t[:, :front], grid.flatten(2).transpose(1, 2)], dim=1)
        return ln(out, norm), tuple(grid.shape[2:])

    stem = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, 4, 3)
    hw = tuple(stem.shape[2:])
    side = model.pos_grid[0]
    table = model.pos_embed[0, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=hw, mode='bicubic', align_corners=False).flatten(2).transpose(1, 2)
    tokens = stem.flatten(2).transpose(1, 2) + table
    if front:
        tokens = torch.cat([model.cls_token + model.pos_embed[:, :1], tokens], 1)
    maps = []
    for i, (spec, block) in enumerate(zip(model.block_specs, model.blocks)):
        attn, heads = block.attn, spec.num_heads
        x_norm = ln(tokens, block.norm1)
        q_all, k_all, v_all = F.linear(x_norm, attn.qkv.weight, attn.qkv.bias).chunk(3, dim=-1)
        head_dims = q_all.shape[-1] // heads
        outs = []
        for h in range(heads):
            part = slice(h * head_dims, (h + 1) * head_dims)
            q, q_hw = pooled(q_all[..., part], hw, attn.pool_q, attn.norm_q, spec.q_stride)
            k, k_hw = pooled(k_all[..., part], hw, attn.pool_k, attn.norm_k, spec.kv_stride)
            v, _ = pooled(v_all[..., part], hw, attn.pool_v, attn.norm_v, spec.kv_stride)
            if spec.window_size:
                outs.append(windowed_attention(q, k, v, q_hw, k_hw, spec.window_size // spec.q_stride,
                                               spec.window_size // spec.kv_stride))
            else:
                weights = torch.softmax(q @ k.transpose(1, 2) / head_dims ** 0.5, dim=-1)
                outs.append(weights @ v)
        attended = F.linear(torch.cat(outs, dim=-1), attn.proj.weight, attn.proj.bias)
        skip = tokens
        if spec.q_stride > 1:
            grid = tokens[:, front:].reshape(tokens.shape[0], *hw, -1).permute(0, 3, 1, 2)
            grid = F.max_pool2d(grid, 3, 2, 1)
            skip = torch.cat([tokens[:, :front], grid.flatten(2).transpose(1, 2)], dim=1)
        hw = q_hw
        tokens = skip + attended
        x_norm = ln(tokens, block.norm2)
        mlp = F.linear(F.gelu(F.linear(x_norm, block.mlp.fc1.weight, block.mlp.fc1.bias)),
                       block.mlp.fc2.weight, block.mlp.fc2.bias)
        shortcut = F.linear(x_norm, block.proj.weight, block.proj.bias) if block.proj is not None else tokens
        tokens = shortcut + mlp
        if i in model.stage_ends:
            maps.append(tokens[:, front:].reshape(tokens.shape[0], *hw, -1).permute(0, 3, 1, 2))
    return maps


def assert_equals_the_papers_model(model: MViTv1, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's outputs equal :func:`paper_mvit_v1`'s with the level norms applied."""
    with torch.no_grad():
        outs = model(x)
        expected = paper_mvit_v1(model, x)
        for level, (out, ref) in enumerate(zip(outs, expected)):
            norm = getattr(model, model._level_norm_name(level))
            ref = F.layer_norm(ref.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                               norm.eps)
            assert_close(out, ref.permute(0, 3, 1, 2))
    return outs


@pytest.mark.slow
def test_equals_the_papers_model_at_a_size_no_other_reference_runs():
    """225x300: not a multiple of 4 (where the official code and torchvision cannot run),
    non-square, odd grids at every level (57x75, 29x38, 15x19, 8x10)."""
    model = randomized(MViTv1('b16'))
    x = torch.randn(1, 3, 225, 300, generator=torch.Generator().manual_seed(3))
    outs = assert_equals_the_papers_model(model, x)
    assert [tuple(o.shape[2:]) for o in outs] == [(57, 75), (29, 38), (15, 19), (8, 10)]


# -- the window design -----------------------------------------------------------------------
@pytest.mark.slow
def test_window_design_equals_the_papers_model_with_windows():
    """B-16 with the MViTv2 paper's 56-token windows at 225x300: every level's grid (57x75,
    29x38, 15x19, 8x10) has a partial last window, and the global blocks of stages 2 and 3
    pool k and v twice as much."""
    model = randomized(MViTv1('b16', window_size=56))
    specs = model.block_specs
    assert [s.window_size for s in specs] == [56, 56, 0, 28, *[14] * 9, 0, 14, 0]
    assert [s.kv_stride for s in specs] == [4, 2, 4, 1, *[1] * 9, 2, 1, 1]
    x = torch.randn(1, 3, 225, 300, generator=torch.Generator().manual_seed(5))
    outs = assert_equals_the_papers_model(model, x)
    assert [tuple(o.shape[1:]) for o in outs] == [(192, 57, 75), (384, 29, 38), (768, 15, 19), (768, 8, 10)]


def test_window_design_small_arch_equals_the_papers_model():
    """A small arch with 16-token windows on a 100x132 input (partial windows, 2x2-token windows
    in stage 4), with and without the doubled kv stride."""
    arch = dict(embed_dims=(16, 32, 48, 64), depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    x = torch.randn(1, 3, 100, 132, generator=torch.Generator().manual_seed(6))
    for double in (True, False):
        model = randomized(MViTv1(arch, window_size=16, global_kv_stride_x2=double))
        assert_equals_the_papers_model(model, x)


def test_window_design_loads_the_same_files_without_the_class_token(tmp_path, log_lines):
    """One file serves both designs: the window design skips the class token, saying so, and
    loads every other tensor unchanged."""
    arch = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    source = randomized(MViTv1(arch))
    path = tmp_path / 'v1.pth'
    torch.save({'state_dict': source.state_dict()}, path)
    windowed = MViTv1(arch, window_size=16, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    windowed.init_weights()
    assert windowed.cls_token is None and 'cls_token' not in dict(windowed.named_parameters())
    loaded = windowed.state_dict()
    assert loaded.keys() == source.state_dict().keys() - {'cls_token'}
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if k != 'cls_token')
    assert any('skipped 1 checkpoint tensors of the class token (window design)' in line
               for line in log_lines)


@pytest.mark.parametrize('window_size', [-8, 12, 7.0, '56'])
def test_window_size_must_be_a_multiple_of_8(window_size):
    with pytest.raises(ValueError, match='window_size must be 0 .* multiple of 8'):
        MViTv1(dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
               window_size=window_size)


def test_a_batch_of_two_at_512x768():
    """Batch entries are independent: each equals the same image run alone."""
    model = randomized(MViTv1(dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4))))
    x = torch.randn(2, 3, 512, 768, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        both = model(x)
        alone = model(x[1:])
    assert [tuple(o.shape) for o in both] == [(2, 32, 128, 192), (2, 48, 64, 96), (2, 64, 32, 48),
                                              (2, 64, 16, 24)]
    for b, a in zip(both, alone):
        assert_close(b[1:], a)


def test_class_token_takes_part_in_attention():
    """The class token is attended to (a v1 model without it would be another function)."""
    model = randomized(MViTv1(dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
                              out_indices=(0,)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
        model.cls_token.add_(1.0)
        after = model(x)[0]
    assert not torch.allclose(before, after)


def test_mvitv2_and_v1_refuse_each_others_checkpoints():
    v1 = MViTv1(dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))).state_dict()
    v2 = MViTv2(dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))).state_dict()
    with pytest.raises(ValueError, match='an MViT v1 state dict.*load it with MViTv1'):
        MViTv2.convert_state_dict(v1)
    with pytest.raises(ValueError, match=r'no absolute position table \(pos_embed\) and has '
                                         r'relative-position tables .*an MViTv2 state dict'):
        MViTv1.convert_state_dict(v2)


# -- checkpoints -----------------------------------------------------------------------------
SMALL = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4))
LEVEL_NORMS = ('scale2_norm.', 'scale3_norm.', 'scale4_norm.')


def official(state: dict, separate_qkv: bool = False, five_d: bool = True) -> dict:
    """A PySlowFast ``.pyth`` of ``state``'s model: ``model_state`` with the head, no output
    norms, Conv3d pooling weights ``(C, 1, 1, 3, 3)``; ``attn.q/k/v`` with ``separate_qkv``."""
    out = {}
    for key, value in state.items():
        if key.startswith(LEVEL_NORMS):
            continue
        if five_d and '.attn.pool_' in key:
            value = value[:, :, None]
        if separate_qkv and key.endswith(('attn.qkv.weight', 'attn.qkv.bias')):
            for name, part in zip('qkv', value.chunk(3)):
                out[key.replace('attn.qkv.', f'attn.{name}.')] = part
            continue
        out[key] = value
    out.update({'head.projection.weight': torch.randn(10, 64), 'head.projection.bias': torch.zeros(10)})
    return {'model_state': out, 'epoch': 300, 'optimizer_state': {}}


def pytorchvideo(state: dict) -> dict:
    """PyTorchVideo's layout (hub ``mvit_base_16``): separate spatial, temporal and class
    tables, ``patch_embed.patch_model``, ``norm_embed``, ``attn.q/k/v``, ``head.proj``."""
    blocks = official(state, separate_qkv=True)['model_state']
    out = {k: v for k, v in blocks.items() if k.startswith('blocks.')}
    temporal = torch.randn(1, 1, state['pos_embed'].shape[-1])
    out.update({
        'patch_embed.patch_model.weight': state['patch_embed.proj.weight'],
        'patch_embed.patch_model.bias': state['patch_embed.proj.bias'],
        'cls_positional_encoding.cls_token': state['cls_token'],
        'cls_positional_encoding.pos_embed_class': state['pos_embed'][:, :1],
        'cls_positional_encoding.pos_embed_spatial': state['pos_embed'][:, 1:] - temporal,
        'cls_positional_encoding.pos_embed_temporal': temporal,
        'norm_embed.weight': state['norm.weight'], 'norm_embed.bias': state['norm.bias'],
        'head.proj.weight': torch.randn(10, 64), 'head.proj.bias': torch.zeros(10)})
    return {'model_state': out}


def test_official_b16_keys_are_the_releases():
    """The official state dict's keys (measured on PySlowFast's B-16) are ours without the
    detection output norms: q pooled in blocks 1, 3, 14, the MLP-widening proj in 0, 2, 13."""
    with torch.device('meta'):
        ours = set(MViTv1('b16').state_dict())
    per_block = ['norm1', 'attn.qkv', 'attn.proj', 'attn.pool_k', 'attn.norm_k', 'attn.pool_v', 'attn.norm_v',
                 'norm2', 'mlp.fc1', 'mlp.fc2']
    expected = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
                'norm.weight', 'norm.bias'}
    for i in range(16):
        names = per_block + (['attn.pool_q', 'attn.norm_q'] if i in (1, 3, 14) else []) \
            + (['proj'] if i in (0, 2, 13) else [])
        for name in names:
            suffixes = ('weight',) if name.startswith('attn.pool_') else ('weight', 'bias')
            expected |= {f'blocks.{i}.{name}.{s}' for s in suffixes}
    assert {k for k in ours if not k.startswith(LEVEL_NORMS)} == expected


@pytest.mark.parametrize('layout', ['official fused qkv, 5-D pools', 'official q/k/v, 4-D pools',
                                    'pytorchvideo', 'mmpvt detector'])
def test_every_layout_loads_through_init_cfg_to_the_same_model(layout, tmp_path):
    source = randomized(MViTv1(SMALL))
    state = source.state_dict()
    checkpoint = {
        'official fused qkv, 5-D pools': lambda: official(state),
        'official q/k/v, 4-D pools': lambda: official(state, separate_qkv=True, five_d=False),
        'pytorchvideo': lambda: pytorchvideo(state),
        'mmpvt detector': lambda: {'state_dict': {f'backbone.{k}': v for k, v in state.items()}},
    }[layout]()
    assert MViTv1.checkpoint_format.layout(checkpoint) == layout.split()[0]
    converted = MViTv1.convert_state_dict(checkpoint)
    again = MViTv1.convert_state_dict(converted)  # idempotent
    assert again.keys() == converted.keys() and all(torch.equal(again[k], converted[k]) for k in again)
    path = tmp_path / 'v1.pyth'
    torch.save(checkpoint, path)
    model = MViTv1(SMALL, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    loaded = model.state_dict()
    for key, value in state.items():
        if layout != 'mmpvt detector' and key.startswith(LEVEL_NORMS):
            continue  # a classification file has no output norms: they keep their initialisation
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-6, msg=key)
    dropped = MViTv1.checkpoint_format.dropped_keys(checkpoint)
    assert dropped == ([] if layout == 'mmpvt detector' else
                       [k for k in checkpoint['model_state'] if k.startswith('head.')])
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        last_ours, last_source = model.eval()(x)[-1], source(x)[-1]
    torch.testing.assert_close(last_ours, last_source, rtol=0, atol=1e-5)


def test_a_table_of_another_size_is_resized_with_a_log_line(tmp_path):
    """A 224 table loads into a model pre-sized for 256: bicubic, class row kept, logged."""
    from layouts import logged_messages
    source = randomized(MViTv1(SMALL))
    torch.save(official(source.state_dict()), tmp_path / 'v1_224.pyth')
    with logged_messages() as messages:
        model = MViTv1(SMALL, pretrain_img_size=256, init_cfg=dict(type='Pretrained',
                                                                  checkpoint=str(tmp_path / 'v1_224.pyth')))
        model.init_weights()
    pos = source.pos_embed.detach()
    expected = torch.cat([pos[:, :1], abs_pos_embed_to_grid(pos, (64, 64)).flatten(1, 2)], dim=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert "pos_embed: fitted the checkpoint's (1, 3137, 16) to the model's (1, 4097, 16)" in messages


def test_another_width_is_refused_naming_the_key_and_both_shapes(tmp_path):
    from mmpvt.checkpoint import CheckpointError
    torch.save(official(MViTv1(dict(SMALL, embed_dims=(32, 64, 96, 128))).state_dict()), tmp_path / 'w.pyth')
    model = MViTv1(SMALL, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'w.pyth')))
    with pytest.raises(CheckpointError, match=r'cls_token has shape \(1, 1, 32\) in the checkpoint and '
                                              r'\(1, 1, 16\) in the model'):
        model.init_weights()


def test_convert_checkpoint_cli_handles_mvit_v1(tmp_path, capsys):
    """tools/convert_checkpoint.py finds the family through the registry: a PySlowFast file
    with separate q/k/v becomes mmpvt's layout, the head listed as dropped."""
    import importlib.util
    from pathlib import Path
    source = randomized(MViTv1(SMALL)).state_dict()
    torch.save(official(source, separate_qkv=True), tmp_path / 'MVIT_B_16.pyth')
    path = Path(__file__).resolve().parents[1] / 'tools' / 'convert_checkpoint.py'
    spec = importlib.util.spec_from_file_location('tool', path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path / 'MVIT_B_16.pyth'), str(tmp_path / 'out.pth')]) == 0
    stdout = capsys.readouterr().out
    assert 'mvit_v1 family, official layout' in stdout
    assert 'dropped (not used by the backbone): head.projection.bias, head.projection.weight' in stdout
    converted = torch.load(tmp_path / 'out.pth', weights_only=True)
    model = MViTv1(SMALL)
    model.load_state_dict({**model.state_dict(), **converted}, strict=True)
    assert all(torch.equal(converted[k], source[k]) for k in converted)
    assert not any(k.startswith('scale') for k in converted)  # a classification file's trunk only
