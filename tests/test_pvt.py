"""The PVT and PVTv2 backbones: variants, output contract, training controls, bad input."""
import pytest
import torch
from torch import nn

from mmpvt import PVT, PVTv2
from mmpvt.models.pvt import PVT_ARCHS, PVTV2_ARCHS

# Backbone parameters in millions, measured on the published models (reference table).
PARAMS = {
    (PVT, 'tiny'): 12.71, (PVT, 'small'): 23.97, (PVT, 'medium'): 43.69, (PVT, 'large'): 60.85,
    (PVTv2, 'b0'): 3.41, (PVTv2, 'b1'): 13.50, (PVTv2, 'b2'): 24.85, (PVTv2, 'b2_li'): 22.04,
    (PVTv2, 'b3'): 44.73, (PVTv2, 'b4'): 62.04, (PVTv2, 'b5'): 81.44,
}
VARIANTS = list(PARAMS)
TINY_V2 = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4),
               mlp_ratios=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))


def variant_id(v):
    return f'{v[0].__name__}-{v[1]}'


def test_tables_cover_every_published_variant():
    assert set(PVT_ARCHS) == {'tiny', 'small', 'medium', 'large'}
    assert set(PVTV2_ARCHS) == {'b0', 'b1', 'b2', 'b2_li', 'b3', 'b4', 'b5'}


@pytest.mark.parametrize('variant', VARIANTS, ids=variant_id)
def test_parameter_count_matches_published_model(variant):
    cls, arch = variant
    model = cls(arch=arch)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PARAMS[variant]


def test_detection_sized_batch():
    model = PVTv2(arch='b0').eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 800, 1216))
    assert [tuple(o.shape) for o in outs] == [
        (2, 32, 200, 304), (2, 64, 100, 152), (2, 160, 50, 76), (2, 256, 25, 38)]


def test_v1_position_embedding_is_resized_at_every_stage():
    """At a non-224 size every stage adds its embedding bilinearly resized to its own grid."""
    model = PVT(arch='tiny').eval()
    assert [stage.pos_grid for stage in model.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    seen = {}
    for i, stage in enumerate(model.stages):
        stage.patch_embed.register_forward_hook(lambda m, a, out, i=i: seen.update({(i, 'embed'): out}))
        stage.blocks[0].register_forward_pre_hook(lambda m, a, i=i: seen.update({(i, 'block'): a[0]}))
    with torch.no_grad():
        model(torch.randn(1, 3, 160, 250))
    for i, stage in enumerate(model.stages):
        grid_tokens = seen[(i, 'embed')]  # (1, h, w, C)
        hw, tokens = tuple(grid_tokens.shape[1:3]), grid_tokens.flatten(1, 2)
        grid = stage.pos_embed.reshape(1, *stage.pos_grid, -1).permute(0, 3, 1, 2)
        expected = torch.nn.functional.interpolate(grid, size=hw, mode='bilinear', align_corners=False)
        assert hw != stage.pos_grid
        torch.testing.assert_close(seen[(i, 'block')] - tokens, expected.flatten(2).transpose(1, 2))


def test_arch_dict_builds_custom_variant_and_caller_wins():
    model = PVTv2(arch=TINY_V2, out_indices=(1, 3)).eval()
    assert model.out_channels == (32, 64) and model.out_strides == (8, 32)
    assert [len(s.blocks) for s in model.stages] == [1, 2, 1, 1]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 64]


def test_linear_variant_uses_pooled_reduction_in_every_stage():
    model = PVTv2(arch='b2_li')
    for stage in model.stages:
        attn = stage.blocks[0].attn
        assert attn.linear and attn.sr.kernel_size == (1, 1)
        assert isinstance(stage.blocks[0].mlp.relu, nn.ReLU)


def test_layernorm_eps_follow_the_authors_code():
    for model in (PVT(arch='tiny'), PVTv2(arch='b0')):
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                expected = 1e-5 if name.endswith(('patch_embed.norm', 'attn.norm')) else 1e-6
                assert module.eps == expected, name


def test_frozen_v1_stage_freezes_its_position_embedding():
    model = PVT(arch='tiny', frozen_stages=1).train()
    assert not model.stages[0].pos_embed.requires_grad and model.stages[1].pos_embed.requires_grad


def test_drop_path_grows_linearly_over_all_blocks():
    model = PVTv2(arch='b2', drop_path_rate=0.3)
    rates = [0.0 if isinstance(b.drop_path, nn.Identity) else b.drop_path.drop_prob
             for s in model.stages for b in s.blocks]
    assert len(rates) == 16
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 16))


def test_dropout_free_eval_is_deterministic_and_train_mode_drops():
    model = PVTv2(arch=TINY_V2, drop_path_rate=0.5)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[3], model(x)[3])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x)[3], model(x)[3])


# Largest error of any map relative to its scale, measured over seeds 0-3: bfloat16 1.24%
# (8 mantissa bits; the fused kernel on the CPU), float16 0.16% (11 bits; the layers). The
# bounds are about three times that.
AUTOCAST_BOUNDS = {torch.bfloat16: 0.035, torch.float16: 0.005}


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_outputs_are_finite_and_close_to_fp32(dtype):
    model = PVTv2(arch='b0').eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast('cpu', dtype=dtype):
            low = model(x)
    for r, o in zip(reference, low):
        assert o.dtype == dtype
        assert torch.isfinite(o).all()
        assert (o.float() - r).abs().max() / r.abs().max() < AUTOCAST_BOUNDS[dtype]


# -- bad arguments and inputs ----------------------------------------------------------------
# The arguments every family checks (arch names and dicts, out_indices, frozen_stages, inputs)
# are the contract suite's; these are PVT's own.
@pytest.mark.parametrize('kwargs,message', [
    (dict(arch=dict(TINY_V2, depths=(1, 1))), 'one entry per stage'),
    (dict(arch=dict(TINY_V2, num_heads=(3, 2, 3, 4))), r'num_heads \(3\) must divide'),
])
def test_bad_arguments_raise(kwargs, message):
    kwargs.setdefault('arch', TINY_V2)
    with pytest.raises(ValueError, match=message):
        PVTv2(**kwargs)


@pytest.mark.parametrize('cls', [PVT, PVTv2])
@pytest.mark.parametrize('size', [(224, 224, 224), (224,), (224, 0), 16, '224', (224.0, 224)])
def test_pretrain_img_size_must_be_an_int_or_a_pair(cls, size):
    """mmdet's backbone tests pass such sizes: (224, 224, 224) was taken, (224,) an IndexError."""
    arch = 'tiny' if cls is PVT else 'b0'
    with pytest.raises(ValueError, match=r'pretrain_img_size must be an int or \(H, W\), each at least 32'):
        cls(arch=arch, pretrain_img_size=size)
    assert cls(arch=arch, pretrain_img_size=(256, 320)).pretrain_img_size == (256, 320)
