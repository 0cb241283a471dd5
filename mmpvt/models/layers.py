"""Layers shared by mmpvt's multi-scale transformers.

Token maps travel as ``(B, N, C)`` sequences inside blocks and as ``(B, C, H, W)`` maps
between them. The two conversions below are views, never copies: a contiguous
``(B, N, C)`` tensor seen as ``(B, C, H, W)`` has channels-last strides, which is what
PyTorch's CPU and cuDNN convolutions prefer, and a channels-last map flattens back into a
contiguous sequence. Keeping maps channels-last through the backbone is what saves the layout
copies that dominate other PVT implementations' profiles; the maps a backbone returns are
copied once to contiguous NCHW (``nchw_maps``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HW = tuple[int, int]


def nchw_maps(maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A backbone's output maps as contiguous NCHW tensors: every family returns these.

    Inside, maps stay channels-last views of the tokens; outside, what follows a backbone may
    read memory as NCHW whatever the strides say. mmcv's compiled RoIAlign does, and on the
    channels-last maps of an FPN above a channels-last backbone it pooled wrong values without
    an error (Mask R-CNN's RoI features off by the maps' own scale). One copy per level keeps
    every consumer right.
    """
    return tuple(m.contiguous() for m in maps)


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes a sample's residual branch with probability
    ``drop_prob`` and scales the kept ones by ``1 / (1 - drop_prob)``.

    The same arithmetic and random draws as timm's ``DropPath`` (one Bernoulli draw per sample,
    in the input's dtype), written here so that importing mmpvt, and so every tool's start,
    does not import timm (1.4 s).
    """

    def __init__(self, drop_prob: float = 0.) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob:.3f}'



def init_linear_and_norm(m: nn.Module) -> bool:
    """The ViT-family initialisation of ``m`` if it is a Linear (truncated normal, std 0.02,
    zero bias) or a LayerNorm (unit weight, zero bias); returns whether it was one."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    else:
        return False
    return True

