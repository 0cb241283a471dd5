"""ViTDet: a plain Vision Transformer with a simple feature pyramid, for dense prediction.

Paper: "Exploring Plain Vision Transformer Backbones for Object Detection" (Li, Mao,
Girshick, He; ECCV 2022). The design follows detectron2's ``ViT`` and
``SimpleFeaturePyramid``: one stride-16 map from a column of transformer blocks (windowed
attention in most of them, global attention in four), absolute position embeddings kept at
the pre-training shape and resized on every forward, decomposed relative positions.

mmpvt promises four maps to any FPN neck, so the pyramid's scale changes (deconvolutions,
identity, max-pool) sit in the backbone; the paper's per-level 1x1/3x3 convolutions are the
separate ``ViTDetNeck``.

The file reads bottom-up: the backbone, the neck, checkpoint conversion, then the table of
variants. The blocks are in ``attention.py``, the pyramid's scale changes in ``pyramid.py``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import CheckpointFormat
from ..registry import register_model
from .attention import TransformerBlock
from .base import DenseBackbone
from .layers import HW, LayerNorm2d, PatchEmbed, abs_pos_embed_to_grid, init_linear_and_norm
from .pyramid import SimplePyramid

# LayerNorm eps of detectron2's ViTDet and of the ViT/MAE pre-training code.
NORM_EPS = 1e-6
# The position embedding keeps one row in front of the grid for the pre-training class
# token (it is never added to a patch token): the (1, 197, C) shape of every ViT release.
NUM_PREFIX_TOKENS = 1
# The paper's box and mask heads normalise with the same channel LayerNorm: registered so that
# configs name it as a norm layer, norm_cfg=dict(type='LayerNorm2d', eps=1e-6).
register_model(LayerNorm2d)


@register_model
class ViTDet(DenseBackbone):
    """ViTDet's plain ViT with the scale changes of its simple pyramid: strides 4, 8, 16, 32.

    The stride-16 map is the last block's output (no final norm). Level 0 (stride 4) is a
    2x2/2 deconvolution to C/2, channel LayerNorm, GELU, a 2x2/2 deconvolution to C/4;
    level 1 (stride 8) one deconvolution to C/2; level 2 (stride 16) the map itself; level 3
    (stride 32) a 2x2 max-pool. Only the levels in ``out_indices`` are built, so no
    parameter goes unused. Pair it with ``ViTDetNeck`` for the paper's detectors, or with
    an ordinary FPN.

    Args:
        arch: tiny, small, base, large, huge (DeiT-Ti, ViT-S/B/L/H), or a dict with
            ``embed_dims``, ``depth``, ``num_heads`` and optionally ``global_attn_indexes``
            (the last block of each quarter of the depth) and what ``VITDET_DEFAULTS``
            holds (``mlp_ratio``, ``drop_path_rate``, ``window_size``).
        img_size: the input size the global blocks' relative-position tables are sized
            for (``2 * img_size / patch_size - 1`` rows); other sizes resize them.
        patch_size: side of the square patches (the stride of the column).
        in_channels: channels of the input image.
        out_indices: levels to return, 0-based (strides 4, 8, 16, 32).
        window_size: side of the attention windows of every block but the global ones;
            0 makes every block global; None takes the variant's (14, the paper's).
        use_rel_pos: add decomposed relative positions in every block.
        use_abs_pos: add the learned absolute position embedding after the patches.
        pretrain_img_size: the image size the absolute position embedding was learned at
            (224: a 14x14 grid plus the class-token row, shape (1, 197, C)).
        qkv_bias: bias in the query/key/value projections.
        drop_rate, attn_drop_rate: dropout after projections / on attention weights.
        drop_path_rate: stochastic depth of the last block, growing linearly from 0; None
            takes the variant's value (the paper's: 0.1 for B, 0.4 for L, 0.5 for H).
        frozen_stages: 0 or -1 freeze nothing; ``k`` in 1..4 freezes the patch and position
            embeddings and the first ``k * depth // 4`` blocks (the first k quarters of the
            column: for B/L/H each quarter ends with a global block). The pyramid's scale
            changes are new layers and are never frozen.
        norm_eval, with_cp, check_finite, init_cfg: see ``DenseBackbone``. ``init_cfg``
            loads timm/DeiT/MAE, detectron2 ViTDet (.pth and .pkl), mmdet's ViTDet project
            and mmpvt checkpoints.
    """

    required_arch_keys = ('embed_dims', 'depth', 'num_heads')
    level_strides = (4, 8, 16, 32)
    # A checkpoint of the plain column (MAE, timm, DeiT) has neither: the tables start at
    # zero, as detectron2 starts them, and the scale changes at their initialisation.
    optional_groups = {'relative-position tables': ('.rel_pos_h', '.rel_pos_w'),
                       'pyramid scale changes': SimplePyramid.PREFIXES}
    rel_pos_tables = ('attn.rel_pos_h', 'attn.rel_pos_w')
    unbuilt_parts = 'pyramid levels'

    def __init__(self, arch: str | Mapping[str, Any] = 'base', img_size: int | Sequence[int] = 1024,
                 patch_size: int = 16, in_channels: int = 3, out_indices: int | Sequence[int] = (0, 1, 2, 3),
                 window_size: int | None = None, use_rel_pos: bool = True, use_abs_pos: bool = True,
                 pretrain_img_size: int = 224, qkv_bias: bool = True, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float | None = None, frozen_stages: int = -1,
                 norm_eval: bool = False, with_cp: bool = False, check_finite: bool = True,
                 init_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__(arch, in_channels=in_channels, out_indices=out_indices, frozen_stages=frozen_stages,
                         norm_eval=norm_eval, with_cp=with_cp, check_finite=check_finite, init_cfg=init_cfg)
        settings = self.arch_settings
        dims, depth = settings['embed_dims'], settings['depth']
        if patch_size != 16:
            raise ValueError(f'ViTDet: patch_size must be 16 (levels at strides 4, 8, 16, 32), '
                             f'got {patch_size}')
        window_size = self.default(window_size, 'window_size')
        if not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f'ViTDet: window_size must be >= 0 (0: global attention), got {window_size}')
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.window_size = window_size
        self.use_rel_pos = use_rel_pos
        # Non-overlapping patches, no norm; sizes that are not multiples of the patch are floored
        # (the last partial patch dropped), as in timm and detectron2.
        self.patch_embed = PatchEmbed(in_channels, dims, patch_size, stride=patch_size)
        self.pos_grid = (pretrain_img_size // patch_size,) * 2
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PREFIX_TOKENS + self.pos_grid[0] ** 2, dims))
        else:
            self.register_parameter('pos_embed', None)

        rates = self.drop_path_rates(self.default(drop_path_rate, 'drop_path_rate'), depth)
        global_blocks = set(settings['global_attn_indexes'])
        self.blocks = nn.ModuleList()
        for i in range(depth):
            window = 0 if i in global_blocks else window_size
            grid = (window, window) if window else (img_hw[0] // patch_size, img_hw[1] // patch_size)
            self.blocks.append(TransformerBlock(
                dims, settings['num_heads'], settings['mlp_ratio'], qkv_bias, window_size=window,
                rel_pos_size=grid if use_rel_pos else None, norm_eps=NORM_EPS, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=rates[i]))

        self.pyramid = SimplePyramid(self, dims, self.out_indices, norm_eps=NORM_EPS)
        self.level_channels = self.pyramid.channels

        self.apply(_init_weights)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=.02)
        self.freeze_stages()

    # -- the family's part of the base ------------------------------------------------------
    def _complete_arch(self, settings: dict[str, Any]) -> dict[str, Any]:
        dims, depth, heads = settings['embed_dims'], settings['depth'], settings['num_heads']
        if depth < 1 or dims % heads or dims % 4:
            raise ValueError(f'ViTDet: arch needs depth >= 1 and embed_dims divisible by num_heads and by 4 '
                             f'(the stride-4 level has embed_dims / 4 channels); got embed_dims={dims}, '
                             f'depth={depth}, num_heads={heads}')
        settings = {**VITDET_DEFAULTS, **settings}
        # Global attention closes each quarter of the column, as in the paper's B, L and H.
        quarter_ends = sorted({max(depth * k // 4 - 1, 0) for k in (1, 2, 3, 4)})
        indexes = tuple(settings.setdefault('global_attn_indexes', quarter_ends))
        in_range = all(isinstance(i, int) and 0 <= i < depth for i in indexes)
        if len(set(indexes)) != len(indexes) or not in_range:
            raise ValueError(f'ViTDet: global_attn_indexes must be distinct block indices in '
                             f'[0, {depth - 1}], got {indexes}')
        settings['global_attn_indexes'] = indexes
        return settings

    def frozen_modules(self, num_stages: int) -> list[nn.Module]:
        """The embeddings and the first ``num_stages`` quarters of the blocks (none for 0).

        The position embedding is a bare parameter of the backbone (timm's and detectron2's
        key ``pos_embed``); it goes in as a one-entry ParameterList that views it.
        """
        if num_stages <= 0:
            return []
        embeddings = [self.patch_embed]
        if self.pos_embed is not None:
            embeddings.append(nn.ParameterList([self.pos_embed]))
        return [*embeddings, *self.blocks[:len(self.blocks) * num_stages // self.num_stages]]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_id(self, name: str) -> int:
        if name == 'pos_embed' or name.startswith('patch_embed.'):
            return 0
        if m := re.match(r'blocks\.(\d+)\.', name):
            return int(m[1]) + 1
        if self.pyramid.owns(name):
            return self.num_layers + 1
        raise ValueError(f'ViTDet.layer_id: {name!r} is no parameter of the backbone')

    def position_grids(self) -> dict[str, tuple[int, HW, str]]:
        """The absolute embedding (e.g. a 384 pre-training's 24x24 grid is resized bicubically)."""
        return {} if self.pos_embed is None else {'pos_embed': (NUM_PREFIX_TOKENS, self.pos_grid, 'bicubic')}

    def unbuilt_prefixes(self) -> tuple[str, ...]:
        return self.pyramid.unbuilt_prefixes

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns the maps of ``out_indices``: ``(B, out_channels[k], H / s_k, W / s_k)``.

        For inputs padded to ``size_divisor`` (32) the sizes are exact; otherwise the patch
        embedding floors to whole patches and the stride-32 max-pool floors odd grids.
        """
        self.check_input(x)
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + abs_pos_embed_to_grid(self.pos_embed, x.shape[1:3], NUM_PREFIX_TOKENS)
        recompute = self.recompute
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last
        return self.pyramid(self, x)


def _init_weights(m: nn.Module) -> None:
    """detectron2's ViT initialisation: truncated-normal linears, unit LayerNorms.

    Convolutions keep PyTorch's default, as in detectron2's patch embedding and pyramid.
    """
    init_linear_and_norm(m)


class ConvNorm(nn.Sequential):
    """A convolution without bias followed by a channel LayerNorm (no activation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = LayerNorm2d(out_channels, eps=norm_eps)


@register_model
class ViTDetNeck(BaseModule):
    """The rest of ViTDet's simple feature pyramid, after the backbone's scale changes.

    Each input level gets a 1x1 convolution to ``out_channels`` + channel LayerNorm, then a
    3x3 convolution + channel LayerNorm (no bias, no activation, no top-down path, unlike
    FPN). Levels beyond the inputs (``num_outs``) subsample the last one by 2 (max-pool with
    kernel 1), detectron2's ``LastLevelMaxPool``.

    Args:
        in_channels: channels of each input map, e.g. ``ViTDet.out_channels``.
        out_channels: channels of every output map.
        num_outs: number of output maps (5 for the paper's detectors: strides 4 to 64).
        norm_eps: eps of the channel LayerNorms (detectron2: 1e-6).
        init_cfg: mmengine init config; the default keeps PyTorch's initialisation, as
            detectron2 does.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5,
                 norm_eps: float = NORM_EPS, init_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.in_channels = tuple(in_channels)
        if not self.in_channels or num_outs < len(self.in_channels):
            raise ValueError(f'ViTDetNeck: num_outs ({num_outs}) must be at least the number of inputs '
                             f'({len(self.in_channels)}), which must be at least one')
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvNorm(c, out_channels, 1, norm_eps) for c in self.in_channels)
        self.output_convs = nn.ModuleList(ConvNorm(out_channels, out_channels, 3, norm_eps)
                                          for _ in self.in_channels)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'ViTDetNeck: expected {len(self.in_channels)} input maps, got {len(inputs)}')
        outs = [out(lateral(x)) for x, lateral, out in zip(inputs, self.lateral_convs, self.output_convs)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)


# -- checkpoint conversion -------------------------------------------------------------------
# mmpvt's layout: patch_embed.proj, pos_embed (1, 1 + S*S, C), blocks.{i}.{norm1, attn.qkv,
# attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2, mlp.fc1, mlp.fc2}, scale_x4.{0, 1, 3},
# scale_x2.0. The trunk's names are timm's (and detectron2's under ``net.``).

# Entries of classification and pre-training checkpoints a detection backbone has no use for:
# class/distillation/register/mask tokens, final norms, heads, the MAE decoder.
PRETRAINING_KEYS = re.compile(
    r'^(cls_token|dist_token|reg_token|mask_token|norm\.|fc_norm\.|head\.|head_dist\.|head_drop\.|'
    r'attn_pool\.|decoder_)')
# The scale changes inside the pyramids of detectron2 (simfp_{log2 stride}.{index}) and of
# mmdet's ViTDet project (neck.fpn{level}.{index}), by mmpvt name. What follows them there
# (the 1x1/3x3 convolutions) is ViTDetNeck's, not the backbone's.
_PYRAMID_RENAMES = (
    (re.compile(r'^simfp_2\.([013])\.'), r'scale_x4.\1.'),
    (re.compile(r'^simfp_3\.0\.'), 'scale_x2.0.'),
    (re.compile(r'^neck\.fpn1\.([013])\.'), r'scale_x4.\1.'),
    (re.compile(r'^neck\.fpn2\.0\.'), 'scale_x2.0.'),
)
_QKV = re.compile(r'^blocks\.\d+\.attn\.qkv\.weight$')
# A ViT cuts its image into patches with one convolution whose kernel is the patch (14 or 16
# in every release; 8 and up in any ViT): with the blocks' fused qkv, the mark of a plain ViT.
_PATCH_EMBED = 'patch_embed.proj.weight'
MIN_PATCH = 8


def _prefix_rows(rows: int) -> int:
    """How many rows in front of the grid a position embedding of ``rows`` rows holds.

    The rows beyond the largest square: 0 (timm without a class token), 1 (class token),
    2 (DeiT's distillation token), 1 + 4 registers. Unambiguous while there are fewer
    prefix rows than ``2 * side + 1`` (at least 29 for a 14x14 grid).
    """
    return rows - math.isqrt(rows) ** 2


def _rename(key: str) -> str | None:
    """The mmpvt name of a checkpoint key (the backbone's, or a pyramid layer of mmdet's neck),
    or None if the backbone has no use for it."""
    for pattern, new in _PYRAMID_RENAMES:
        if pattern.match(key):
            return pattern.sub(new, key)
    if PRETRAINING_KEYS.match(key) or key.startswith(('simfp_', 'neck.')):
        return None  # simfp's and the neck's other layers are ViTDetNeck's
    return key[len('net.'):] if key.startswith('net.') else key


class ViTDetCheckpointFormat(CheckpointFormat):
    """Plain-ViT / ViTDet checkpoints: timm's ``vit_*`` and DeiT (also distilled) releases, MAE
    pre-training files, detectron2 ViTDet detectors (``backbone.net``, ``backbone.simfp_*``;
    ``.pth``, or the ``.pkl`` numpy pickles once read), mmdet's ViTDet project (the backbone,
    and the scale changes its neck holds as ``neck.fpn1`` / ``neck.fpn2``) and mmpvt's own.
    Dropped: classification and pre-training entries (tokens, final norm, heads, the MAE
    decoder) and the rest of a detector. The position embedding gets exactly one row in front
    of its grid (timm's class-token-free models have none, DeiT's distilled ones two).
    """

    family = 'vitdet'

    def _detect(self, inside: Mapping[str, Any], outside: Mapping[str, Any]) -> str:
        keys = [k[len('net.'):] if k.startswith('net.') else k for k in inside]
        patch = inside.get(_PATCH_EMBED, inside.get('net.' + _PATCH_EMBED))
        if not (any(_QKV.match(k) for k in keys) and patch is not None and len(patch.shape) == 4
                and patch.shape[-1] == patch.shape[-2] >= MIN_PATCH):
            raise ValueError('not a plain ViT state dict in any known layout (timm/DeiT/MAE, detectron2 '
                             f'ViTDet, mmdet ViTDet, mmpvt); first keys: {list(inside)[:5]}')
        if any(k.startswith(('net.', 'simfp_')) for k in inside):
            return 'detectron2'
        if any(k.startswith(SimplePyramid.PREFIXES) for k in keys):
            return 'mmpvt'
        if any(k.startswith('neck.fpn') for k in outside):
            return 'mmdet'
        if any(k.startswith(('decoder_', 'mask_token')) for k in keys):
            return 'mae'
        return 'timm'

    def _drops(self, key: str, layout: str) -> bool:
        return _rename(key) is None

    def _adopts(self, key: str, layout: str) -> bool:
        return key.startswith('neck.') and _rename(key) is not None

    def _convert(self, state: dict[str, Any], layout: str) -> dict[str, torch.Tensor]:
        out = {_rename(k): v for k, v in state.items()}
        if 'pos_embed' in out:
            pos = out['pos_embed']
            prefix = _prefix_rows(pos.shape[1])
            if prefix != NUM_PREFIX_TOKENS:
                front = pos[:, :1] if prefix else pos.new_zeros(1, 1, pos.shape[2])
                out['pos_embed'] = torch.cat([front, pos[:, prefix:]], dim=1)
        return out


# -- variants --------------------------------------------------------------------------------
# What every variant (and an arch dict) has unless it says otherwise: the paper's 14x14
# windows and ViT-B's stochastic depth (the small variants take B's too).
VITDET_DEFAULTS: dict[str, Any] = dict(mlp_ratio=4., drop_path_rate=0.1, window_size=14)
# The MAE ImageNet-1k pre-training detectron2 starts its detectors from (``pretrained``: what
# the zoo's configs load; ViT-H's converted from patches of 14 to 16).
_MAE = 'https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MAE/'
_B = dict(depth=12, global_attn_indexes=(2, 5, 8, 11))
VITDET_ARCHS: dict[str, dict[str, Any]] = {
    'tiny': dict(_B, embed_dims=192, num_heads=3),
    'small': dict(_B, embed_dims=384, num_heads=6),
    'base': dict(_B, embed_dims=768, num_heads=12, pretrained=_MAE + 'mae_pretrain_vit_base.pth'),
    # drop_path_rate: the paper's L and H detectors
    'large': dict(embed_dims=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23),
                  drop_path_rate=0.4, pretrained=_MAE + 'mae_pretrain_vit_large.pth'),
    'huge': dict(embed_dims=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31),
                 drop_path_rate=0.5, pretrained=_MAE + 'mae_pretrain_vit_huge_p14to16.pth'),
}

ViTDet.arch_zoo = VITDET_ARCHS
ViTDet.checkpoint_format = ViTDetCheckpointFormat()
