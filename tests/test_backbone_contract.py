"""What every registered mmpvt backbone owes its users, checked on every family and variant.

The families are found in mmpvt's model registry, not listed here: a new family is covered
from its first commit. Each family gives small arch dicts in SMALL_ARCHS (keyed by class
name) for the tests that run real forwards and backwards; the published variants are built
on the meta device, where shapes propagate without memory or arithmetic, so that even the
biggest costs milliseconds. Family files (tests/test_pvt.py, ...) keep only family facts.
"""
from __future__ import annotations

import re

import pytest
import torch
from mmengine.registry import DefaultScope
from torch import nn

import mmpvt  # noqa: F401  (registers the backbones)
from mmpvt.checkpoint import CheckpointError, CheckpointFormat
from mmpvt.models.base import NORM_TYPES, DenseBackbone
from mmpvt.registry import MODELS

_PVT_SMALL = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4),
                  mlp_ratios=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))
# Small archs of each family, by class name: a new family adds its own here.
SMALL_ARCHS: dict[str, list[dict]] = {
    'PVT': [_PVT_SMALL],
    'PVTv2': [_PVT_SMALL, dict(_PVT_SMALL, linear=True)],
    'ViTDet': [dict(embed_dims=64, depth=4, num_heads=2, global_attn_indexes=(1, 3))],
    # MViTv2: width change in the attention (T/S/B/L/H) and in the previous block's MLP (L IN-1k).
    'MViTv2': [dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4)),
               dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4),
                    dim_mul_in_attention=False)],
    # MViTv1: a class token and an absolute table; q pooled at stage starts, widths grow in the
    # MLP; and its window design (no class token, windows of 16 tokens in stage 1).
    'MViTv1': [dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4)),
               dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4),
                    window_size=16)],
    # T2TViT: both token layers, narrow (token_dims 16) so that the 1/4-resolution layer is cheap.
    'T2TViT': [dict(embed_dims=64, depth=4, num_heads=2, mlp_ratio=2., tokens_type=tokens, token_dims=16)
               for tokens in ('performer', 'transformer')],
}
AWKWARD = [(1, 3, 97, 161), (2, 3, 224, 320)]
KNOWN_FAMILIES = {'PVT', 'PVTv2'}


def registered_backbones() -> list[type[DenseBackbone]]:
    classes = {cls for cls in MODELS.module_dict.values()
               if isinstance(cls, type) and issubclass(cls, DenseBackbone)}
    return sorted(classes, key=lambda cls: cls.__name__)


BACKBONES = registered_backbones()
NAMED = [(cls, name) for cls in BACKBONES for name in cls.arch_zoo]
SMALL = [(cls, arch) for cls in BACKBONES for arch in SMALL_ARCHS.get(cls.__name__, [])]


def case_id(case) -> str:
    cls, arch = case
    if isinstance(arch, str):
        return f'{cls.__name__}-{arch}'
    return f'{cls.__name__}-small{SMALL_ARCHS[cls.__name__].index(arch)}'


def all_levels(cls, arch, **kwargs) -> DenseBackbone:
    """The backbone with every level as an output."""
    levels = cls(arch=arch, **kwargs).num_levels
    return cls(arch=arch, out_indices=tuple(range(levels)), **kwargs)