def nlc_to_nchw(x: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """Views a ``(B, H*W, C)`` token sequence as a ``(B, C, H, W)`` map (channels-last)."""
    # Split, then permuted: unflattening the transposed view instead recomputes the stride of
    # a size-one batch dimension, and PyTorch then no longer recognises a one-image map as
    # channels-last (convolutions and pooling on it wrote NCHW maps).
    return x.unflatten(1, (hw[0], hw[1])).permute(0, 3, 1, 2)


def nchw_to_nlc(x: torch.Tensor) -> torch.Tensor:
    """Views a ``(B, C, H, W)`` map as a ``(B, H*W, C)`` token sequence.

    No copy when ``x`` is channels-last; a contiguous NCHW map gives a strided view.
    """
    return x.flatten(2).transpose(1, 2)


def exporting() -> bool:
    """Whether ``torch.export`` (or the ONNX exporter built on it) is tracing the model.

    Sizes are symbolic then, and a branch on a size (a shortcut where two grids agree) would
    tie the exported graph to the traced input size: the model takes its general path instead.
    """
    return torch.compiler.is_exporting()


def adaptive_avg_pool2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for a ``(B, C, H, W)`` map, in operations that hold
    for every input size once exported.

    Bin ``i`` of ``n`` along a side of ``L`` averages ``[floor(i L / n), ceil((i + 1) L / n))``,
    PyTorch's rule; the bins are written as an ``(n, L)`` averaging matrix per side, computed
    from the symbolic size. (ONNX has no adaptive pooling: exporters turn it into a fixed
    kernel and stride, right only at the traced size.) Eager runs use PyTorch's operator.
    """
    if not exporting():
        return F.adaptive_avg_pool2d(x, size)

    def bins(length) -> torch.Tensor:
        i = torch.arange(size, device=x.device)[:, None]
        j = torch.arange(length, device=x.device)[None, :]
        start, end = (i * length) // size, -((-(i + 1) * length) // size)  # floor, ceil
        inside = (j >= start) & (j < end)
        weights = inside.to(x.dtype)
        return weights / weights.sum(1, keepdim=True)

    return bins(x.shape[2]) @ x.contiguous() @ bins(x.shape[3]).t()


def resize_pos_embed(pos_embed: torch.Tensor, src_hw: Sequence[int], dst_hw: Sequence[int],
                     mode: str = 'bilinear') -> torch.Tensor:
    """Resizes a ``(1, src_h*src_w, C)`` absolute position embedding to ``dst_hw``.

    Returns ``pos_embed`` itself when the grids agree, so pre-training sizes cost nothing;
    an exported model always resizes (at the same size, bilinear and bicubic interpolation
    without corner alignment sample exactly the source points: the identity).
    """
    if exporting():
        size = tuple(dst_hw)
    elif tuple(src_hw) == tuple(dst_hw):
        return pos_embed
    else:
        size = (int(dst_hw[0]), int(dst_hw[1]))
    grid = F.interpolate(nlc_to_nchw(pos_embed, src_hw), size=size, mode=mode, align_corners=False)
    return nchw_to_nlc(grid)


class PatchEmbed(nn.Module):
    """A strided convolution that cuts an image (or a map) into patch tokens, optionally with
    a LayerNorm: every family's stem.

    The tokens come out as a ``(B, H', W', C)`` map: a channels-last input makes the convolution
    write a channels-last map, whose ``(B, H', W', C)`` view is contiguous, so no family's
    blocks copy it (PVT's flatten it to a sequence, a view too).

    Args:
        in_channels: channels of the input map.
        embed_dims: channels of the tokens.
        kernel_size: convolution kernel; equal to ``stride`` for non-overlapping patches (PVT
            v1, ViTDet), larger for overlapping ones (PVTv2's 7/4 and 3/2, MViTv2's 7/4).
        stride: the downsampling factor of this embedding.
        padding: zero padding of the convolution (sizes round as it rounds).
        norm_eps: eps of a LayerNorm on the tokens (PVT's, PyTorch's default 1e-5); None for none
            (ViTDet's and MViTv2's stems have none).
    """

    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int, stride: int,
                 padding: int = 0, norm_eps: float | None = None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps) if norm_eps is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(B, C_in, H, W)`` to tokens ``(B, H', W', embed_dims)``."""
        x = self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


def abs_pos_embed_to_grid(pos_embed: torch.Tensor, hw: Sequence[int],
                          num_prefix_tokens: int = 1) -> torch.Tensor:
    """A ViT's learned ``(1, prefix + S*S, C)`` position embedding for an ``(h, w)`` token grid.

    The prefix rows (the class token's slot) are dropped and the ``S x S`` grid resized
    bicubically (``align_corners=False``, as detectron2's ViTDet does on every forward) when
    it differs from ``(h, w)``. Returns ``(1, h, w, C)``.
    """
    grid = pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise ValueError(f'the position embedding has {grid.shape[1]} rows after {num_prefix_tokens} '
                         'prefix row(s): not a square grid')
    grid = resize_pos_embed(grid, (side, side), hw, mode='bicubic')
    return grid.reshape(1, *(hw if exporting() else map(int, hw)), -1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a ``(B, C, H, W)`` map.

    detectron2's "LN" and mmdet's ``LN2d``; the result is a channels-last map (NCHW shape).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """A transformer block's feed-forward part: fc1, exact (erf) GELU, fc2.

    ``out_dims`` (default: ``dims``) lets a block change width in its MLP, as MViTv2-L's
    ImageNet-1k design does at the end of each stage.
    """

    def __init__(self, dims: int, hidden_dims: int, drop: float = 0., out_dims: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, out_dims or dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        # Without autograd the GELU overwrites fc1's output: the widest activation of the
        # block is then written once, not twice (a third of fc1 + GELU at MViTv2-T's stage 1).
        x = torch.ops.aten.gelu_(x) if not x.requires_grad else self.act(x)
        return self.drop(self.fc2(self.drop(x)))


