"""MViTv2's detection backbone written the plain way: the benchmark's detectron2-style peer.

This is the arithmetic of detectron2's ``MViT`` (``detectron2/modeling/backbone/mvit.py``)
written as that code writes it, so that the benchmark harness can time mmpvt's MViTv2 against
the straightforward implementation at detection sizes, where timm's classification model
cannot run. What makes it the plain way:

- heads are folded into the batch before pooling: q, k and v are ``(B * heads, H, W,
  head_dims)`` maps, each pooled by its own depthwise convolution and LayerNorm;
- attention is written out: ``(q * scale) @ k^T``, plus the decomposed relative-position
  term (two einsums against the tables looked up for the window's or map's grid), then
  ``softmax``, then ``@ v``; no fused attention kernel;
- windows are cut with zero padding and no mask, after pooling (q windows of
  ``window / q_stride`` tokens, kv windows of ``window / kv_stride``), and put back; the
  pooled q is added to the attention output (residual pooling) before the projection.

The block plan (q and kv strides, windows, global blocks, relative-position table sizes) is
mmpvt's :func:`mmpvt.models.mvit.mvit_block_specs` for the same arch, which its tests check
against detectron2's constructor rules. Parameters carry detectron2's names (those of the
module ``backbone.bottom_up`` of its detectors): ``patch_embed.proj``, ``blocks.{i}.{norm1,
attn.{qkv, proj, pool_q, norm_q, pool_k, norm_k, pool_v, norm_v, rel_pos_h, rel_pos_w},
norm2, mlp.{fc1, fc2}, proj}`` and ``scale{2..5}_norm``, with the shapes of the releases, so
that a state dict moves between this peer and mmpvt's MViTv2 unchanged. Only the design
detectron2 implements is built: the width changes in a stage's first attention (not the
MLP-widening design of MViTv2-L IN-1k). No stochastic depth: the benchmark times
``drop_path_rate=0``. Weights are initialised as detectron2 does; the benchmark does not
depend on their values.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmpvt.models import MViTv2

NORM_EPS = 1e-6  # every detectron2 MViT config: partial(nn.LayerNorm, eps=1e-6)


def pad_and_cut_windows(x: torch.Tensor, side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(N, H, W, C)`` -> ``(N * windows, side, side, C)``, zero-padded at the bottom and right
    to multiples of ``side``; also returns the padded size."""
    N, H, W, C = x.shape
    pad_h, pad_w = (side - H % side) % side, (side - W % side) % side
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(N, Hp // side, side, Wp // side, side, C).permute(0, 1, 3, 2, 4, 5)
    return x.contiguous().view(-1, side, side, C), (Hp, Wp)


def join_windows(windows: torch.Tensor, side: int, padded: tuple[int, int],
                 hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`pad_and_cut_windows`: ``(N, H, W, C)`` with the padding cut off."""
    (Hp, Wp), (H, W) = padded, hw
    N = windows.shape[0] // ((Hp // side) * (Wp // side))
    x = windows.view(N, Hp // side, Wp // side, side, side, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.contiguous().view(N, Hp, Wp, -1)
    return x[:, :H, :W].contiguous() if (Hp, Wp) != (H, W) else x


def relative_embeddings(q_len: int, k_len: int, table: torch.Tensor) -> torch.Tensor:
    """``(q_len, k_len, C)``: the table row of every query/key distance along one axis.

    The table is linearly resized to ``2 * max(q_len, k_len) - 1`` rows when it has another
    number (detectron2 keeps the 224 shapes and resizes on every forward); coordinates of
    the shorter axis are stretched by the length ratio and the distance truncated to a row.
    """
    rows = 2 * max(q_len, k_len) - 1
    if table.shape[0] != rows:
        table = F.interpolate(table.t().unsqueeze(0), size=rows, mode='linear').squeeze(0).t()
    q_ratio, k_ratio = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    # float32 coordinates, as detectron2 computes them; made on the table's device (detectron2
    # makes them on the CPU, which would add a host-to-device copy per call on a GPU).
    q_coords = torch.arange(q_len, device=table.device)[:, None] * q_ratio
    k_coords = torch.arange(k_len, device=table.device)[None, :] * k_ratio
    distance = (q_coords - k_coords) + (k_len - 1) * k_ratio
    return table[distance.long()]


def add_relative_positions(logits: torch.Tensor, q: torch.Tensor, rel_pos_h: torch.Tensor,
                           rel_pos_w: torch.Tensor, q_hw: tuple[int, int],
                           k_hw: tuple[int, int]) -> torch.Tensor:
    """``logits (N, q_h * q_w, k_h * k_w)`` plus ``q · R_h[i - m] + q · R_w[j - n]`` for query
    ``(i, j)`` and key ``(m, n)``; ``q (N, q_h * q_w, C)`` is the pooled, unscaled query."""
    (q_h, q_w), (k_h, k_w) = q_hw, k_hw
    R_h = relative_embeddings(q_h, k_h, rel_pos_h)
    R_w = relative_embeddings(q_w, k_w, rel_pos_w)
    grid_q = q.reshape(q.shape[0], q_h, q_w, -1)
    rel_h = torch.einsum('nhwc,hkc->nhwk', grid_q, R_h)
    rel_w = torch.einsum('nhwc,wkc->nhwk', grid_q, R_w)
    logits = logits.view(-1, q_h, q_w, k_h, k_w) + rel_h[..., :, None] + rel_w[..., None, :]
    return logits.view(-1, q_h * q_w, k_h * k_w)


class MultiScaleAttention(nn.Module):
    """Pooling attention over a ``(B, H, W, dims)`` map, windowed or global, written out.

    Args:
        dims, out_dims: channels of the input map and of q, k, v and the output.
        num_heads: attention heads.
        q_stride, kv_stride: pooling strides of q and of k, v.
        window_size: window side before pooling; 0 for global attention.
        rel_pos_rows: rows of the relative-position tables.
    """

    def __init__(self, dims: int, out_dims: int, num_heads: int, q_stride: int, kv_stride: int,
                 window_size: int, rel_pos_rows: int) -> None:
        super().__init__()
        head_dims = out_dims // num_heads
        self.num_heads = num_heads
        self.scale = head_dims ** -0.5
        self.window_size = window_size
        self.q_window = window_size // q_stride
        self.kv_window = window_size // kv_stride
        self.qkv = nn.Linear(dims, 3 * out_dims)
        self.proj = nn.Linear(out_dims, out_dims)
        for name, stride in (('q', q_stride), ('k', kv_stride), ('v', kv_stride)):
            # one head's channels: the heads are in the batch when this runs
            self.add_module(f'pool_{name}', nn.Conv2d(head_dims, head_dims, 3, stride, 1, groups=head_dims,
                                                      bias=False))
            self.add_module(f'norm_{name}', nn.LayerNorm(head_dims, eps=NORM_EPS))
        self.rel_pos_h = nn.Parameter(torch.zeros(rel_pos_rows, head_dims))
        self.rel_pos_w = nn.Parameter(torch.zeros(rel_pos_rows, head_dims))

    def pool(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Pools and normalises one of q, k, v: ``(N, H, W, C)`` -> ``(N, H', W', C)``."""
        x = getattr(self, f'pool_{name}')(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return getattr(self, f'norm_{name}')(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        heads = self.num_heads
        # (3, B * heads, H, W, head_dims)
        qkv = self.qkv(x).reshape(B, H, W, 3, heads, -1).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.reshape(3, B * heads, H, W, -1).unbind(0)
        q, k, v = self.pool(q, 'q'), self.pool(k, 'k'), self.pool(v, 'v')
        pooled_q = q
        if self.window_size:
            q, padded = pad_and_cut_windows(q, self.q_window)
            k, _ = pad_and_cut_windows(k, self.kv_window)
            v, _ = pad_and_cut_windows(v, self.kv_window)
            q_hw, kv_hw = (self.q_window,) * 2, (self.kv_window,) * 2
        else:
            q_hw, kv_hw = tuple(q.shape[1:3]), tuple(k.shape[1:3])
        q = q.reshape(q.shape[0], q_hw[0] * q_hw[1], -1)
        k = k.reshape(k.shape[0], kv_hw[0] * kv_hw[1], -1)
        v = v.reshape(v.shape[0], kv_hw[0] * kv_hw[1], -1)

        logits = (q * self.scale) @ k.transpose(-2, -1)
        logits = add_relative_positions(logits, q, self.rel_pos_h, self.rel_pos_w, q_hw, kv_hw)
        out = logits.softmax(dim=-1) @ v
        out = out.view(out.shape[0], q_hw[0], q_hw[1], -1)
        if self.window_size:
            out = join_windows(out, self.q_window, padded, tuple(pooled_q.shape[1:3]))
        out = out + pooled_q  # residual pooling
        h, w = out.shape[1:3]
        out = out.view(B, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(B, h, w, -1)
        return self.proj(out)


class PatchEmbed(nn.Module):
    """The 7x7 / stride-4 / padding-3 convolution: ``(B, 3, H, W)`` -> ``(B, H / 4, W / 4, C)``."""

    def __init__(self, in_channels: int, dims: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dims, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """fc1, exact GELU, fc2 (timm's ``Mlp``, which detectron2 uses)."""

    def __init__(self, dims: int, hidden_dims: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiScaleBlock(nn.Module):
    """``x -> skip(x) + attn(norm1(x))``, then ``x -> x + mlp(norm2(x))``, on ``(B, H, W, C)``.

    Where the width changes the skip is ``proj(norm1(x))``; in a q-stride block it is then
    max-pooled (kernel ``stride + 1``, padding ``(stride + 1) // 2``).
    """

    def __init__(self, spec: Any, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.dims, eps=NORM_EPS)
        self.attn = MultiScaleAttention(spec.dims, spec.out_dims, spec.num_heads, spec.q_stride,
                                        spec.kv_stride, spec.window_size, spec.rel_pos_rows)
        self.norm2 = nn.LayerNorm(spec.out_dims, eps=NORM_EPS)
        self.mlp = Mlp(spec.out_dims, int(spec.out_dims * mlp_ratio))
        self.proj = nn.Linear(spec.dims, spec.out_dims) if spec.dims != spec.out_dims else None
        kernel = spec.q_stride + 1
        self.pool_skip = (nn.MaxPool2d(kernel, spec.q_stride, kernel // 2) if spec.q_stride > 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = self.norm1(x)
        attended = self.attn(x_norm)
        if self.proj is not None:
            x = self.proj(x_norm)
        if self.pool_skip is not None:
            x = self.pool_skip(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + attended
        return x + self.mlp(self.norm2(x))


class MViTDetectron2Style(nn.Module):
    """MViTv2's detection backbone as detectron2 writes it: the four stage maps, strides 4-32.

    Args:
        arch: an mmpvt MViTv2 variant name (a key of its ``arch_zoo``) or arch dict; it must
            widen in attention (``dim_mul_in_attention`` True), the design detectron2 has.
        window_size: stage-1 window side (56, halved per stage); 0 makes every block global.
        global_kv_stride_x2: double the kv stride of the global blocks of stages 2 and 3.
        with_cp: recompute each block in the backward pass (detectron2 wraps each block in a
            checkpoint the same way).

    ``forward`` returns ``(B, C_s, ceil(H / 4 / 2**s), ceil(W / 4 / 2**s))`` for s = 0..3,
    each through its own LayerNorm ``scale{s + 2}_norm``.
    """

    def __init__(self, arch: str | Mapping[str, Any] = 'tiny', window_size: int = 56,
                 global_kv_stride_x2: bool = True, with_cp: bool = False) -> None:
        super().__init__()
        # mmpvt's arch checks, defaults and block plan, from a model that holds no memory
        with torch.device('meta'):
            reference = MViTv2(arch=arch, window_size=window_size, global_kv_stride_x2=global_kv_stride_x2)
        settings = reference.arch_settings
        if not settings['dim_mul_in_attention']:
            raise ValueError('detectron2-style MViTv2: detectron2 widens in attention only; an arch with '
                             'dim_mul_in_attention=False (large_in1k) has no detectron2 counterpart')
        self.with_cp = with_cp
        self.patch_embed = PatchEmbed(3, settings['embed_dims'][0])
        self.blocks = nn.ModuleList(MultiScaleBlock(spec, settings['mlp_ratio'])
                                    for spec in reference.block_specs)
        self.stage_ends = reference.stage_ends
        for stage, dims in enumerate(settings['embed_dims']):
            self.add_module(f'scale{stage + 2}_norm', nn.LayerNorm(dims, eps=NORM_EPS))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.patch_embed(x)
        recompute = self.with_cp and self.training and torch.is_grad_enabled()
        outs = []
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
            if i in self.stage_ends:
                norm = getattr(self, f'scale{len(outs) + 2}_norm')
                outs.append(norm(x).permute(0, 3, 1, 2))
        return tuple(outs)