def check_maps(model: DenseBackbone, outs, shape) -> None:
    """Outputs are the declared number of maps, with the declared channels and strides."""
    b, _, h, w = shape
    assert len(outs) == len(model.out_indices) == len(model.out_channels) == len(model.out_strides)
    exact = h % model.size_divisor == 0 and w % model.size_divisor == 0
    for out, channels, stride in zip(outs, model.out_channels, model.out_strides):
        assert out.shape[:2] == (b, channels)
        if exact:  # padded to size_divisor: exactly H / stride x W / stride
            assert out.shape[2:] == (h // stride, w // stride), (out.shape, stride)
        else:  # any size: each map rounds H / stride by less than one
            assert abs(out.shape[2] - h / stride) < 1, (out.shape, stride)
            assert abs(out.shape[3] - w / stride) < 1, (out.shape, stride)


# -- the registry and the tables --------------------------------------------------------------
def test_discovery_finds_the_known_families():
    assert KNOWN_FAMILIES <= {cls.__name__ for cls in BACKBONES}


@pytest.mark.parametrize('cls', BACKBONES, ids=lambda c: c.__name__)
def test_family_states_its_variants_and_small_archs(cls):
    assert cls.arch_zoo and cls.required_arch_keys
    assert isinstance(cls.checkpoint_format, CheckpointFormat) and cls.checkpoint_format.family
    assert SMALL_ARCHS.get(cls.__name__), f'add small test archs for {cls.__name__} to SMALL_ARCHS'
    for arch in SMALL_ARCHS[cls.__name__]:
        assert set(cls.required_arch_keys) <= set(arch)


# Names other libraries register for their own models: a family named so would shadow them or
# be shadowed (mmpretrain's MViTv2 is 'MViT', its T2T-ViT 'T2T_ViT'; mmdet's ViTDet project
# registers 'ViT', 'SimpleFPN' and 'LN2d').
FOREIGN_NAMES = {'MViT', 'T2T_ViT', 'ViT', 'SimpleFPN', 'LN2d', 'VisionTransformer',
                 'PyramidVisionTransformer', 'PyramidVisionTransformerV2', 'MixVisionTransformer'}


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('cls', BACKBONES, ids=lambda c: c.__name__)
def test_registered_name_builds_under_every_scope_and_shadows_nothing(cls, scope):
    """``type='<name>'`` builds unprefixed under mmdet's and mmseg's default scopes, and
    ``type='mmpvt.<name>'`` under any; the name is none of the other libraries' models."""
    import importlib
    registry = importlib.import_module(f'{scope}.registry').MODELS
    assert cls.__name__ not in FOREIGN_NAMES
    assert registry.get(cls.__name__) is cls
    arch = SMALL_ARCHS[cls.__name__][0]
    with DefaultScope.overwrite_default_scope(scope):
        for name in (cls.__name__, f'mmpvt.{cls.__name__}'):
            built = registry.build(dict(type=name, arch=arch, out_indices=(3,)))
            assert type(built) is cls and built.out_indices == (3,)


# -- every published variant, on the meta device ----------------------------------------------
@pytest.mark.parametrize('case', NAMED, ids=case_id)
def test_published_variant_declares_its_outputs(case):
    cls, name = case
    with torch.device('meta'):
        model = cls(arch=name).eval()
        levels = model.num_levels
        assert len(model.level_channels) == len(model.level_strides) == levels == 4
        assert model.level_strides == (4, 8, 16, 32)
        model = cls(arch=name, out_indices=tuple(range(levels))).eval()
        for shape in AWKWARD:
            with torch.no_grad():
                check_maps(model, model(torch.empty(shape)), shape)
    assert all(p.device.type == 'meta' for p in model.parameters())


@pytest.mark.parametrize('case', NAMED, ids=case_id)
def test_published_variant_numbers_every_parameter(case):
    cls, name = case
    with torch.device('meta'):
        model = cls(arch=name)
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert isinstance(model.num_layers, int) and model.num_layers > 0
    assert set(range(model.num_layers + 1)) <= set(ids.values()) <= set(range(model.num_layers + 2))


# -- small archs: real forwards -----------------------------------------------------------------
@pytest.mark.parametrize('shape', AWKWARD, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_outputs_match_the_declared_contract(case, shape):
    cls, arch = case
    model = all_levels(cls, arch).eval()
    with torch.no_grad():
        outs = model(torch.randn(shape))
    check_maps(model, outs, shape)
    assert all(torch.isfinite(o).all() for o in outs)
    # contiguous NCHW, what mmcv's compiled ops assume (test_mmcv_roi_align_reads_the_maps_right)
    assert all(o.is_contiguous() for o in outs)


@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_mmcv_roi_align_reads_the_maps_right(case):
    """mmcv's RoIAlign (Mask R-CNN's RoI features) reads a map's memory as NCHW whatever its
    strides; on the channels-last maps the backbones computed it pooled wrong values without an
    error. Over each level, and over a convolution's output on it (an FPN's), it equals
    torchvision's RoIAlign, which follows the strides."""
    from mmcv.ops import RoIAlign
    from torchvision.ops import roi_align
    cls, arch = case
    model = all_levels(cls, arch).eval()
    rois = torch.tensor([[0, 1.5, 2.0, 9.0, 7.5], [1, 0.0, 0.0, 15.0, 11.0]])
    with torch.no_grad():
        for level in model(torch.randn(2, 3, 64, 96)):
            lateral = nn.Conv2d(level.shape[1], 8, 1)(level)
            for x in (level, lateral):
                expected = roi_align(x, rois, 7, 1.0, 0, True)
                assert torch.allclose(RoIAlign(7, 1.0, 0, aligned=True)(x, rois), expected, atol=1e-5)


@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_smallest_input_and_size_divisor(case):
    cls, arch = case
    model = all_levels(cls, arch).eval()
    side = model.min_input_size
    divisor = model.size_divisor
    for shape in [(1, 3, side, side), (1, 3, 2 * divisor, 3 * divisor)]:
        with torch.no_grad():
            check_maps(model, model(torch.randn(shape)), shape)


@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_out_indices_select_levels_of_the_same_maps(case):
    cls, arch = case
    full = all_levels(cls, arch).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = full(x)
    levels = full.num_levels
    for subset in [(0,), (levels - 1,), (1, 3), (3, 0), 2]:
        model = cls(arch=arch, out_indices=subset).eval()
        model.load_state_dict(full.state_dict())
        chosen = sorted([subset] if isinstance(subset, int) else subset)
        assert model.out_indices == tuple(chosen)
        assert model.out_channels == tuple(full.level_channels[i] for i in chosen)
        assert model.out_strides == tuple(full.level_strides[i] for i in chosen)
        with torch.no_grad():
            outs = model(x)
        assert len(outs) == len(chosen)
        for out, level in zip(outs, chosen):
            assert torch.equal(out, maps[level])


@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_frozen_stages_stop_gradients_and_stay_in_eval(case):
    cls, arch = case
    stages = cls(arch=arch).num_stages
    previous: set[str] = set()
    for k in range(-1, stages + 1):
        model = cls(arch=arch, frozen_stages=k)
        frozen_modules = model.frozen_modules(max(k, 0))
        in_frozen = {id(p) for m in frozen_modules for p in m.parameters()}
        frozen = {name for name, p in model.named_parameters() if id(p) in in_frozen}
        assert previous <= frozen and (k <= 0 or frozen > previous), 'each stage freezes more'
        previous = frozen
        # frozen on construction (an optimizer built before .train() sees it) and after train()
        for when in ('built', 'train'):
            if when == 'train':
                model.train()
            for name, param in model.named_parameters():
                assert param.requires_grad == (name not in frozen), (k, when, name)
        frozen_ids = {id(m) for f in frozen_modules for m in f.modules()}
        for name, module in model.named_modules():
            assert module.training == (id(module) not in frozen_ids), (k, name)
    # gradients reach only the trainable parameters
    model = cls(arch=arch, frozen_stages=1).train()
    sum(o.sum() for o in model(torch.randn(1, 3, 64, 64))).backward()
    frozen = {id(p) for m in model.frozen_modules(1) for p in m.parameters()}
    assert frozen and all(p.grad is None for p in model.parameters() if id(p) in frozen)
    assert any(p.grad is not None for p in model.parameters() if id(p) not in frozen)


@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_norm_eval_keeps_every_norm_in_eval(case):
    cls, arch = case
    model = cls(arch=arch, norm_eval=True).train()
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    assert norms and not any(m.training for m in norms)
    assert all(m.training for m in model.modules() if not isinstance(m, NORM_TYPES))
    assert all(m.training for m in cls(arch=arch).train().modules())


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loss of a forward and the bytes autograd keeps for its backward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum(o.square().mean() for o in model(x))
    return loss, total


@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_with_cp_gives_the_same_loss_and_gradients_for_less_memory(case):
    cls, arch = case
    plain = cls(arch=arch).train()
    checkpointed = cls(arch=arch, with_cp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 80)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same stochastic-depth draws in both
        loss, kept = saved_bytes(model, x)
        loss.backward()
        results.append((loss.detach(), kept))
    (loss_plain, kept_plain), (loss_cp, kept_cp) = results
    assert torch.equal(loss_plain, loss_cp)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert kept_cp < 0.75 * kept_plain, (kept_cp, kept_plain)  # the blocks' activations are dropped


# -- bad arguments and inputs -----------------------------------------------------------------
@pytest.mark.parametrize('cls', BACKBONES, ids=lambda c: c.__name__)
def test_bad_arch_is_refused_with_what_is_valid(cls):
    with pytest.raises(ValueError, match='unknown arch .nope.; valid names: ') as info:
        cls(arch='nope')
    assert all(name in str(info.value) for name in cls.arch_zoo)
    arch = SMALL_ARCHS[cls.__name__][0]
    for key in cls.required_arch_keys:
        with pytest.raises(ValueError, match=f'arch dict lacks {key}; required keys: '):
            cls(arch={k: v for k, v in arch.items() if k != key})
    with pytest.raises(TypeError, match='arch must be a variant name or a dict'):
        cls(arch=3)


@pytest.mark.parametrize('cls', BACKBONES, ids=lambda c: c.__name__)
def test_bad_levels_and_stages_are_refused(cls):
    arch = SMALL_ARCHS[cls.__name__][0]
    levels = cls(arch=arch).num_levels
    for out_indices, message in [((), 'at least one'), ((0, levels), rf'in \[0, {levels - 1}\]'),
                                 ((1, 1), 'distinct'), ((-1,), 'distinct'),
                                 # taken silently as its keys before: refused for what it is
                                 ({0: 'p2', 1: 'p3'}, 'an int or a sequence of stage indices.*got dict'),
                                 ({0, 1}, 'got set'), ('01', 'got str')]:
        with pytest.raises(ValueError, match=message):
            cls(arch=arch, out_indices=out_indices)
    stages = cls(arch=arch).num_stages
    for frozen_stages in (-2, stages + 1):
        with pytest.raises(ValueError, match=rf'frozen_stages must be -1 or in \[0, {stages}\], got '):
            cls(arch=arch, frozen_stages=frozen_stages)


@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_bad_input_is_refused_with_the_expected_shape(case):
    cls, arch = case
    model = cls(arch=arch)
    side = model.min_input_size
    expected = re.escape(f'expects input of shape (B, 3, H, W) with H, W >= {side}; got')
    for shape in [(3, 64, 64), (1, 1, 64, 64), (1, 4, 64, 64), (1, 3, side - 1, 64), (1, 3, 64, side - 1)]:
        with pytest.raises(ValueError, match=expected):
            model(torch.randn(shape))
    for value in (float('nan'), float('inf')):
        x = torch.randn(1, 3, 64, 64)
        x[0, 2, 3, 4] = value
        with pytest.raises(FloatingPointError, match='NaN or inf in its input batch during training'):
            model.train()(x)
        cls(arch=arch, check_finite=False).train()(x)  # the documented opt-out
        with torch.no_grad():
            model.eval()(x)  # inference reports nothing: the outputs carry the NaN


# -- weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_state_dict_round_trips_through_the_converter(case, tmp_path):
    cls, arch = case
    model = cls(arch=arch).eval()
    state = model.state_dict()
    once = cls.convert_state_dict(state)
    assert list(once) == list(state) and all(torch.equal(once[k], state[k]) for k in state)
    twice = cls.convert_state_dict(once)
    assert list(twice) == list(once) and all(torch.equal(twice[k], once[k]) for k in once)
    # through init_cfg, as a config loads it
    torch.save(state, tmp_path / 'own.pth')
    loaded = cls(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'own.pth')))
    loaded.init_weights()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), loaded.eval()(x)))


