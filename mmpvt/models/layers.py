"""Layers shared by mmpvt's multi-scale transformers.

Token maps travel as ``(B, N, C)`` sequences inside blocks and as ``(B, C, H, W)`` maps
between them. The two conversions below are views, never copies: a contiguous
``(B, N, C)`` tensor seen as ``(B, C, H, W)`` has channels-last strides, which is what
PyTorch's CPU and cuDNN convolutions prefer, and a channels-last map flattens back into a
contiguous sequence. Keeping maps channels-last end to end is what saves the layout copies
that dominate other PVT implementations' profiles.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Re-exported so that every mmpvt backbone takes stochastic depth from one place.
from timm.layers import DropPath  # noqa: F401
from torch import nn

HW = tuple[int, int]


def nlc_to_nchw(x: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """Views a ``(B, H*W, C)`` token sequence as a ``(B, C, H, W)`` map (channels-last)."""
    return x.transpose(1, 2).unflatten(2, (hw[0], hw[1]))


def nchw_to_nlc(x: torch.Tensor) -> torch.Tensor:
    """Views a ``(B, C, H, W)`` map as a ``(B, H*W, C)`` token sequence.

    No copy when ``x`` is channels-last; a contiguous NCHW map gives a strided view.
    """
    return x.flatten(2).transpose(1, 2)


def resize_pos_embed(pos_embed: torch.Tensor, src_hw: Sequence[int], dst_hw: Sequence[int],
                     mode: str = 'bilinear') -> torch.Tensor:
    """Resizes a ``(1, src_h*src_w, C)`` absolute position embedding to ``dst_hw``.

    Returns ``pos_embed`` itself when the grids agree, so pre-training sizes cost nothing.
    """
    if tuple(src_hw) == tuple(dst_hw):
        return pos_embed
    grid = nlc_to_nchw(pos_embed, src_hw)
    grid = F.interpolate(grid, size=(int(dst_hw[0]), int(dst_hw[1])), mode=mode, align_corners=False)
    return nchw_to_nlc(grid)


class PatchEmbed(nn.Module):
    """A strided convolution that cuts an image (or map) into patch tokens, then LayerNorm.

    Args:
        in_channels: channels of the input map.
        embed_dims: channels of the tokens.
        kernel_size: convolution kernel; equal to ``stride`` for non-overlapping patches.
        stride: the downsampling factor of this embedding.
        padding: zero padding of the convolution.
        norm_eps: eps of the LayerNorm (PyTorch's default, as in the PVT releases).
    """

    def __init__(self, in_channels: int, embed_dims: int, kernel_size: int, stride: int,
                 padding: int = 0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, HW]:
        """Maps ``(B, C_in, H, W)`` to tokens ``(B, H'*W', embed_dims)`` and ``(H', W')``."""
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(nchw_to_nlc(x)), hw
