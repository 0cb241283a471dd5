"""The MViT family, MViTv2 and the original MViT (v1): multiscale transformers with pooling
attention, as dense-prediction backbones.

Paper: "MViTv2: Improved Multiscale Vision Transformers for Classification and Detection"
(Li, Wu, Fan, Mangalam, Xiong, Malik, Feichtenhofer; CVPR 2022). The blocks are the
official release's (and timm's): a 7x7/4 patch embedding, pooling attention in every block
(a 3x3 depthwise convolution per head, shared by the heads, then LayerNorm, on q, k and v),
residual pooling and decomposed relative positions. The detection design is detectron2's
``MViT``: window attention in most blocks, global attention with a doubled kv stride at the
end of stages 2 and 3, relative-position tables kept at their 224 shapes and resized on every
forward, and a new LayerNorm per output level applied to a copy of the trunk.

MViT v1 ("Multiscale Vision Transformers", Fan et al., ICCV 2021; PySlowFast's modules) uses
the same pooling attention, blocks and stage rules; it differs by data: a class token and an
absolute position table, q pooled only at stage starts, the width growing in the MLP, no
relative positions and no residual pooling. Its blocks run on a token sequence led by the class
token (``forward_tokens``), MViTv2's on a token map.

The file reads bottom-up: the layers specific to the family, the block, the stage rules (which
block pools by how much, where windows shrink and attention goes global), the two backbones,
checkpoint conversion, then the tables of variants. Windows and relative positions are in
``attention.py``, the MLP in ``layers.py``.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import CheckpointFormat
from ..registry import register_model
from .attention import rel_pos_attention, rel_pos_lookup, window_partition, window_unpartition
from .base import DenseBackbone
from .layers import (
    HW,
    DropPath,
    Mlp,
    PatchEmbed,
    abs_pos_embed_to_grid,
    exporting,
    init_linear_and_norm,
    nchw_maps,
)

# LayerNorm eps of every MViTv2 release and of detectron2's MViT configs.
NORM_EPS = 1e-6
# The token grid of a 224 input after the stride-4 patch embedding: every release sizes its
# relative-position tables from it, and detectron2 keeps those shapes (resizing at run time).
PRETRAIN_GRID = 56
# The kv pooling stride of stage 1; halved (down to 1) at each stage's first block.
ADAPTIVE_KV_STRIDE = 4
NUM_STAGES = 4


# -- layers ----------------------------------------------------------------------------------
class HeadSharedPool(nn.Conv2d):
    """MViTv2's attention pooling: a 3x3 depthwise convolution (padding 1, no bias) over one
    head's channels, the same weights for every head.

    The weights have the releases' shape ``(head_dims, 1, 3, 3)``; :meth:`pool_heads`
    applies them to all heads of a map at once.
    """

    def __init__(self, head_dims: int, stride: int) -> None:
        super().__init__(head_dims, head_dims, kernel_size=3, stride=stride, padding=1, groups=head_dims,
                         bias=False)

    def pool_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Pools a ``(B, H, W, heads * head_dims)`` map, returns ``(B, H', W', heads, head_dims)``
        with ``H' = ceil(H / stride)``.

        The weights repeated over the heads, one depthwise convolution of the whole map equals
        the releases' per-head convolutions, without folding the heads into the batch. A
        contiguous map is a channels-last NCHW tensor, which the convolution reads in place.
        """
        heads = x.shape[-1] // self.in_channels
        out = F.conv2d(x.permute(0, 3, 1, 2), self.weight.repeat(heads, 1, 1, 1), None, self.stride,
                       self.padding, 1, x.shape[-1])
        return out.permute(0, 2, 3, 1).unflatten(-1, (heads, -1))


