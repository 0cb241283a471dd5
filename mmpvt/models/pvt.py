"""Pyramid Vision Transformer backbones: PVT (v1) and PVTv2, for dense prediction.

Papers: "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without
Convolutions" (ICCV 2021) and "PVT v2: Improved Baselines with Pyramid Vision Transformer"
(CVMJ 2022).

The file reads bottom-up: attention, MLP, block, stage, the two registered backbones,
checkpoint conversion, then the table of variants.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import CheckpointFormat
from ..ops import dwconv_gelu
from ..registry import register_model
from .base import DenseBackbone
from .layers import (
    HW,
    DropPath,
    PatchEmbed,
    adaptive_avg_pool2d,
    exporting,
    init_linear_and_norm,
    nchw_maps,
    nchw_to_nlc,
    nlc_to_nchw,
    resize_pos_embed,
)

# LayerNorm eps as in the authors' training code: blocks and stage outputs use 1e-6, the
# patch embeddings and the key/value reduction keep PyTorch's default.
BLOCK_NORM_EPS = 1e-6
EMBED_NORM_EPS = 1e-5
# PVTv2-Li pools keys and values to a fixed 7x7 grid, whatever the input size.
LINEAR_POOL_SIZE = 7


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from a spatially reduced map.

    Queries come from all ``H*W`` tokens. Keys and values come from the map reduced by a
    ``sr_ratio``-strided convolution (PVT, PVTv2) or, with ``linear=True``, pooled to 7x7
    and mixed by a 1x1 convolution (PVTv2-Li), which makes the cost linear in ``H*W``.

    Args:
        dims: channels of the tokens.
        num_heads: attention heads; must divide ``dims``.
        sr_ratio: reduction factor of keys and values (1: none).
        linear: use the pooled, linear-complexity reduction instead of ``sr_ratio``.
        qkv_bias: bias in the query and key/value projections.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dims: int, num_heads: int, sr_ratio: int = 1, linear: bool = False,
                 qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.) -> None:
        super().__init__()
        if dims % num_heads:
            raise ValueError(f'num_heads ({num_heads}) must divide the embedding dims ({dims})')
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.linear = linear
        self.attn_drop = attn_drop
        self.q = nn.Linear(dims, dims, bias=qkv_bias)
        # Keys and values stacked on the output dim, as in every published checkpoint.
        self.kv = nn.Linear(dims, 2 * dims, bias=qkv_bias)
        self.proj = nn.Linear(dims, dims)
        self.proj_drop = nn.Dropout(proj_drop)
        if linear:
            self.sr = nn.Conv2d(dims, dims, kernel_size=1)
            self.norm = nn.LayerNorm(dims, eps=EMBED_NORM_EPS)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dims, dims, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dims, eps=EMBED_NORM_EPS)

    @property
    def reduces(self) -> bool:
        """Whether keys and values come from a reduced map."""
        return self.linear or self.sr_ratio > 1

    def forward(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        B, N, C = x.shape
        heads = self.num_heads
        # (B, heads, N, head_dim) as strided views: SDPA reads them without a copy.
        q = self.q(x).unflatten(-1, (heads, C // heads)).transpose(1, 2)
        if self.reduces:
            kv = nlc_to_nchw(x, hw)
            if self.linear:
                kv = adaptive_avg_pool2d(kv, LINEAR_POOL_SIZE)
            kv = self.norm(nchw_to_nlc(self.sr(kv)))
            if self.linear:
                kv = self.act(kv)
        else:
            kv = x
        k, v = self.kv(kv).unflatten(-1, (2, heads, C // heads)).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class _PaddingBiasCorrection(torch.autograd.Function):
    """Takes off a depthwise 3x3 convolution's border the bias its taps on the padding added.

    ``out`` is ``conv2d(h, w, b * sum(w), padding=1)``; each edge pixel received ``b * w`` for
    the taps that read the zero padding, where ``conv2d(h + b, w, padding=1)`` would have had
    nothing. ``taps`` (C, 3, 3) is ``w * b``. The correction is made in place, and its
    gradient is read off the border of the incoming gradient: autograd's own in-place
    slicing would clone the whole map once per edge in the backward pass.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(out)
        rows, cols = taps.sum(2), taps.sum(1)  # (C, 3) each: the bias through kernel rows / columns
        out[:, :, 0, :] -= rows[:, 0, None]  # the top row's kernel row 0 reads the padding
        out[:, :, -1, :] -= rows[:, 2, None]
        out[:, :, :, 0] -= cols[:, 0, None]
        out[:, :, :, -1] -= cols[:, 2, None]
        for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # corners: taken off twice above
            out[:, :, i, j] += taps[:, i, j]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad_taps = grad.new_zeros(grad.shape[1], 3, 3)
        grad_taps[:, 0, :] -= grad[:, :, 0, :].sum((0, 2))[:, None]
        grad_taps[:, 2, :] -= grad[:, :, -1, :].sum((0, 2))[:, None]
        grad_taps[:, :, 0] -= grad[:, :, :, 0].sum((0, 2))[:, None]
        grad_taps[:, :, 2] -= grad[:, :, :, -1].sum((0, 2))[:, None]
        for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            grad_taps[:, i, j] += grad[:, :, i, j].sum(0)
        return grad, grad_taps


