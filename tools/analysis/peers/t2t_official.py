"""The authors' T2T-ViT modules, written plainly: the peer mmpvt's T2TViT is timed against.

The benchmark harness (``benchmark_backbone.py --arch t2t_<variant>``) needs the model as the
authors' repository (yitu-opensource/T2T-ViT: models/t2t_vit.py, token_transformer.py,
token_performer.py, transformer_block.py) computes it, with the arithmetic their modules do:
``nn.Unfold`` soft splits; transformer token layers with an explicit N x N attention matrix
(matmul, softmax, matmul), one head, the logit scale of their input width and the skip from v;
performer token layers with frozen orthogonal random features, k, q, v in that order and
their einsums (the normaliser repeated over the channels, as they write it); ViT blocks with
``(q @ k^T) * scale -> softmax -> @ v``; the fixed sinusoid table and the class token.

Where this differs from the authors' code, it is for the benchmark's sake only:

- Any input size. The authors reshape to a square grid and add a table made for their build
  size; here the grids come from the unfold arithmetic and the table is resized to the grid
  at run time (bicubic, class row kept), as their transfer code resizes it and as mmpvt does.
- No classifier: the output is the stride-16 map of the patch tokens after the final norm,
  ``(B, embed_dim, H / 16, W / 16)``, as a one-tuple (what the harness sums).
- No stochastic depth and no zero-rate dropouts (the harness builds every model without
  them); the performers' hard-coded dropouts (0.1) are kept, as in mmpvt.

Parameter names and shapes are the authors' (``cls_token``, ``pos_embed``,
``tokens_to_token.attention{1,2}...``, ``blocks.{i}...``, ``norm``), so that
``T2TViT.convert_state_dict(peer.state_dict())`` loads into mmpvt's T2TViT with nothing missing
or unexpected; ``pos_embed`` and the performers' ``w`` are frozen parameters, as theirs are.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmpvt.models.layers import init_linear_and_norm

# (kernel, stride, padding) of the three soft splits: total stride 16.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def sinusoid_encoding(positions: int, dims: int) -> torch.Tensor:
    """The authors' fixed table, ``(1, positions, dims)``: angle ``p / 10000 ** (2 * (j // 2) / dims)``,
    sine on even and cosine on odd channels, in numpy float64, stored as float32."""
    p = np.arange(positions, dtype=np.float64)[:, None]
    j = np.arange(dims)
    table = p / np.power(10000, 2 * (j // 2) / dims)
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.from_numpy(table).float().unsqueeze(0)


class Mlp(nn.Module):
    """fc1, GELU, fc2 (``transformer_block.Mlp`` without its zero-rate dropouts)."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# -- token layers -------------------------------------------------------------------------------
class TokenAttention(nn.Module):
    """``token_transformer.Attention`` with one head: ``dim``-wide split tokens to ``in_dim``-wide
    q, k, v (no bias); logits ``(q * dim ** -0.5) @ k^T`` as an explicit N x N matrix; the
    output ``v + proj(softmax(logits) @ v)``."""

    def __init__(self, dim: int, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.scale = dim ** -0.5  # head_dim ** -0.5 with one head: the input width's
        self.qkv = nn.Linear(dim, in_dim * 3, bias=False)
        self.proj = nn.Linear(in_dim, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, 1, self.in_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, 1, N, in_dim)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.in_dim))
        return v.squeeze(1) + x  # the skip from v: the input has another width