def meta_state_dict(cls) -> dict[str, torch.Tensor]:
    """The state dict of the family's first small arch, on the meta device (keys and shapes)."""
    with torch.device('meta'):
        return cls(arch=SMALL_ARCHS[cls.__name__][0]).state_dict()


@pytest.mark.parametrize('cls', BACKBONES, ids=lambda c: c.__name__)
def test_a_detector_checkpoint_gives_its_backbone_and_names_the_rest(cls):
    """The same steps in every family: unwrap, the ``backbone.`` prefix stripped, the layout
    named, the rest of the detector listed as dropped."""
    state = meta_state_dict(cls)
    detector = {'meta': {'epoch': 12}, 'state_dict': {**{f'backbone.{k}': v for k, v in state.items()},
                                                       'neck.lateral_convs.0.conv.weight': torch.zeros(1)}}
    fmt = cls.checkpoint_format
    assert fmt.layout(state) == fmt.layout(detector) == 'mmpvt'
    assert list(fmt.convert(detector)) == list(state)
    assert fmt.dropped_keys(detector) == ['neck.lateral_convs.0.conv.weight']
    assert fmt.dropped_keys(state) == []


@pytest.mark.parametrize('reader', BACKBONES, ids=lambda c: c.__name__)
def test_each_family_refuses_every_other_familys_checkpoints(reader):
    """Each family judges a checkpoint by its own keys only: another family's (bare or inside a
    detector) is refused with a ValueError naming what was expected."""
    for writer in BACKBONES:
        if writer.checkpoint_format is reader.checkpoint_format:
            continue
        state = meta_state_dict(writer)
        for checkpoint in (state, {'state_dict': {f'backbone.{k}': v for k, v in state.items()}}):
            with pytest.raises(ValueError, match='state dict in any known layout'):
                reader.checkpoint_format.layout(checkpoint)