def max_pool_tokens(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The skip path of a q-stride block: max-pool ``(B, H, W, C)`` over ``stride + 1`` squares."""
    kernel = stride + 1
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel, stride, kernel // 2).permute(0, 2, 3, 1)


class PoolingAttention(nn.Module):
    """Multi-head pooling attention over a ``(B, H, W, dims)`` map, windowed or global.

    q is pooled with ``q_stride`` (the output's grid), k and v with ``kv_stride``, each then
    normalised per head; with ``window_size > 0`` the pooled maps are cut into windows of
    ``window_size // stride`` tokens (zero padding, no mask), otherwise all queries attend to
    all keys. The logits gain the decomposed relative-position term of the pooled, un-scaled
    q; the pooled q is added to the attention output (residual pooling) before the
    projection. Runs on ``scaled_dot_product_attention`` with the relative-position term as
    its additive mask.

    Args:
        dims: channels of the input map.
        out_dims: channels of q, k, v and of the output (the width changes here in the
            first block of a stage).
        num_heads: attention heads; must divide ``out_dims``.
        q_stride, kv_stride: pooling strides of q and of k, v.
        window_size: side of the windows before pooling, 0 for global attention; must be a
            multiple of both strides.
        rel_pos_rows: rows of the relative-position tables (resized when a window or map
            needs another number); 0 for none (MViT v1).
        pool_q: whether q is pooled and normalised; MViT v1 does so only where ``q_stride``
            is 2, MViTv2 in every block.
        residual_pooling: add the pooled q to the attention output (MViTv2), or not (v1).

    :meth:`forward` runs on a token map: MViTv2's attention, and v1's in its window design
    (no pooling of q outside the q-stride blocks, no tables, no residual pooling);
    :meth:`forward_tokens` is v1's global attention, on a token sequence led by a class token.
    """

    def __init__(self, dims: int, out_dims: int, num_heads: int, q_stride: int, kv_stride: int,
                 window_size: int, rel_pos_rows: int, pool_q: bool = True,
                 residual_pooling: bool = True) -> None:
        super().__init__()
        if not pool_q and q_stride != 1:
            raise ValueError(f'a block that pools q by {q_stride} needs its q pooling (pool_q=True)')
        if out_dims % num_heads:
            raise ValueError(f'num_heads ({num_heads}) must divide the attention width ({out_dims})')
        if window_size % q_stride or window_size % kv_stride:
            raise ValueError(f'window_size {window_size} must be a multiple of the q stride ({q_stride}) '
                             f'and of the kv stride ({kv_stride})')
        head_dims = out_dims // num_heads
        self.num_heads = num_heads
        self.q_stride, self.kv_stride = q_stride, kv_stride
        self.window_size = window_size
        self.qkv = nn.Linear(dims, 3 * out_dims)
        self.proj = nn.Linear(out_dims, out_dims)
        # MViT v1 pools q only where it strides (the official modules have no pool_q elsewhere).
        self.pool_q = HeadSharedPool(head_dims, q_stride) if pool_q else None
        self.norm_q = nn.LayerNorm(head_dims, eps=NORM_EPS) if pool_q else None
        self.pool_k = HeadSharedPool(head_dims, kv_stride)
        self.norm_k = nn.LayerNorm(head_dims, eps=NORM_EPS)
        self.pool_v = HeadSharedPool(head_dims, kv_stride)
        self.norm_v = nn.LayerNorm(head_dims, eps=NORM_EPS)
        self.residual_pooling = residual_pooling
        if rel_pos_rows:
            # Zero start, as detectron2's: every release carries trained tables.
            self.rel_pos_h = nn.Parameter(torch.zeros(rel_pos_rows, head_dims))
            self.rel_pos_w = nn.Parameter(torch.zeros(rel_pos_rows, head_dims))
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # q, k and v come from three products with the thirds of the qkv weights: each part is
        # then its own contiguous map, which its pooling and per-head norm read without the
        # copies that slices of one product cost (and, in training, without their backward).
        parts = zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3), (self.pool_q, self.pool_k, self.pool_v),
                    (self.norm_q, self.norm_k, self.norm_v))
        q, k, v = (F.linear(x, w, b).unflatten(-1, (self.num_heads, -1)) if pool is None
                   else norm(pool.pool_heads(F.linear(x, w, b))) for w, b, pool, norm in parts)
        if self.window_size:
            windowed = self._exported_windowed_attention if exporting() else self._windowed_attention
            out = windowed(q, k, v)
        else:
            (q_h, q_w), (k_h, k_w) = q.shape[1:3], k.shape[1:3]
            # (B, heads, tokens, head_dims) views of the maps
            out = self._attend(*(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)),
                               *self._rel_pos_lookups((q_h, q_w), (k_h, k_w)))
            out = out.transpose(1, 2).unflatten(1, (q_h, q_w))  # a view, whatever the layout
        return self.proj((out + q if self.residual_pooling else out).flatten(-2))

    def _rel_pos_lookups(self, q_hw: HW, k_hw: HW) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The embeddings of every query/key distance along each axis; None without tables."""
        if self.rel_pos_h is None:
            return None, None
        return (rel_pos_lookup(q_hw[0], k_hw[0], self.rel_pos_h),
                rel_pos_lookup(q_hw[1], k_hw[1], self.rel_pos_w))

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, R_h: torch.Tensor | None,
                R_w: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``(N, heads, tokens, head_dims)`` operands, with the relative-position
        term where the block has tables (MViT v1's windows have none: plain fused attention)."""
        if R_h is None:
            return F.scaled_dot_product_attention(q, k, v)
        return rel_pos_attention(q, k, v, R_h, R_w)

    def forward_tokens(self, x: torch.Tensor, hw: HW) -> tuple[torch.Tensor, HW]:
        """MViT v1's attention over ``(B, 1 + H * W, dims)`` tokens, the class token first.

        Each of q, k and v is pooled on its ``(H, W)`` grid while the class token bypasses
        the convolution; the class token is then put back in front and normalised with the
        pooled tokens (one LayerNorm over all of them), as the official modules do. q without
        pooling (``pool_q`` False) is neither pooled nor normalised. All queries attend to all
        keys through the fused kernel, which never holds the ``Nq x Nk`` logits. No relative
        positions, no residual pooling. Returns ``(B, 1 + H' * W', out_dims)`` and ``(H', W')``.
        """
        if self.rel_pos_h is not None or self.residual_pooling or self.window_size:
            raise NotImplementedError('forward_tokens is MViT v1\'s global attention: no relative '
                                      'positions, residual pooling or windows')
        heads, out_hw = self.num_heads, tuple(hw)
        parts = []
        pools, norms = (self.pool_q, self.pool_k, self.pool_v), (self.norm_q, self.norm_k, self.norm_v)
        for w, b, pool, norm in zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3), pools, norms):
            t = F.linear(x, w, b)
            if pool is None:
                t = t.unflatten(-1, (heads, -1))
            else:
                # Split, not sliced: in training a split's backward is one concatenation, where
                # each slice's is a zero-filled copy of the whole sequence.
                cls, grid = t.split([1, t.shape[1] - 1], dim=1)
                pooled = pool.pool_heads(grid.unflatten(1, hw))  # (B, H', W', heads, head_dims)
                if pool is self.pool_q:
                    out_hw = tuple(pooled.shape[1:3])
                t = norm(torch.cat([cls.unflatten(-1, (heads, -1)), pooled.flatten(1, 2)], dim=1))
            parts.append(t.transpose(1, 2))  # (B, heads, tokens, head_dims)
        out = F.scaled_dot_product_attention(*parts)
        return self.proj(out.transpose(1, 2).flatten(2)), out_hw

    def _windowed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention inside windows for ``(B, H, W, heads, head_dims)`` pooled maps; returns q's shape.

        Keys and values are cut into zero-padded windows, as detectron2 trained them (padded
        keys still take part in every softmax). The queries of the padding are not computed:
        detectron2 computes and then drops them, and at 512x512 they are 42% of the windows'
        queries. The windows are attended in up to four groups of one query extent (full
        windows, the last column, the last row, the corner), each written straight into its
        region of the output.
        """
        B, H, W, heads, head_dims = q.shape
        q_win, kv_win = self.window_size // self.q_stride, self.window_size // self.kv_stride
        k, padded_hw = window_partition(k.flatten(-2), kv_win)
        v, _ = window_partition(v.flatten(-2), kv_win)
        grid = (B, padded_hw[0] // kv_win, padded_hw[1] // kv_win, kv_win * kv_win, heads, head_dims)
        k, v = k.reshape(grid), v.reshape(grid)
        R_h, R_w = self._rel_pos_lookups((q_win, q_win), (kv_win, kv_win))
        rows, cols = _window_spans(H, q_win), _window_spans(W, q_win)
        q_tiles = _tiles(q, [n * extent for n, extent in rows], [n * extent for n, extent in cols])
        k_tiles, v_tiles = (_tiles(t, [n for n, _ in rows], [n for n, _ in cols]) for t in (k, v))
        out = q.new_empty(q.shape)
        for i, j in itertools.product(range(len(rows)), range(len(cols))):
            (n_r, h), (n_c, w) = rows[i], cols[j]
            r0, c0 = i * rows[0][0] * q_win, j * cols[0][0] * q_win  # the tile's corner in the map
            # (windows, heads, h * w, head_dims) in one copy, heads-major as the products read it
            q_g = q_tiles[i][j].unflatten(1, (n_r, h)).unflatten(3, (n_c, w)).permute(0, 1, 3, 5, 2, 4, 6)
            q_g = q_g.reshape(-1, heads, h * w, head_dims)
            k_g, v_g = (t[i][j].reshape(-1, kv_win * kv_win, heads, head_dims).transpose(1, 2)
                        for t in (k_tiles, v_tiles))
            out_g = self._attend(q_g, k_g, v_g, *((None, None) if R_h is None else (R_h[:h], R_w[:w])))
            # (B, n_r, h, n_c, w, heads, head_dims) views, whatever the layout
            out_g = out_g.unflatten(0, (B, n_r, n_c)).unflatten(4, (h, w)).permute(0, 1, 4, 2, 5, 3, 6)
            # written in place (a slice: a split's views may not be written under autograd)
            out[:, r0:r0 + n_r * h, c0:c0 + n_c * w].view(out_g.shape).copy_(out_g)
        return out


    def _exported_windowed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:meth:`_windowed_attention` as detectron2 computes it, for an exported model: q is
        cut into zero-padded windows too, and the padding's queries are computed and dropped.
        The same windows, keys and outputs, in operations that hold for every input size (the
        grouping by query extent is a loop over sizes)."""
        B, H, W, heads, head_dims = q.shape
        q_win, kv_win = self.window_size // self.q_stride, self.window_size // self.kv_stride
        (q, padded_hw), (k, _), (v, _) = (window_partition(t.flatten(-2), win)
                                          for t, win in ((q, q_win), (k, kv_win), (v, kv_win)))
        # (windows, heads, tokens, head_dims) views; every map has the same windows, row-major
        q, k, v = (t.flatten(1, 2).unflatten(-1, (heads, head_dims)).transpose(1, 2) for t in (q, k, v))
        out = self._attend(q, k, v, *self._rel_pos_lookups((q_win, q_win), (kv_win, kv_win)))
        out = out.transpose(1, 2).clone(memory_format=torch.contiguous_format)
        out = out.view(-1, q_win, q_win, heads * head_dims)
        return window_unpartition(out, q_win, padded_hw, (H, W)).unflatten(-1, (heads, head_dims))


def _window_spans(size: int, window: int) -> list[tuple[int, int]]:
    """The windows along a side of ``size`` tokens as ``(count, extent)`` runs: the full
    windows, then the last one, cut to ``size % window`` tokens, if any."""
    spans = [(size // window, window)] if size >= window else []
    if size % window:
        spans.append((1, size % window))
    return spans


def _tiles(x: torch.Tensor, row_sizes: Sequence[int], col_sizes: Sequence[int]) -> list[list[torch.Tensor]]:
    """Views of ``x`` cut into ``row_sizes`` along dim 1 and ``col_sizes`` along dim 2.

    Split, not sliced: in training the backward of a split is one concatenation, where each
    slice's is a zero-filled copy of the whole map.
    """
    return [row.split(list(col_sizes), dim=2) for row in x.split(list(row_sizes), dim=1)]


# -- block -----------------------------------------------------------------------------------
class MultiScaleBlock(nn.Module):
    """A pre-norm MViTv2 block on a ``(B, H, W, C)`` map.

    ``x -> skip(x) + attn(norm1(x))`` then ``x -> skip'(x) + mlp(norm2(x))``. Where the width
    changes, the skip is a Linear (``proj``) on the *normalised* input, as in the releases:
    on ``norm1``'s output when the attention widens (``widen_in_attention``, every released
    model but MViTv2-L IN-1k), on ``norm2``'s when the MLP does. A q-stride block max-pools
    its skip path (kernel ``stride + 1``, padding 1).

    :meth:`forward` runs MViTv2's block on a map; :meth:`forward_tokens` runs MViT v1's on a
    token sequence led by a class token (the same layers, v1's attention).

    Args:
        dims: channels of the input map.
        out_dims: channels of the output map.
        num_heads, q_stride, kv_stride, window_size, rel_pos_rows, pool_q, residual_pooling:
            the attention's settings (:class:`PoolingAttention`).
        widen_in_attention: where a width change happens (see above).
        mlp_ratio: hidden width of the MLP relative to its input.
        drop_path: stochastic-depth rate of both residual branches.
    """

    def __init__(self, dims: int, out_dims: int, num_heads: int, q_stride: int, kv_stride: int,
                 window_size: int, rel_pos_rows: int, widen_in_attention: bool = True,
                 mlp_ratio: float = 4., drop_path: float = 0., pool_q: bool = True,
                 residual_pooling: bool = True) -> None:
        super().__init__()
        attn_dims = out_dims if widen_in_attention else dims
        self.q_stride = q_stride
        self.widen_in_attention = widen_in_attention
        self.norm1 = nn.LayerNorm(dims, eps=NORM_EPS)
        self.attn = PoolingAttention(dims, attn_dims, num_heads, q_stride, kv_stride, window_size,
                                     rel_pos_rows, pool_q, residual_pooling)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(attn_dims, eps=NORM_EPS)
        self.mlp = Mlp(attn_dims, int(attn_dims * mlp_ratio), out_dims=out_dims)
        self.proj = nn.Linear(dims, out_dims) if dims != out_dims else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output map and the block's map at its attention width.

        The second is the output itself, except in a block that widens in its MLP, where it
        is the map after the attention (the last one at the stage's width).
        """
        x_norm = self.norm1(x)
        attended = self.attn(x_norm)
        if self.proj is not None and self.widen_in_attention:
            x = self.proj(x_norm)
        if self.q_stride > 1:
            x = max_pool_tokens(x, self.q_stride)
        x = x + self.drop_path(attended)
        x_norm = self.norm2(x)
        if self.proj is not None and not self.widen_in_attention:
            return self.proj(x_norm) + self.drop_path(self.mlp(x_norm)), x
        x = x + self.drop_path(self.mlp(x_norm))
        return x, x

    def forward_tokens(self, x: torch.Tensor, hw: HW) -> tuple[torch.Tensor, HW]:
        """MViT v1's block on ``(B, 1 + H * W, C)`` tokens, the class token first.

        The same residual rules as :meth:`forward`; the skip path's max-pooling runs on the
        grid while the class token bypasses it, and stochastic depth drops a sample's class
        token with its grid, as the official block (one tensor) does. Returns the output
        tokens and their grid.
        """
        x_norm = self.norm1(x)
        attended, out_hw = self.attn.forward_tokens(x_norm, hw)
        if self.proj is not None and self.widen_in_attention:
            x = self.proj(x_norm)
        if self.q_stride > 1:
            cls, grid = x.split([1, x.shape[1] - 1], dim=1)
            x = torch.cat([cls, max_pool_tokens(grid.unflatten(1, hw), self.q_stride).flatten(1, 2)], dim=1)
        x = x + self.drop_path(attended)
        x_norm = self.norm2(x)
        shortcut = self.proj(x_norm) if self.proj is not None and not self.widen_in_attention else x
        return shortcut + self.drop_path(self.mlp(x_norm)), out_hw


# -- stage rules -----------------------------------------------------------------------------
class BlockSpec(NamedTuple):
    """Where one block sits and what it does, by MViTv2's and detectron2's stage rules."""
    stage: int  # 0-based; the last block of stage s gives level s (stride 4 * 2**s)
    dims: int  # input channels
    out_dims: int  # output channels
    num_heads: int
    q_stride: int
    kv_stride: int
    window_size: int  # window side before pooling; 0 for global attention
    rel_pos_rows: int  # rows of the relative-position tables, sized from the 224 grid; 0 for none
    widen_in_attention: bool
    pool_q: bool  # q pooled (and normalised) in this block
    residual_pooling: bool


def mvit_block_specs(arch: Mapping[str, Any], window_size: int = 56,
                     global_kv_stride_x2: bool = True) -> list[BlockSpec]:
    """Every block's settings for a resolved arch (``embed_dims``, ``depths``, ``num_heads``,
    ``dim_mul_in_attention`` per stage), following detectron2's ``MViT`` constructor.

    - q stride 2 in the first block of stages 2-4, 1 elsewhere;
    - kv stride 4 in stage 1, halved (down to 1) at each q-stride block: 4/2/1/1;
    - windows of ``window_size`` tokens in stage 1, halved after the first block of each
      later stage (so that block, which pools q by 2, still sees the previous stage's
      windows); the last block of stages 2, 3 and 4 attends globally, and with
      ``global_kv_stride_x2`` those of stages 2 and 3 pool k and v twice as much;
    - relative-position tables of ``2 * max(grid // q_stride, grid // kv_stride) - 1`` rows
      for the block's grid at a 224 input (111, 55, 27, 13 rows in the released models);
    - the width changes in the first block of a stage's attention, or (``dim_mul_in_attention``
      False, MViTv2-L IN-1k and MViT v1) in the last block of the previous stage's MLP; heads
      change with the stage either way;
    - the design switches, from the arch: ``pool_q_every_block`` (MViTv2; v1 pools q only in
      the q-stride blocks), ``rel_pos`` (MViTv2's tables; v1 has none) and ``residual_pooling``.
    """
    dims, depths, heads = arch['embed_dims'], arch['depths'], arch['num_heads']
    in_attention = arch.get('dim_mul_in_attention', True)
    pool_q_everywhere, rel_pos = arch.get('pool_q_every_block', True), arch.get('rel_pos', True)
    residual_pooling = arch.get('residual_pooling', True)
    kv_stride, window, grid = ADAPTIVE_KV_STRIDE, window_size, PRETRAIN_GRID
    specs = []
    for stage, depth in enumerate(depths):
        for j in range(depth):
            first = stage > 0 and j == 0
            last = j == depth - 1
            if first:
                kv_stride = max(kv_stride // 2, 1)
            q_stride = 2 if first else 1
            is_global = last and stage > 0
            block_kv = kv_stride * 2 if is_global and global_kv_stride_x2 and stage in (1, 2) else kv_stride
            if in_attention:
                block_dims, block_out = (dims[stage - 1] if first else dims[stage]), dims[stage]
            else:
                block_dims = dims[stage]
                block_out = dims[stage + 1] if last and stage < len(depths) - 1 else dims[stage]
            specs.append(BlockSpec(
                stage, block_dims, block_out, heads[stage], q_stride, block_kv, 0 if is_global else window,
                2 * max(grid // q_stride, grid // block_kv) - 1 if rel_pos else 0, in_attention,
                pool_q_everywhere or q_stride > 1, residual_pooling))
            if first:
                window //= 2
                grid //= 2
    return specs


def block_of(spec: BlockSpec, mlp_ratio: float, drop_path: float) -> MultiScaleBlock:
    """The block a spec describes."""
    return MultiScaleBlock(spec.dims, spec.out_dims, spec.num_heads, spec.q_stride, spec.kv_stride,
                           spec.window_size, spec.rel_pos_rows, spec.widen_in_attention, mlp_ratio, drop_path,
                           spec.pool_q, spec.residual_pooling)


def run_map_blocks(blocks: Sequence[MultiScaleBlock], x: torch.Tensor, norms: Mapping[int, nn.Module],
                   recompute: bool, level_is_output: bool) -> tuple[torch.Tensor, ...]:
    """Runs ``blocks`` on a ``(B, H, W, C)`` map up to the last block that ``norms`` names
    (block index -> the norm of the level taken there) and returns those levels, normalised,
    as contiguous NCHW maps.

    A level is the block's output (``level_is_output``, MViT v1), or the block's map at its
    attention width (MViTv2: the same map, except where a block widens in its MLP, in
    MViTv2-L IN-1k). ``recompute`` runs each block under activation checkpointing.
    """
    outs = []
    for i, block in enumerate(blocks[:max(norms) + 1]):
        x, attention_map = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        if i in norms:
            outs.append(norms[i](x if level_is_output else attention_map).permute(0, 3, 1, 2))
    return nchw_maps(outs)


# -- backbones -------------------------------------------------------------------------------
def _check_stage_lists(family: str, settings: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``settings`` with its per-stage lists as tuples; raises ValueError unless each of ``keys``
    is one positive int per stage and the heads divide the widths."""
    for key in keys:
        value = settings[key]
        if not (isinstance(value, Sequence) and len(value) == NUM_STAGES
                and all(isinstance(v, int) and v > 0 for v in value)):
            raise ValueError(f'{family}: arch {key} must be {NUM_STAGES} positive integers, one per stage; '
                             f'got {value!r}')
        settings[key] = tuple(value)
    bad = [s for s, (d, h) in enumerate(zip(settings['embed_dims'], settings['num_heads'])) if d % h]
    if bad:
        raise ValueError(f'{family}: num_heads must divide embed_dims in every stage; stage(s) {bad} of '
                         f'embed_dims={settings["embed_dims"]}, num_heads={settings["num_heads"]} do not')
    return settings


def _checked_window_size(family: str, window_size: Any) -> int:
    """``window_size``, or ValueError unless it is 0 (global attention) or a positive multiple of 8."""
    if not isinstance(window_size, int) or window_size < 0 or window_size % 8:
        raise ValueError(f'{family}: window_size must be 0 (global attention) or a positive multiple of 8 '
                         f'(stage 4 windows are window_size / 8 tokens), got {window_size!r}')
    return window_size


def _out_norm_name(level: int) -> str:
    """detectron2's name of the output norm of level ``level`` (scale2_norm for stride 4)."""
    return f'scale{level + 2}_norm'


_OUT_NORM_KEY = re.compile(r'^scale([2-5])_norm\.')


@register_model
class MViTv2(DenseBackbone):
    """MViTv2 with detectron2's detection design: maps at strides 4, 8, 16, 32.

    Level ``s`` is the last block of stage ``s`` through its own new LayerNorm (eps 1e-6),
    applied to a copy: the next stage continues from the un-normalised map. For the
    MLP-widening design (``large_in1k``), whose last block of a stage already widens to the
    next stage's channels, level ``s`` is that block's map after its attention, the last one
    at stage ``s``'s width; the last level is the last block's output as usual. No class
    token and no absolute position embedding. Any input of at least 32x32 runs: the maps
    have ``ceil(H / stride) x ceil(W / stride)`` tokens, exactly ``H / stride`` for inputs
    padded to ``size_divisor`` (32).

    Args:
        arch: tiny, small, base, large (ImageNet-21k design, width change in attention,
            what detectron2 uses), large_in1k (ImageNet-1k design: width change in the
            previous block's MLP), huge; or a dict with per-stage ``embed_dims``,
            ``depths``, ``num_heads`` and optionally what ``MVIT_DEFAULTS`` holds
            (``mlp_ratio``, ``dim_mul_in_attention``, ``drop_path_rate``, ``window_size``). The stage
            boundaries place the q-stride blocks, kv strides, window halving and global
            blocks (see :func:`mvit_block_specs`).
        in_channels: channels of the input image.
        out_indices: levels to return, 0-based (strides 4, 8, 16, 32). Only their output
            norms are built, and the blocks after the deepest one do not run.
        drop_path_rate: stochastic depth of the last block, growing linearly from 0 over all
            blocks; None takes the variant's (detectron2's COCO value: 0.2 for T and S, 0.4
            for B, 0.5 for L, 0.6 for H).
        window_size: window side in stage 1, halved per stage; 0 makes every block global;
            None takes the variant's (56, detectron2's). Must be a multiple of 8 (the
            smallest windows are window_size / 8).
        global_kv_stride_x2: double the kv stride of the global blocks of stages 2 and 3, as
            detectron2 does. Off, with ``window_size=0``, the features are the
            classification model's.
        frozen_stages: 0 or -1 freeze nothing; ``k`` in 1..4 freezes the patch embedding and
            the blocks of the first ``k`` stages. The output norms are new layers and are
            never frozen.
        norm_eval, with_cp, check_finite, init_cfg: see ``DenseBackbone``. ``with_cp``
            recomputes each block in the backward pass. ``init_cfg`` loads the official
            ``.pyth`` releases, timm ``mvitv2_*``, detectron2 MViT detectors (.pth and .pkl),
            mmpretrain ``MViT`` and mmpvt checkpoints.
    """

    required_arch_keys = ('embed_dims', 'depths', 'num_heads')
    level_strides = (4, 8, 16, 32)
    # A classification checkpoint (the releases, timm, mmpretrain) has none of the output
    # norms, which detectron2 adds.
    optional_groups = {'output norms': tuple(f'{_out_norm_name(level)}.' for level in range(NUM_STAGES))}
    rel_pos_tables = ('attn.rel_pos_h', 'attn.rel_pos_w')
    unbuilt_parts = 'output norms'

    def __init__(self, arch: str | Mapping[str, Any] = 'base', in_channels: int = 3,
                 out_indices: int | Sequence[int] = (0, 1, 2, 3), drop_path_rate: float | None = None,
                 window_size: int | None = None, global_kv_stride_x2: bool = True, frozen_stages: int = -1,
                 norm_eval: bool = False, with_cp: bool = False, check_finite: bool = True,
                 init_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__(arch, in_channels=in_channels, out_indices=out_indices, frozen_stages=frozen_stages,
                         norm_eval=norm_eval, with_cp=with_cp, check_finite=check_finite, init_cfg=init_cfg)
        window_size = _checked_window_size('MViTv2', self.default(window_size, 'window_size'))
        settings = self.arch_settings
        self.window_size = window_size
        self.global_kv_stride_x2 = global_kv_stride_x2
        self.block_specs = mvit_block_specs(settings, window_size, global_kv_stride_x2)
        # The 7x7 / stride-4 / padding-3 stem without a norm: ceil(H / 4) x ceil(W / 4) tokens.
        self.patch_embed = PatchEmbed(in_channels, settings['embed_dims'][0], kernel_size=7, stride=4,
                                      padding=3)
        rates = self.drop_path_rates(self.default(drop_path_rate, 'drop_path_rate'), len(self.block_specs))
        self.blocks = nn.ModuleList(
            block_of(spec, settings['mlp_ratio'], rate) for spec, rate in zip(self.block_specs, rates))
        # The index of each stage's last block: where its level is taken.
        self.stage_ends = tuple(int(i) - 1 for i in np.cumsum(settings['depths']))
        for level in self.out_indices:
            self.add_module(_out_norm_name(level), nn.LayerNorm(settings['embed_dims'][level], eps=NORM_EPS))
        self.level_channels = tuple(settings['embed_dims'])

        self.apply(init_linear_and_norm)
        self.freeze_stages()

    # -- the family's part of the base ------------------------------------------------------
    def _complete_arch(self, settings: dict[str, Any]) -> dict[str, Any]:
        return _check_stage_lists('MViTv2', {**MVIT_DEFAULTS, **settings}, self.required_arch_keys)

    def frozen_modules(self, num_stages: int) -> list[nn.Module]:
        """The patch embedding and the blocks of the first ``num_stages`` stages (none for 0)."""
        if num_stages <= 0:
            return []
        return [self.patch_embed, *self.blocks[:self.stage_ends[num_stages - 1] + 1]]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_id(self, name: str) -> int:
        """0 for the patch embedding, ``i + 1`` for block ``i``; an output norm counts with the
        last block of its stage, the block it normalises."""
        if name.startswith('patch_embed.'):
            return 0
        if (m := re.match(r'blocks\.(\d+)\.', name)) and int(m[1]) < len(self.blocks):
            return int(m[1]) + 1
        if (m := _OUT_NORM_KEY.match(name)) and int(m[1]) - 2 in self.out_indices:
            return self.stage_ends[int(m[1]) - 2] + 1
        raise ValueError(f'MViTv2.layer_id: {name!r} is no parameter of the backbone')

    def unbuilt_prefixes(self) -> tuple[str, ...]:
        """The output norms of levels outside ``out_indices`` (a detector trained with all four)."""
        return tuple(f'{_out_norm_name(level)}.' for level in range(self.num_levels)
                     if level not in self.out_indices)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns the maps of ``out_indices``: ``(B, out_channels[k], ceil(H / s_k), ceil(W / s_k))``."""
        self.check_input(x)
        norms = {self.stage_ends[level]: getattr(self, _out_norm_name(level)) for level in self.out_indices}
        return run_map_blocks(self.blocks, self.patch_embed(x), norms, self.recompute, level_is_output=False)


@register_model
class MViTv1(DenseBackbone):
    """The original Multiscale Vision Transformer (MViT v1) as a backbone: maps at strides 4,
    8, 16, 32.

    Paper: "Multiscale Vision Transformers" (Fan, Xiong, Mangalam, Li, Yan, Malik,
    Feichtenhofer; ICCV 2021); the modules are PySlowFast's 2-D ImageNet model: the 7x7/4
    stem, a class token and an absolute position embedding, k and v pooled in every block
    (strides 4/2/1/1), q pooled only in the first block of stages 2-4 (whose skip path is
    max-pooled), the width growing in the MLP of each stage's last block (its shortcut a
    Linear on ``norm2``'s output), no relative positions, no residual pooling, LayerNorm eps
    1e-6 and the final norm. The blocks are MViTv2's (:class:`MultiScaleBlock`), run on a
    token sequence led by the class token; the two designs differ by the data in the arch
    tables.

    Level ``s`` is the output of stage ``s``'s last block, class token dropped. Since v1
    widens in that block's MLP, a stage's map already has the *next* stage's width: 192, 384,
    768, 768 channels for B-16, as the released weights define them (not 96/192/384/768;
    timm's ``expand_attn=False`` MViTs report the same). Level 3 goes through the release's
    final norm, as PySlowFast's own detection path does; levels 0-2 through new LayerNorms
    (eps 1e-6) that the detection design adds (detectron2's ``scale{2,3,4}_norm``), applied to
    a copy.

    Any input of at least 32x32 runs, non-square and not a multiple of 32 included: the
    position table, learned for the ``pretrain_img_size`` grid, is resized to the input's
    ``ceil(H / 4) x ceil(W / 4)`` grid (bicubic, ``align_corners=False``, the class row
    kept), and each pooling maps ``n`` tokens to ``ceil(n / stride)`` as the official padding
    does. The official code runs only at its training crop. Attention is global and fused
    (no ``Nq x Nk`` matrix is held, also at 800x1344).

    With ``window_size > 0`` the model takes the window design of the MViTv2 paper's MViTv1
    detection baselines (its "Hwin", detectron2's windows, MViTv2's window code): attention
    inside windows of ``window_size`` tokens in stage 1, halved per stage, except in the last
    block of stages 2-4, which attends globally. The same modules and weights; the class
    token is not built, since a token that attends to every position has no window (the
    detection MViT of detectron2 has none either), and the position table keeps its class
    row, unused, so that one file loads into both designs.

    Args:
        arch: ``b16``, ``b24``, ``b24_wide`` (pre-trained at 320), or a dict with per-stage
            ``embed_dims`` (the width inside each stage), ``depths``, ``num_heads`` and
            optionally what ``MVIT_V1_DEFAULTS`` holds.
        in_channels: channels of the input image.
        out_indices: levels to return, 0-based (strides 4, 8, 16, 32); the blocks after the
            deepest one do not run and only its norms are built.
        drop_path_rate: stochastic depth of the last block, growing linearly from 0; None
            takes the variant's (the paper's ImageNet values: 0.1 for B-16, 0.3 for B-24).
        pretrain_img_size: the square input the position table was learned for; None takes
            the variant's (224; 320 for ``b24_wide``).
        window_size: 0 (the default, the paper's global attention) or the window side in
            stage 1, a multiple of 8 (56 in the MViTv2 paper's baselines); None takes the
            variant's.
        global_kv_stride_x2: with windows, double the kv stride of the global blocks of stages
            2 and 3, as detectron2's window design does; no effect without windows.
        frozen_stages: 0 or -1 freeze nothing; ``k`` in 1..4 freezes the embeddings (stem,
            class token, position table) and the blocks of the first ``k`` stages.
        norm_eval, with_cp, check_finite, init_cfg: see ``DenseBackbone``. ``with_cp``
            recomputes each block in the backward pass.
    """

    required_arch_keys = ('embed_dims', 'depths', 'num_heads')
    level_strides = (4, 8, 16, 32)
    # A classification checkpoint has none of the output norms the detection design adds.
    optional_groups = {'output norms': tuple(f'{_out_norm_name(level)}.' for level in range(NUM_STAGES - 1))}

    def __init__(self, arch: str | Mapping[str, Any] = 'b16', in_channels: int = 3,
                 out_indices: int | Sequence[int] = (0, 1, 2, 3), drop_path_rate: float | None = None,
                 pretrain_img_size: int | None = None, window_size: int | None = None,
                 global_kv_stride_x2: bool = True, frozen_stages: int = -1, norm_eval: bool = False,
                 with_cp: bool = False, check_finite: bool = True,
                 init_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__(arch, in_channels=in_channels, out_indices=out_indices, frozen_stages=frozen_stages,
                         norm_eval=norm_eval, with_cp=with_cp, check_finite=check_finite, init_cfg=init_cfg)
        settings = self.arch_settings
        img_size = self.default(pretrain_img_size, 'pretrain_img_size')
        if not isinstance(img_size, int) or img_size < self.min_input_size:
            raise ValueError(f'MViTv1: pretrain_img_size must be an int of at least {self.min_input_size} '
                             f'(a square input), got {img_size!r}')
        self.window_size = _checked_window_size('MViTv1', self.default(window_size, 'window_size'))
        self.pos_grid = (-(-img_size // 4),) * 2  # the stem's ceil(S / 4)
        self.block_specs = mvit_block_specs(settings, self.window_size,
                                            global_kv_stride_x2 and self.window_size > 0)
        dims = settings['embed_dims'][0]
        self.patch_embed = PatchEmbed(in_channels, dims, kernel_size=7, stride=4, padding=3)
        self.cls_token = None if self.window_size else nn.Parameter(torch.zeros(1, 1, dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], dims))
        rates = self.drop_path_rates(self.default(drop_path_rate, 'drop_path_rate'), len(self.block_specs))
        self.blocks = nn.ModuleList(
            block_of(spec, settings['mlp_ratio'], rate) for spec, rate in zip(self.block_specs, rates))
        self.stage_ends = tuple(int(i) - 1 for i in np.cumsum(settings['depths']))
        self.level_channels = tuple(self.block_specs[end].out_dims for end in self.stage_ends)
        for level in self.out_indices:
            norm = nn.LayerNorm(self.level_channels[level], eps=NORM_EPS)
            self.add_module(self._level_norm_name(level), norm)

        self.apply(init_linear_and_norm)
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=.02)
        self.freeze_stages()

    @staticmethod
    def _level_norm_name(level: int) -> str:
        """The release's final ``norm`` for the last level, a detection output norm otherwise."""
        return 'norm' if level == NUM_STAGES - 1 else _out_norm_name(level)

    # -- the family's part of the base ------------------------------------------------------
    def _complete_arch(self, settings: dict[str, Any]) -> dict[str, Any]:
        return _check_stage_lists('MViTv1', {**MVIT_V1_DEFAULTS, **settings}, self.required_arch_keys)

    def frozen_modules(self, num_stages: int) -> list[nn.Module]:
        """The embeddings (stem, class token and position table, the last two as a
        ParameterList that views them) and the blocks of the first ``num_stages`` stages."""
        if num_stages <= 0:
            return []
        tables = [self.pos_embed] if self.cls_token is None else [self.cls_token, self.pos_embed]
        return [self.patch_embed, nn.ParameterList(tables),
                *self.blocks[:self.stage_ends[num_stages - 1] + 1]]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_id(self, name: str) -> int:
        """0 for the embeddings, ``i + 1`` for block ``i``; a level's norm counts with the last
        block of its stage, the block it normalises."""
        if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
            return 0
        if (m := re.match(r'blocks\.(\d+)\.', name)) and int(m[1]) < len(self.blocks):
            return int(m[1]) + 1
        for level in self.out_indices:
            if name.startswith(self._level_norm_name(level) + '.'):
                return self.stage_ends[level] + 1
        raise ValueError(f'MViTv1.layer_id: {name!r} is no parameter of the backbone')

    def position_grids(self) -> dict[str, tuple[int, HW, str]]:
        return {'pos_embed': (1, self.pos_grid, 'bicubic')}

    @property
    def unbuilt_parts(self) -> str:
        return ('the class token (window design) and ' if self.cls_token is None else '') + 'output norms'

    def unbuilt_prefixes(self) -> tuple[str, ...]:
        """The norms of levels outside ``out_indices`` (the final norm of a classification file
        too), and the class token in the window design."""
        norms = tuple(f'{self._level_norm_name(level)}.' for level in range(self.num_levels)
                      if level not in self.out_indices)
        return norms + (('cls_token',) if self.cls_token is None else ())

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns the maps of ``out_indices``: ``(B, out_channels[k], ceil(H / s_k), ceil(W / s_k))``."""
        self.check_input(x)
        x = self.patch_embed(x)
        hw = tuple(x.shape[1:3])
        x = x + abs_pos_embed_to_grid(self.pos_embed, hw)  # resized when hw is not the table's grid
        if self.cls_token is None:
            return self._forward_windowed(x)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x.flatten(1, 2)], dim=1)
        recompute = self.recompute
        levels = {end: level for level, end in enumerate(self.stage_ends) if level in self.out_indices}
        outs = []
        for i, block in enumerate(self.blocks[:max(levels) + 1]):
            if recompute:
                x, hw = checkpoint(block.forward_tokens, x, hw, use_reentrant=False)
            else:
                x, hw = block.forward_tokens(x, hw)
            if i in levels:
                norm = getattr(self, self._level_norm_name(levels[i]))
                outs.append(norm(x[:, 1:]).unflatten(1, hw).permute(0, 3, 1, 2))
        return nchw_maps(outs)

    def _forward_windowed(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The window design on the embedded ``(B, H, W, C)`` map: the blocks run on maps, as
        MViTv2's do; a level is its stage's output (at the next stage's width, as without
        windows)."""
        norms = {self.stage_ends[level]: getattr(self, self._level_norm_name(level))
                 for level in self.out_indices}
        return run_map_blocks(self.blocks, x, norms, self.recompute, level_is_output=True)


# -- checkpoint conversion -------------------------------------------------------------------
# mmpvt's layout is detectron2's without its ``backbone.bottom_up.`` prefix, which is the
# official release's plus the output norms: patch_embed.proj, blocks.{i}.{norm1, attn.{qkv,
# proj, pool_q, norm_q, pool_k, norm_k, pool_v, norm_v, rel_pos_h, rel_pos_w}, norm2,
# mlp.{fc1, fc2}, proj}, scale{2..5}_norm. Blocks are numbered over the whole network.

# Only MViT pools q, k and v: the mark of its state dicts in every layout.
_POOLING_KEY = re.compile(r'(^|\.)attn\.pool_[qkv]\.weight$')
# Classification entries: the final norm (official, timm), mmpretrain's per-scale norms (its
# norm3 is the classifier's final norm, never an output norm of ours), heads, class token.
_CLASSIFICATION_KEYS = re.compile(r'^(norm\d?\.|head\.|cls_token$)')
_TIMM_BLOCK = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.(.*)$')


_DETECTRON2_TRUNK = 'bottom_up.'  # detectron2's FPN(bottom_up=MViT) inside ``backbone.``


def _timm_first_blocks(state: Mapping[str, Any]) -> dict[int, int]:
    """timm numbers blocks per stage: the network-wide index of each stage's first block."""
    depths: dict[int, int] = {}
    for key in state:
        if m := _TIMM_BLOCK.match(key):
            depths[int(m[1])] = max(depths.get(int(m[1]), 0), int(m[2]) + 1)
    return {s: sum(depths.get(t, 0) for t in range(s)) for s in depths}


class MViTv2CheckpointFormat(CheckpointFormat):
    """MViTv2 checkpoints: the official releases (``.pyth``: ``model_state``, blocks numbered over
    the network), timm's ``mvitv2_*`` (``stages.{s}.blocks.{j}``, ``shortcut_proj_attn`` or
    ``shortcut_proj_mlp``), detectron2 MViT detectors (``backbone.bottom_up.*``; ``.pth`` or the
    model zoo's ``.pkl`` numpy pickles once read), mmpretrain ``MViT`` classifiers
    (``backbone.patch_embed.projection``) and mmpvt's own, also whole mmpvt detectors.
    Dropped: the final norm, mmpretrain's per-scale norms, heads, the class token and the rest
    of a detector or classifier.
    """

    family = 'mvit'
    wrappers = ('model_state', 'state_dict', 'model', 'module')

    def _detect(self, inside: Mapping[str, Any], outside: Mapping[str, Any]) -> str:
        keys = list(inside)
        if not any(_POOLING_KEY.search(k) for k in keys) or _is_mvit_v1(keys):
            raise ValueError('not an MViTv2 state dict in any known layout (official .pyth, timm mvitv2_*, '
                             f'detectron2 MViT, mmpretrain MViT, mmpvt)'
                             f'{_V1_HINT if _is_mvit_v1(keys) else ""}; first keys: {keys[:5]}')
        if any(k.startswith(_DETECTRON2_TRUNK) for k in keys):
            return 'detectron2'
        if any(_TIMM_BLOCK.match(k) for k in keys):
            return 'timm'
        if any(k.startswith('patch_embed.projection.') for k in keys):
            return 'mmpretrain'
        if any(_OUT_NORM_KEY.match(k) for k in keys):
            return 'mmpvt'
        return 'official'

    def _drops(self, key: str, layout: str) -> bool:
        if layout == 'detectron2':
            if not key.startswith(_DETECTRON2_TRUNK):
                return True  # the FPN around the trunk
            key = key[len(_DETECTRON2_TRUNK):]
        return bool(_CLASSIFICATION_KEYS.match(key))

    def _convert(self, state: dict[str, Any], layout: str) -> dict[str, torch.Tensor]:
        first_block = _timm_first_blocks(state) if layout == 'timm' else {}
        out = {}
        for key, value in state.items():
            if layout == 'detectron2':
                key = key[len(_DETECTRON2_TRUNK):]
            elif layout == 'timm' and (m := _TIMM_BLOCK.match(key)):
                rest = re.sub(r'^shortcut_proj_(attn|mlp)\.', 'proj.', m[3])
                key = f'blocks.{first_block[int(m[1])] + int(m[2])}.{rest}'
            elif layout == 'mmpretrain' and key.startswith('patch_embed.projection.'):
                key = 'patch_embed.proj.' + key[len('patch_embed.projection.'):]
            out[key] = value
        return out


# MViT v1's marks: an absolute position table beside pooling keys, and no relative positions
# (MViTv2 has tables in every block and no absolute table in its ImageNet-1k releases).
_REL_POS_KEY = re.compile(r'(^|\.)attn\.rel_pos_[hw]$')
_V1_POSITION_KEYS = ('pos_embed', 'cls_positional_encoding.pos_embed_spatial')
_V1_HINT = (' (an MViT v1 state dict: an absolute position table and no relative positions; '
            'load it with MViTv1)')


def _is_mvit_v1(keys: Sequence[str]) -> bool:
    return (any(k in _V1_POSITION_KEYS for k in keys) and any(_POOLING_KEY.search(k) for k in keys)
            and not any(_REL_POS_KEY.search(k) for k in keys))


# PyTorchVideo's names for what PySlowFast and mmpvt call otherwise (its hub file mvit_base_16).
_PYTORCHVIDEO_RENAMES = (('patch_embed.patch_model.', 'patch_embed.proj.'), ('norm_embed.', 'norm.'),
                         ('cls_positional_encoding.cls_token', 'cls_token'))
_SEPARATE_QKV = re.compile(r'^(blocks\.\d+\.attn\.)([qkv])\.(weight|bias)$')


class MViTv1CheckpointFormat(CheckpointFormat):
    """MViT v1 checkpoints: PySlowFast's (``.pyth``: ``model_state``; a fused ``attn.qkv``, as the
    released ImageNet B-16 file has it, or ``attn.q/k/v`` as later PySlowFast code writes;
    pooling weights 5-D ``(C, 1, 1, 3, 3)`` or 4-D), PyTorchVideo's (its hub ``mvit_base_16``:
    ``patch_embed.patch_model``, ``cls_positional_encoding`` with separate spatial, temporal
    and class tables, folded into one, ``norm_embed``) and mmpvt's own, also whole detectors.
    Dropped: the classification head. An MViTv2 state dict (relative-position tables, no
    absolute table) is refused, naming what it lacks.
    """

    family = 'mvit_v1'
    wrappers = ('model_state', 'state_dict', 'model', 'module')

    def _detect(self, inside: Mapping[str, Any], outside: Mapping[str, Any]) -> str:
        keys = list(inside)
        if not any(_POOLING_KEY.search(k) for k in keys):
            raise ValueError('not an MViT v1 state dict in any known layout (PySlowFast .pyth, PyTorchVideo, '
                             f'mmpvt); first keys: {keys[:5]}')
        if not _is_mvit_v1(keys):
            v2 = (' and has relative-position tables (attn.rel_pos_h/w): an MViTv2 state dict, which MViTv2 '
                  'loads') if any(_REL_POS_KEY.search(k) for k in keys) else ''
            raise ValueError('not an MViT v1 state dict in any known layout: it has no absolute position '
                             f'table (pos_embed){v2}')
        if 'cls_positional_encoding.pos_embed_spatial' in keys:
            return 'pytorchvideo'
        if any(_OUT_NORM_KEY.match(k) for k in keys):
            return 'mmpvt'
        return 'official'

    def _drops(self, key: str, layout: str) -> bool:
        return key.startswith('head.')

    def _convert(self, state: dict[str, Any], layout: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if layout == 'pytorchvideo':
            table = 'cls_positional_encoding.'
            spatial = state.pop(table + 'pos_embed_spatial')
            temporal = state.pop(table + 'pos_embed_temporal', None)
            front = state.pop(table + 'pos_embed_class')
            if temporal is not None:  # one frame: its temporal row is added to every position
                spatial = spatial + temporal[:, :1]
            out['pos_embed'] = torch.cat([front, spatial], dim=1)
        separate: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            for old, new in _PYTORCHVIDEO_RENAMES if layout == 'pytorchvideo' else ():
                if key.startswith(old):
                    key = new + key[len(old):]
            if (m := _SEPARATE_QKV.match(key)):
                separate.setdefault(f'{m[1]}qkv.{m[3]}', {})[m[2]] = value
                continue
            if value.dim() == 5 and value.shape[2] == 1:  # Conv3d with one frame: (C, 1, 1, k, k)
                value = value.squeeze(2)
            out[key] = value
        for key, parts in separate.items():
            if set(parts) != {'q', 'k', 'v'}:
                raise ValueError(f'{key}: the checkpoint has only {sorted(parts)} of attn.q/k/v')
            out[key] = torch.cat([parts['q'], parts['k'], parts['v']])
        return out


# -- variants --------------------------------------------------------------------------------
# What every variant (and an arch dict) has unless it says otherwise: detectron2's windows
# (56 tokens in stage 1) and the T / S stochastic depth of its COCO configs.
MVIT_DEFAULTS: dict[str, Any] = dict(mlp_ratio=4., dim_mul_in_attention=True, drop_path_rate=0.2,
                                     window_size=56)
# The official releases (``pretrained``: what the zoo's configs load): ImageNet-1k for T, S
# and B, ImageNet-21k for L and H, as detectron2's COCO configs start from.
_RELEASES = 'https://dl.fbaipublicfiles.com/mvit/mvitv2_models/'
_TSB = dict(embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8))
# drop_path_rate: detectron2's COCO configs (T 0.2, S 0.2, B 0.4, L 0.5, H 0.6).
_LARGE = dict(embed_dims=(144, 288, 576, 1152), num_heads=(2, 4, 8, 16), depths=(2, 6, 36, 4),
              drop_path_rate=0.5)
MVIT_ARCHS: dict[str, dict[str, Any]] = {
    'tiny': dict(_TSB, depths=(1, 2, 5, 2), pretrained=_RELEASES + 'MViTv2_T_in1k.pyth'),
    'small': dict(_TSB, depths=(1, 2, 11, 2), pretrained=_RELEASES + 'MViTv2_S_in1k.pyth'),
    'base': dict(_TSB, depths=(2, 3, 16, 3), drop_path_rate=0.4, pretrained=_RELEASES + 'MViTv2_B_in1k.pyth'),
    # the ImageNet-21k design, which detectron2 implements
    'large': dict(_LARGE, pretrained=_RELEASES + 'MViTv2_L_in21k.pyth'),
    'large_in1k': dict(_LARGE, dim_mul_in_attention=False),
    'huge': dict(embed_dims=(192, 384, 768, 1536), num_heads=(3, 6, 12, 24), depths=(4, 8, 60, 8),
                 drop_path_rate=0.6, pretrained=_RELEASES + 'MViTv2_H_in21k.pyth'),
}

MViTv2.arch_zoo = MVIT_ARCHS
MViTv2.checkpoint_format = MViTv2CheckpointFormat()

# MViT v1: the design switches off what MViTv2 added, the width grows in the MLP, and the
# position table is learned at 224 (B-16, B-24) or 320 (B-24-wide). drop_path_rate: the
# paper's ImageNet values (0.1 for B-16, 0.3 for the deeper models, its section D.5).
MVIT_V1_DEFAULTS: dict[str, Any] = dict(mlp_ratio=4., dim_mul_in_attention=False, pool_q_every_block=False,
                                        rel_pos=False, residual_pooling=False, drop_path_rate=0.1,
                                        pretrain_img_size=224, window_size=0)
_B = dict(embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8))
# B-16's ImageNet-1k weights: PyTorchVideo's hub file (``pretrained``, what the configs load: a
# direct download) and the file of PySlowFast's model zoo (``release_page``, a Google Drive page
# to download by hand; the loader reads both). No B-24 or B-24-wide weights were released.
MVIT_V1_ARCHS: dict[str, dict[str, Any]] = {
    'b16': dict(_B, depths=(1, 2, 11, 2),
                pretrained='https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/imagenet/MVIT_B_16_f292487636.pyth',
                release_page='https://drive.google.com/file/d/1dYYqUB-3DSgBVc9d6o-rW8ojtVsrFLgp/view'),
    # B-24's layout is written nowhere; (2, 3, 16, 3) reproduces the paper's parameters and FLOPs.
    'b24': dict(_B, depths=(2, 3, 16, 3), drop_path_rate=0.3),
    # "wide": D = 112; its head count is stated nowhere, 1 in stage 1 as in B-16 and B-24.
    'b24_wide': dict(embed_dims=(112, 224, 448, 896), num_heads=(1, 2, 4, 8), depths=(2, 3, 16, 3),
                     drop_path_rate=0.3, pretrain_img_size=320),
    # The MViTv2 paper's MViTv1-T (its Table 4 baseline): MViTv2-T's layout in v1's design (its
    # v1-S and v1-B are B-16 and B-24). No weights were released.
    'tiny': dict(_B, depths=(1, 2, 5, 2)),
}

MViTv1.arch_zoo = MVIT_V1_ARCHS
MViTv1.checkpoint_format = MViTv1CheckpointFormat()