class TokenTransformer(nn.Module):
    """``Token_transformer``: ``y = attn(norm1(x))``, then ``y + mlp(norm2(y))`` (MLP ratio 1)."""

    def __init__(self, dim: int, in_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenPerformer(nn.Module):
    """``Token_performer`` (one head): kernel attention with ``m = in_dim / 2`` positive random
    features ``phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)`` of a frozen orthogonal ``w``.

    ``kqv`` (with bias) splits into k, q, v; ``y = phi(q) (phi(k)^T v) / (phi(q) . sum phi(k)
    + 1e-8)``, then ``v + dropout(proj(y))`` and ``y + mlp(norm2(y))``, the MLP ending in
    dropout (both 0.1, hard-coded by the authors).
    """

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, dropout: float = 0.1) -> None:
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(dropout)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim),
                                 nn.Dropout(dropout))
        self.m = int(in_dim * kernel_ratio)
        w = nn.init.orthogonal_(torch.empty(self.m, in_dim)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` of ``(B, T, in_dim)`` tokens: ``(B, T, m)``, float32."""
        xd = (x * x).sum(dim=-1, keepdim=True).repeat(1, 1, self.m) / 2
        wtx = torch.einsum('bti,mi->btm', x.float(), self.w)
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.prm_exp(k), self.prm_exp(q)
        normaliser = torch.einsum('bti,bi->bt', qp, kp.sum(dim=1)).unsqueeze(dim=2)  # (B, T, 1)
        kptv = torch.einsum('bin,bim->bnm', v.float(), kp)  # (B, in_dim, m)
        y = torch.einsum('bti,bni->btn', qp, kptv) / (normaliser.repeat(1, 1, self.emb) + self.epsilon)
        return v + self.dp(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """``T2T_module``: soft split, token layer, soft split, token layer, soft split, projection.

    Between splits the tokens go back to their grid; its size comes from the unfold
    arithmetic of the input (the authors take a square root, square inputs only).
    """

    def __init__(self, tokens_type: str, in_chans: int, embed_dim: int, token_dim: int) -> None:
        super().__init__()
        if tokens_type not in ('performer', 'transformer'):
            raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
        self.soft_split0, self.soft_split1, self.soft_split2 = (
            nn.Unfold(kernel_size=k, stride=s, padding=p) for k, s, p in SOFT_SPLITS)
        layer = TokenPerformer if tokens_type == 'performer' else TokenTransformer
        self.attention1 = layer(in_chans * 7 * 7, token_dim)
        self.attention2 = layer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, C, H, W)`` to tokens ``(B, h * w, embed_dim)`` and their grid ``(h, w)``."""
        h, w = x.shape[2:]
        grids = []
        for kernel, stride, padding in SOFT_SPLITS:
            h, w = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
            grids.append((h, w))
        x = self.soft_split0(x).transpose(1, 2)
        x = self.attention1(x)
        B, _, C = x.shape
        x = self.soft_split1(x.transpose(1, 2).reshape(B, C, *grids[0])).transpose(1, 2)
        x = self.attention2(x)
        B, _, C = x.shape
        x = self.soft_split2(x.transpose(1, 2).reshape(B, C, *grids[1])).transpose(1, 2)
        return self.project(x), grids[2]


# -- the column ---------------------------------------------------------------------------------
class Attention(nn.Module):
    """``transformer_block.Attention``: qkv without bias, ``(q @ k^T) * head_dim ** -0.5``,
    softmax, ``@ v``, explicit."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """``transformer_block.Block``: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TViTOfficial(nn.Module):
    """``T2T_ViT`` without its classifier, taking any input of at least 32x32.

    Args:
        img_size: the build size the position table is made for (``(img_size // 16) ** 2 + 1``
            rows, as the authors make it); other inputs resize it to their grid.
        tokens_type: 'performer' or 'transformer' token layers.
        in_chans, embed_dim, depth, num_heads, mlp_ratio, token_dim: the authors' arguments.
    """

    def __init__(self, img_size: int = 224, tokens_type: str = 'performer', in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.,
                 token_dim: int = 64) -> None:
        super().__init__()
        self.tokens_to_token = T2TModule(tokens_type, in_chans, embed_dim, token_dim)
        self.grid = (img_size // 16, img_size // 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = sinusoid_encoding(self.grid[0] * self.grid[1] + 1, embed_dim)
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        self.apply(init_linear_and_norm)  # the authors' _init_weights: the values do not affect timing

    def position_table(self, hw: Sequence[int]) -> torch.Tensor:
        """The table for an ``(h, w)`` grid: the class row, then the build grid resized bicubically."""
        if tuple(hw) == self.grid:
            return self.pos_embed
        cls_row, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=tuple(hw), mode='bicubic', align_corners=False)
        return torch.cat([cls_row, grid.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], -1)], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """``(B, C, H, W)`` to the stride-16 map of the normalised patch tokens, as a one-tuple."""
        if x.dim() != 4 or min(x.shape[2:]) < 32:
            raise ValueError('T2TViTOfficial expects (B, C, H, W) input with H, W >= 32 (three soft '
                             f'splits of total stride 16), got {tuple(x.shape)}')
        B = x.shape[0]
        x, hw = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.position_table(hw)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return (x[:, 1:].transpose(1, 2).reshape(B, -1, *hw),)