@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_a_tensor_of_another_shape_is_refused_by_key_and_shapes(case):
    cls, arch = case
    model = cls(arch=arch)
    state = model.state_dict()
    keys = [k for k, v in state.items() if v.dim() > 0]
    for key in (keys[0], keys[len(keys) // 2], keys[-1]):
        wrong = dict(state)
        shape = (*state[key].shape[:-1], state[key].shape[-1] + 1)  # no family can fit a channel more
        wrong[key] = torch.zeros(shape)
        message = (rf'{re.escape(key)} has shape {re.escape(str(shape))} in the checkpoint and '
                   rf'{re.escape(str(tuple(state[key].shape)))} in the model')
        with pytest.raises(CheckpointError, match=message):
            cls(arch=arch).load_state_dict(wrong)


# -- layer-wise lr decay numbering -----------------------------------------------------------
@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_layer_ids_grow_from_input_to_output(case):
    """Parameters nearer the input have lower layer ids.

    Backward reaches the parameters in the reverse of the order the forward used them (each
    one's gradient is complete once everything after it is done), so the layer ids in the
    order gradients arrive may only fall.
    """
    cls, arch = case
    model = all_levels(cls, arch).eval()
    arrived: list[str] = []
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: arrived.append(name))
    sum(o.sum() for o in model(torch.randn(1, 3, 64, 64))).backward()
    assert sorted(arrived) == sorted(n for n, _ in model.named_parameters()), 'every parameter is used'
    ids = [model.layer_id(name) for name in reversed(arrived)]
    assert ids == sorted(ids), list(zip(reversed(arrived), ids))
    assert ids[0] == 0 and ids[-1] in (model.num_layers, model.num_layers + 1)
    with pytest.raises(ValueError, match='is no parameter of the backbone'):
        model.layer_id('neck.conv.weight')