class Mlp(nn.Module):
    """The feed-forward part of a block: fc1, [ReLU], [3x3 depthwise conv], GELU, fc2.

    PVTv2 adds the depthwise convolution on the hidden map (it replaces position
    embeddings); PVTv2-Li also puts a ReLU before it.
    """

    def __init__(self, dims: int, hidden_dims: int, dwconv: bool = False, extra_relu: bool = False,
                 drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.relu = nn.ReLU() if extra_relu else None
        self.dwconv = (nn.Conv2d(hidden_dims, hidden_dims, 3, padding=1, groups=hidden_dims)
                       if dwconv else None)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        # An exported model runs the layers as they are: the kernel has no ONNX or export
        # translation, and the bias folding and its autograd correction serve training speed.
        if self.dwconv is not None and self.relu is None and not exporting():
            h = F.linear(x, self.fc1.weight)  # fc1's bias goes in with the convolution
            if dwconv_gelu.applies(h):
                x = dwconv_gelu.dwconv_gelu(h, hw, self.dwconv.weight, self.fc1.bias, self.dwconv.bias)
            else:
                x = self.act(nchw_to_nlc(self._dwconv_of_fc1(h, hw)))
        else:
            x = self.fc1(x)
            if self.relu is not None:
                x = self.relu(x)
            if self.dwconv is not None:
                x = nchw_to_nlc(self.dwconv(nlc_to_nchw(x, hw)))
            x = self.act(x)
        return self.drop(self.fc2(self.drop(x)))

    def _dwconv_of_fc1(self, h: torch.Tensor, hw: HW) -> torch.Tensor:
        """``dwconv(h + fc1.bias)`` for ``h = x @ fc1.weight.T``: the bias carried by the convolution.

        The layer-by-layer path, where mmpvt.ops.dwconv_gelu does not apply (CUDA, float16,
        float64).

        ``fc1`` writes the widest tensor of the block (``mlp_ratio`` times the channels), and
        adding its bias there costs a full pass over it forward (a copy into the GEMM's output)
        and another backward (the bias gradient's sum): 5% of a PVTv2-b2 training step. A
        constant per-channel ``b`` goes through a zero-padded 3x3 depthwise convolution as
        ``b * sum(w)``, except on the border, where the taps that read the padding saw no
        bias: those are taken off the four edges (and the corners, counted twice, put back),
        a few thousand values instead of the whole map. Same parameters, same result up to
        float rounding.
        """
        bias = self.fc1.bias
        h = nlc_to_nchw(h, hw)
        if bias is None:
            return self.dwconv(h)
        conv = self.dwconv
        taps = conv.weight.squeeze(1) * bias[:, None, None]  # (C, 3, 3): the bias through each tap
        conv_bias = taps.sum((1, 2)) if conv.bias is None else conv.bias + taps.sum((1, 2))
        out = F.conv2d(h, conv.weight, conv_bias, padding=1, groups=conv.groups)
        return _PaddingBiasCorrection.apply(out, taps)


class Block(nn.Module):
    """A pre-norm transformer block: spatial-reduction attention, then the MLP."""

    def __init__(self, dims: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
                 linear: bool = False, dwconv: bool = False, qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dims, eps=BLOCK_NORM_EPS)
        self.attn = SpatialReductionAttention(dims, num_heads, sr_ratio, linear, qkv_bias,
                                              attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dims, eps=BLOCK_NORM_EPS)
        self.mlp = Mlp(dims, int(dims * mlp_ratio), dwconv=dwconv, extra_relu=linear, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class PVTStage(nn.Module):
    """One pyramid level: patch embedding, [position embedding], blocks, [output norm].

    Args:
        in_channels: channels of the incoming map (the image for the first stage).
        dims: channels of this stage.
        depth: number of blocks.
        num_heads, mlp_ratio, sr_ratio, linear, dwconv, qkv_bias: per-block settings.
        patch_size, patch_stride, patch_padding: the patch-embedding convolution.
        pos_grid: the pre-training token grid of a learned absolute position embedding
            (PVT v1); ``None`` for none (PVTv2).
        out_norm: LayerNorm on the stage's output (PVTv2).
        drop, attn_drop: dropout rates.
        drop_paths: stochastic-depth rate of each block.
    """

    def __init__(self, in_channels: int, dims: int, depth: int, num_heads: int, mlp_ratio: float,
                 sr_ratio: int, patch_size: int, patch_stride: int, patch_padding: int,
                 pos_grid: HW | None = None, linear: bool = False, dwconv: bool = False,
                 out_norm: bool = False, qkv_bias: bool = True, drop: float = 0.,
                 attn_drop: float = 0., drop_paths: Sequence[float] = ()) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, dims, patch_size, patch_stride, patch_padding,
                                      norm_eps=EMBED_NORM_EPS)
        self.pos_grid = pos_grid
        if pos_grid is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid[0] * pos_grid[1], dims))
            self.pos_drop = nn.Dropout(drop)
        else:
            self.register_parameter('pos_embed', None)
        drop_paths = list(drop_paths) or [0.] * depth
        self.blocks = nn.ModuleList(
            Block(dims, num_heads, mlp_ratio, sr_ratio, linear, dwconv, qkv_bias, drop, attn_drop, dp)
            for dp in drop_paths)
        self.norm = nn.LayerNorm(dims, eps=BLOCK_NORM_EPS) if out_norm else None

    def forward(self, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """``recompute``: each block's activations are recomputed in backward (the backbone's
        ``with_cp``, in a training step)."""
        x = self.patch_embed(x)
        hw = (x.shape[1], x.shape[2])
        x = x.flatten(1, 2)
        if self.pos_embed is not None:
            # Resized whenever the grid differs from pre-training's, at every stage.
            x = self.pos_drop(x + resize_pos_embed(self.pos_embed, self.pos_grid, hw))
        for block in self.blocks:
            x = checkpoint(block, x, hw, use_reentrant=False) if recompute else block(x, hw)
        if self.norm is not None:
            x = self.norm(x)
        return nlc_to_nchw(x, hw)


class PyramidVisionTransformerBase(DenseBackbone):
    """What PVT and PVTv2 share; the subclasses set the family's fixed design.

    Args:
        arch: a variant name of the family (see ``arch_zoo``) or a dict with keys
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios``, ``sr_ratios`` (one
            entry per stage) and optionally ``linear`` (PVTv2-Li attention).
        in_channels: channels of the input image.
        out_indices: stages whose maps are returned, 0-based (strides 4, 8, 16, 32).
        qkv_bias: bias in the query/key/value projections.
        drop_rate: dropout after attention and MLP projections (and position embeddings).
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over
            all blocks. None takes the variant's (0.1: the papers train detectors and
            segmentors with it).
        frozen_stages: the first ``frozen_stages`` stages (with their patch embeddings)
            get no gradients and stay in eval mode; -1 or 0 freezes nothing.
        norm_eval: keep every normalisation layer in eval mode during training.
        with_cp: activation checkpointing per block (non-reentrant): less memory, more time.
        check_finite: in training, raise FloatingPointError on a batch holding NaN or inf
            instead of training on it (one reduction over the input per step).
        pretrain_img_size: image size the position embeddings were learned at (PVT v1): an
            int or ``(H, W)``.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` loads any PVT layout
            (the authors' release, timm, mmdet, mmpvt; whole detector checkpoints too).

    Layer-wise learning-rate decay numbers the blocks of all stages in order (block ``k``
    overall is layer ``k + 1``). Stage 0's patch embedding (and v1's position embedding) is
    layer 0; a later stage's patch and position embeddings come right after the previous
    stage's last block, so they share the layer of their stage's first block; a stage's
    output norm (v2) shares the layer of the stage's last block.
    """

    # The family's fixed design, set by subclasses.
    patch_sizes: tuple[int, ...] = ()
    patch_strides = (4, 2, 2, 2)
    patch_paddings: tuple[int, ...] = ()
    use_pos_embed = False
    dwconv = False
    out_norm = False
    required_arch_keys = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios')
    # Inputs smaller than this leave no token for the first stage's key/value reduction.
    min_input_size = 32

    def __init__(self, arch: str | Mapping[str, Any] = 'b2', in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3), qkv_bias: bool = True,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float | None = None,
                 frozen_stages: int = -1, norm_eval: bool = False, with_cp: bool = False,
                 check_finite: bool = True, pretrain_img_size: int | Sequence[int] = 224,
                 init_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__(arch, in_channels=in_channels, out_indices=out_indices,
                         frozen_stages=frozen_stages, norm_eval=norm_eval, with_cp=with_cp,
                         check_finite=check_finite, init_cfg=init_cfg)
        dims, depths = self.arch_settings['embed_dims'], self.arch_settings['depths']
        self.pretrain_img_size = _image_size(pretrain_img_size, type(self).__name__)
        rates = self.drop_path_rates(self.default(drop_path_rate, 'drop_path_rate'), sum(depths))
        self.stages = nn.ModuleList()
        stride, channels, strides = 1, in_channels, []
        for i in range(self.num_levels):
            j = min(i, len(self.patch_sizes) - 1)  # extra stages repeat the last design
            stride *= self.patch_strides[j]
            strides.append(stride)
            pos_grid = ((self.pretrain_img_size[0] // stride, self.pretrain_img_size[1] // stride)
                        if self.use_pos_embed else None)
            self.stages.append(PVTStage(
                channels, dims[i], depths[i], self.arch_settings['num_heads'][i],
                self.arch_settings['mlp_ratios'][i], self.arch_settings['sr_ratios'][i],
                patch_size=self.patch_sizes[j], patch_stride=self.patch_strides[j],
                patch_padding=self.patch_paddings[j], pos_grid=pos_grid,
                linear=self.arch_settings['linear'], dwconv=self.dwconv, out_norm=self.out_norm,
                qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_paths=rates[sum(depths[:i]):sum(depths[:i + 1])]))
            channels = dims[i]
        self.level_channels = tuple(dims)
        self.level_strides = tuple(strides)

        self.apply(_init_weights)
        # Depthwise 3x3 weights, (C, 1, 3, 3), are ambiguous to PyTorch's layout heuristics,
        # which then copy the channels-last token map to NCHW and back around every MLP
        # convolution; channels-last weights keep the whole network in one layout.
        self.to(memory_format=torch.channels_last)
        self.freeze_stages()

    # -- what the base asks of the family --------------------------------------------------
    def _complete_arch(self, settings: dict[str, Any]) -> dict[str, Any]:
        settings = {**PVT_DEFAULTS, **settings}
        lengths = {k: len(settings[k]) for k in self.required_arch_keys}
        if len(set(lengths.values())) != 1:
            raise ValueError(f'{type(self).__name__}: arch lists must have one entry per stage, '
                             f'got lengths {lengths}')
        return settings

    @property
    def num_levels(self) -> int:
        """One level per stage (four in every published variant)."""
        return len(self.arch_settings['depths'])

    @property
    def num_layers(self) -> int:
        """Blocks over all stages."""
        return sum(self.arch_settings['depths'])

    def frozen_modules(self, num_stages: int) -> list[nn.Module]:
        """The first ``num_stages`` stages, each with its patch (and position) embedding."""
        return list(self.stages[:num_stages])

    def layer_id(self, name: str) -> int:
        """The layer of parameter ``name`` for layer-wise lr decay (see the class docstring)."""
        depths = self.arch_settings['depths']
        m = re.match(r'stages\.(\d+)\.(?:(patch_embed\.|pos_embed$)|blocks\.(\d+)\.|(norm\.))', name)
        if m is None or int(m[1]) >= len(depths):
            raise ValueError(f'{type(self).__name__}.layer_id: {name!r} is no parameter of the backbone')
        stage = int(m[1])
        first_block = sum(depths[:stage])  # blocks before this stage
        if m[2]:  # embeddings: right after the previous stage's last block
            return first_block + 1 if stage else 0
        if m[3] is not None:
            return first_block + int(m[3]) + 1
        return first_block + depths[stage]  # the output norm: with the stage's last block

    def position_grids(self) -> dict[str, tuple[int, HW, str]]:
        """v1's position embeddings, one per stage: one learned on a square grid of another
        size is resized to the stage's pre-training grid."""
        return {f'stages.{i}.pos_embed': (0, stage.pos_grid, 'bilinear')
                for i, stage in enumerate(self.stages) if stage.pos_embed is not None}

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns the maps of ``out_indices``: ``(B, out_channels[k], H / s_k, W / s_k)``."""
        self.check_input(x)
        x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x, self.recompute)
            if i in self.out_indices:
                outs.append(x)
        return nchw_maps(outs)


def _image_size(size: int | Sequence[int], name: str) -> HW:
    """``pretrain_img_size`` as ``(H, W)``; ValueError for anything but an int or two ints."""
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, Sequence) else ()
    if len(pair) != 2 or not all(isinstance(s, int) and s >= 32 for s in pair):
        raise ValueError(f'{name}: pretrain_img_size must be an int or (H, W), each at least 32, '
                         f'got {size!r}')
    return pair


def _init_weights(m: nn.Module) -> None:
    """The authors' initialisation: truncated normal linears, fan-out normal convs."""
    if init_linear_and_norm(m):
        return
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, PVTStage) and m.pos_embed is not None:
        nn.init.trunc_normal_(m.pos_embed, std=.02)


@register_model
class PVT(PyramidVisionTransformerBase):
    """PVT v1: non-overlapping patch embeddings and learned absolute position embeddings.

    ``arch``: tiny, small, medium, large, or a dict (see the base class).
    """

    patch_sizes = (4, 2, 2, 2)
    patch_paddings = (0, 0, 0, 0)
    use_pos_embed = True

    def __init__(self, arch: str | Mapping[str, Any] = 'small', **kwargs: Any) -> None:
        super().__init__(arch, **kwargs)


@register_model
class PVTv2(PyramidVisionTransformerBase):
    """PVTv2: overlapping patch embeddings, depthwise-conv MLPs, optional linear attention.

    ``arch``: b0, b1, b2, b2_li, b3, b4, b5, or a dict (see the base class).
    """

    patch_sizes = (7, 3, 3, 3)
    patch_paddings = (3, 1, 1, 1)
    dwconv = True
    out_norm = True

    def __init__(self, arch: str | Mapping[str, Any] = 'b2', **kwargs: Any) -> None:
        super().__init__(arch, **kwargs)


# -- checkpoint conversion -------------------------------------------------------------------
# mmpvt's layout: stages.{i}.patch_embed.{proj,norm}, stages.{i}.pos_embed (v1),
# stages.{i}.blocks.{j}.{norm1,attn.{q,kv,proj,sr,norm},norm2,mlp.{fc1,dwconv,fc2}},
# stages.{i}.norm (v2).

# Keys of classification models that a dense-prediction backbone has no use for.
CLASSIFICATION_KEYS = re.compile(r'^(head\.|head_drop\.|cls_token$|norm\.)')
# PVT's attention projects queries apart from keys and values (attn.q, attn.kv) in the authors'
# release, timm and mmpvt: the mark of its state dicts. mmdet packs them (its own layout mark).
_SEPARATE_Q = re.compile(r'(^|\.)attn\.q\.weight$')
_MMDET_PATCH_EMBED = re.compile(r'layers\.\d+\.0\.projection\.')


def _from_official(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    if m := re.match(r'pos_embed(\d)$', key):
        tokens = value.shape[1]
        # The last stage's embedding carries a slot for the class token in front.
        if math.isqrt(tokens - 1) ** 2 == tokens - 1 and math.isqrt(tokens) ** 2 != tokens:
            value = value[:, 1:]
        return f'stages.{int(m[1]) - 1}.pos_embed', value
    if m := re.match(r'patch_embed(\d)\.(.*)', key):
        return f'stages.{int(m[1]) - 1}.patch_embed.{m[2]}', value
    if m := re.match(r'block(\d)\.(\d+)\.(.*)', key):
        return f'stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3].replace("dwconv.dwconv.", "dwconv.")}', value
    if m := re.match(r'norm(\d)\.(.*)', key):
        return f'stages.{int(m[1]) - 1}.norm.{m[2]}', value
    return key, value


def _from_timm(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    if key.startswith('patch_embed.'):
        return 'stages.0.' + key, value
    return re.sub(r'^stages\.(\d+)\.downsample\.', r'stages.\1.patch_embed.', key), value


_MMDET_BLOCK_RENAMES = (('attn.attn.out_proj.', 'attn.proj.'), ('ffn.layers.0.', 'mlp.fc1.'))


def _from_mmdet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    v1 = any(re.match(r'layers\.\d+\.1\.0\.pos_embed$', k) for k in state_dict)
    dwconv = any(re.match(r'layers\.\d+\.1\.\d+\.ffn\.layers\.4\.', k) for k in state_dict)
    fc2 = 'ffn.layers.4.' if dwconv else 'ffn.layers.3.'
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r'layers\.(\d+)\.0\.(projection|norm)\.(.*)', key):
            part = 'proj' if m[2] == 'projection' else 'norm'
            out[f'stages.{m[1]}.patch_embed.{part}.{m[3]}'] = value
        elif m := re.match(r'layers\.(\d+)\.1\.0\.pos_embed$', key):
            out[f'stages.{m[1]}.pos_embed'] = value
        elif m := re.match(r'layers\.(\d+)\.1\.(\d+)\.(.*)', key):
            prefix, rest = f'stages.{m[1]}.blocks.{int(m[2]) - v1}.', m[3]
            if pm := re.match(r'attn\.attn\.in_proj_(weight|bias)$', rest):
                # mmcv's MultiheadAttention packs q, k, v; PVT keeps q apart from kv.
                dims = value.shape[0] // 3
                out[prefix + f'attn.q.{pm[1]}'] = value[:dims]
                out[prefix + f'attn.kv.{pm[1]}'] = value[dims:]
                continue
            for old, new in _MMDET_BLOCK_RENAMES + ((fc2, 'mlp.fc2.'), ('ffn.layers.1.', 'mlp.dwconv.')):
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            if rest.startswith(('mlp.fc1.weight', 'mlp.fc2.weight')):
                value = value.flatten(1)  # 1x1 convolutions to linear weights
            out[prefix + rest] = value
        elif m := re.match(r'layers\.(\d+)\.2\.(.*)', key):
            out[f'stages.{m[1]}.norm.{m[2]}'] = value
        else:
            out[key] = value
    return out


class PVTCheckpointFormat(CheckpointFormat):
    """PVT and PVTv2 checkpoints: the authors' release files (``patch_embed1.``, ``block1.0.``),
    timm's pvt_v2 (``patch_embed.``, ``stages.{i}.downsample.``), mmdet 3.x's built-in
    ``PyramidVisionTransformer(V2)`` (``layers.{i}.{0,1,2}``) and mmpvt's own, also inside
    whole detector checkpoints. Dropped: classification entries (head, class token, final norm)."""

    family = 'pvt'

    def _detect(self, inside: Mapping[str, Any], outside: Mapping[str, Any]) -> str:
        keys = list(inside)
        if any(_MMDET_PATCH_EMBED.match(k) for k in keys):
            return 'mmdet'
        if any(_SEPARATE_Q.search(k) for k in keys):
            if any(re.match(r'(patch_embed|block)\d\.', k) for k in keys):
                return 'official'
            if any(re.match(r'stages\.\d+\.patch_embed\.', k) for k in keys):
                return 'mmpvt'
            if any(k.startswith('patch_embed.') or '.downsample.' in k for k in keys):
                return 'timm'
        raise ValueError('not a PVT state dict in any known layout (the authors\' release, timm, '
                         f'mmdet, mmpvt); first keys: {keys[:5]}')

    def _drops(self, key: str, layout: str) -> bool:
        return bool(CLASSIFICATION_KEYS.match(key))

    def _convert(self, state: dict[str, Any], layout: str) -> dict[str, torch.Tensor]:
        if layout == 'official':
            return dict(_from_official(k, v) for k, v in state.items())
        if layout == 'timm':
            return dict(_from_timm(k, v) for k, v in state.items())
        if layout == 'mmdet':
            return _from_mmdet(state)
        return state


# -- variants --------------------------------------------------------------------------------
# What every variant (and an arch dict) has unless it says otherwise: no linear attention;
# stochastic depth 0.1, the papers' for detection and segmentation.
PVT_DEFAULTS: dict[str, Any] = dict(linear=False, drop_path_rate=0.1)
_SHARED = dict(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1))
_WIDE = dict(_SHARED, embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4))
# The authors' ImageNet releases (``pretrained``: what the zoo's configs load).
_RELEASES = 'https://github.com/whai362/PVT/releases/download/v2/'

PVT_ARCHS: dict[str, dict[str, Any]] = {
    'tiny': dict(_WIDE, depths=(2, 2, 2, 2), pretrained=_RELEASES + 'pvt_tiny.pth'),
    'small': dict(_WIDE, depths=(3, 4, 6, 3), pretrained=_RELEASES + 'pvt_small.pth'),
    'medium': dict(_WIDE, depths=(3, 4, 18, 3), pretrained=_RELEASES + 'pvt_medium.pth'),
    'large': dict(_WIDE, depths=(3, 8, 27, 3), pretrained=_RELEASES + 'pvt_large.pth'),
}

PVTV2_ARCHS: dict[str, dict[str, Any]] = {
    'b0': dict(_SHARED, embed_dims=(32, 64, 160, 256), mlp_ratios=(8, 8, 4, 4), depths=(2, 2, 2, 2)),
    'b1': dict(_WIDE, depths=(2, 2, 2, 2)),
    'b2': dict(_WIDE, depths=(3, 4, 6, 3)),
    'b2_li': dict(_WIDE, depths=(3, 4, 6, 3), linear=True),
    'b3': dict(_WIDE, depths=(3, 4, 18, 3)),
    'b4': dict(_WIDE, depths=(3, 8, 27, 3)),
    'b5': dict(_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}
for _name, _variant in PVTV2_ARCHS.items():
    _variant['pretrained'] = f'{_RELEASES}pvt_v2_{_name}.pth'

PVT.arch_zoo = PVT_ARCHS
PVTv2.arch_zoo = PVTV2_ARCHS
PyramidVisionTransformerBase.checkpoint_format = PVTCheckpointFormat()
