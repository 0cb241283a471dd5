"""T2T-ViT: the Tokens-to-Token Vision Transformer as a dense-prediction backbone.

Paper: "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet" (Yuan,
Chen, Wang, Yu, Shi, Jiang, Tay, Feng, Yan; ICCV 2021). The modules follow the authors'
release (``T2T_module``, ``Token_transformer``, ``Token_performer``, ``Block``) with their
quirks, so that their ImageNet weights give their features: three soft splits (unfold 7/4,
3/2, 3/2) with a small one-head token layer after the first two, a linear projection, then a
plain column of transformer blocks over the class token and the patch tokens.

For dense prediction the grids come from the unfold arithmetic (any input of at least 32x32,
non-square included; the authors' code takes square inputs of its build size only), the
position table is resized to the grid as the authors resize it for transfer, and the
stride-16 map of the patch tokens goes through the scale changes of ViTDet's simple pyramid
(shared with ViTDet in ``pyramid.py``) to four maps at strides 4, 8, 16, 32.

The file reads bottom-up: grid arithmetic and fixed tables, the two token layers, the
tokens-to-token module, the backbone, checkpoint conversion, then the table of variants.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger, print_log
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import CheckpointError, CheckpointFormat
from ..registry import register_model
from .attention import TransformerBlock
from .base import DenseBackbone
from .layers import HW, Mlp, exporting, init_linear_and_norm, nlc_to_nchw, resize_pos_embed
from .pyramid import SimplePyramid

# nn.LayerNorm's default eps: every LayerNorm of the authors' code (token layers, blocks, final norm).
NORM_EPS = 1e-5
# The position table keeps the class token's row in front of the grid.
NUM_PREFIX_TOKENS = 1
# The soft splits (kernel, stride, padding) of the tokens-to-token module: total stride 16.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
# The performer token layer, as the authors hard-code it: half as many random features as
# token channels, eps in the kernel normaliser, dropout after the projection and the MLP.
PERFORMER_KERNEL_RATIO = 0.5
PERFORMER_EPS = 1e-8
PERFORMER_DROPOUT = 0.1
TOKENS_TYPES = ('performer', 'transformer')
# How the transformer token layers scale their attention logits (see T2TViT, token_scale).
TOKEN_SCALES = ('official', 'mmpretrain')


# -- grids and fixed tables -------------------------------------------------------------------
def unfold_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """The number of positions an unfold (a soft split) takes along a side of ``size``."""
    return (size + 2 * padding - kernel) // stride + 1


def soft_split_grids(hw: Sequence[int]) -> tuple[HW, HW, HW]:
    """The token grids after each soft split of an ``(H, W)`` input: strides 4, 8 and 16.

    224 gives 56, 28, 14; 225x290 gives (56, 72), (28, 36), (14, 18).
    """
    grids = []
    h, w = hw if exporting() else (int(hw[0]), int(hw[1]))  # exported: symbolic sizes, kept so
    for kernel, stride, padding in SOFT_SPLITS:
        h, w = unfold_size(h, kernel, stride, padding), unfold_size(w, kernel, stride, padding)
        grids.append((h, w))
    return tuple(grids)


def sinusoid_table(positions: int, dims: int) -> torch.Tensor:
    """The fixed 1-D sinusoid position table of the authors' code, ``(1, positions, dims)``.

    Position ``p``, channel ``j``: ``p / 10000 ** (2 * (j // 2) / dims)``, sine on even and
    cosine on odd channels; computed in float64 on the host (the authors use numpy), stored
    as float32.
    """
    pos = torch.arange(positions, dtype=torch.float64, device='cpu')[:, None]
    j = torch.arange(dims, dtype=torch.float64, device='cpu')
    angles = pos / torch.pow(10000., 2 * torch.div(j, 2, rounding_mode='floor') / dims)
    even = torch.arange(dims, device='cpu') % 2 == 0
    return torch.where(even, torch.sin(angles), torch.cos(angles)).float()[None]


def random_features(num_features: int, dims: int) -> torch.Tensor:
    """A performer's projection: ``num_features`` orthonormal rows of ``dims``, times
    ``sqrt(num_features)``, drawn as the authors draw it (a fresh model's; a checkpoint's
    replaces it)."""
    w = torch.empty(num_features, dims, device='cpu')
    nn.init.orthogonal_(w)
    return w * math.sqrt(num_features)


def _on_default_device(t: torch.Tensor) -> torch.Tensor:
    """``t``, made on the host, on the device new tensors go to (the meta device inside
    ``with torch.device('meta')``, as the contract tests build)."""
    return t.to(torch.empty(0).device)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off where the device has it: the performer's kernel needs float32
    (its exponentials, and its 1e-8, which is zero in float16)."""
    if device_type in ('cpu', 'cuda'):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# -- token layers -----------------------------------------------------------------------------
class TokenAttention(nn.Module):
    """The one-head attention of a transformer token layer, with its skip connection from v.

    ``qkv`` projects the ``in_dims``-wide split tokens to three ``token_dims``-wide parts
    (q, k, v; no bias). The output is ``v + proj(attention)``: the input has another width,
    so the residual comes from v. Attention runs on PyTorch's fused kernel, which never forms
    the N x N matrix (N = H/4 * W/4 tokens in the first layer).

    Args:
        in_dims: width of the split tokens (``in_channels * 49`` or ``token_dims * 9``).
        token_dims: width of q, k, v and of the output.
        logit_scale: the factor of the attention logits ``q . k``.
    """

    def __init__(self, in_dims: int, token_dims: int, logit_scale: float) -> None:
        super().__init__()
        self.token_dims = token_dims
        self.logit_scale = logit_scale
        self.qkv = nn.Linear(in_dims, 3 * token_dims, bias=False)
        self.proj = nn.Linear(token_dims, token_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 1, N, token_dims) each: one head, as strided views of the projection.
        q, k, v = self.qkv(x).unsqueeze(1).split(self.token_dims, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.logit_scale)
        return v.squeeze(1) + self.proj(out.squeeze(1))


class TokenTransformer(nn.Module):
    """The authors' ``Token_transformer``: ``y = attn(norm1(x))``, then ``y + mlp(norm2(y))``.

    The MLP is ``token_dims -> token_dims -> token_dims`` (ratio 1); no dropout, as in the
    authors' build.

    Args:
        in_dims, token_dims: widths of the input and output tokens.
        logit_scale: the attention's logit factor; the authors' is ``in_dims ** -0.5`` (the
            input width, not the head width).
    """

    def __init__(self, in_dims: int, token_dims: int, logit_scale: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dims, eps=NORM_EPS)
        self.attn = TokenAttention(in_dims, token_dims, logit_scale)
        self.norm2 = nn.LayerNorm(token_dims, eps=NORM_EPS)
        self.mlp = Mlp(token_dims, token_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenPerformer(nn.Module):
    """The authors' ``Token_performer``: linear-cost kernel attention with positive random features.

    ``kqv`` (with bias) splits into k, q, v in that order. With the fixed projection ``w``
    (``m = token_dims / 2`` rows), ``phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)`` and the output
    is ``v + dropout(proj(phi(q) (phi(k)^T v) / (phi(q) . sum phi(k) + 1e-8)))``, the kernel
    arithmetic in float32; then ``y + mlp(norm2(y))``, the MLP ending in dropout. Both dropouts
    (0.1) are the authors' hard-coded ones, active in training.

    ``w`` is a buffer: frozen, and saved in (and loaded from) the state dict under the
    authors' key, so that a checkpoint's features are never re-drawn.
    """

    def __init__(self, in_dims: int, token_dims: int) -> None:
        super().__init__()
        self.token_dims = token_dims
        self.norm1 = nn.LayerNorm(in_dims, eps=NORM_EPS)
        self.kqv = nn.Linear(in_dims, 3 * token_dims)
        self.dp = nn.Dropout(PERFORMER_DROPOUT)
        self.proj = nn.Linear(token_dims, token_dims)
        self.norm2 = nn.LayerNorm(token_dims, eps=NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(token_dims, token_dims), nn.GELU(),
                                 nn.Linear(token_dims, token_dims), nn.Dropout(PERFORMER_DROPOUT))
        num_features = int(token_dims * PERFORMER_KERNEL_RATIO)
        self.register_buffer('w', _on_default_device(random_features(num_features, token_dims)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)``: the positive random features of ``(B, N, token_dims)`` tokens, float32."""
        x = x.float()
        w = self.w.float()
        return torch.exp(x @ w.t() - (x * x).sum(dim=-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(self.norm1(x)).split(self.token_dims, dim=-1)
        with _autocast_off(x.device.type):
            kp, qp = self.features(k), self.features(q)  # (B, N, m)
            kv = v.float().transpose(1, 2) @ kp  # (B, token_dims, m): summed over the tokens
            normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, N, 1)
            y = (qp @ kv.transpose(1, 2)) / (normaliser + PERFORMER_EPS)
        x = v + self.dp(self.proj(y.to(v.dtype)))
        return x + self.mlp(self.norm2(x))


# -- the tokens-to-token module ---------------------------------------------------------------
class TokensToToken(nn.Module):
    """Soft split, token layer, soft split, token layer, soft split, projection (stride 16).

    Each soft split is an unfold: every output token holds the channels of a k x k patch
    (overlapping patches), ``C * k * k`` wide. Between splits the tokens go back to their
    2-D grid, whose size comes from the unfold arithmetic of the input's own size.

    Args:
        in_channels: channels of the input image.
        embed_dims: width of the output tokens (the blocks' width).
        token_dims: width of the token layers' outputs (64 in every published variant).
        tokens_type: 'performer' or 'transformer' token layers.
        token_scale: the transformer token layers' logit scale (see T2TViT).
    """

    def __init__(self, in_channels: int, embed_dims: int, token_dims: int, tokens_type: str,
                 token_scale: str) -> None:
        super().__init__()
        (k0, _, _), (k1, _, _), (k2, _, _) = SOFT_SPLITS
        widths = (in_channels * k0 * k0, token_dims * k1 * k1)
        layers = []
        for in_dims in widths:
            if tokens_type == 'performer':
                layers.append(TokenPerformer(in_dims, token_dims))
            else:
                # mmpretrain 1.2.0 divides its logits by the head-width scale it is given:
                # a factor sqrt(token_dims) (8), against the authors' in_dims ** -0.5.
                scale = in_dims ** -0.5 if token_scale == 'official' else 1 / token_dims ** -0.5
                layers.append(TokenTransformer(in_dims, token_dims, scale))
        self.attention1, self.attention2 = layers
        self.project = nn.Linear(token_dims * k2 * k2, embed_dims)

    def forward(self, x: torch.Tensor, recompute: bool = False) -> tuple[torch.Tensor, HW]:
        """Maps ``(B, C, H, W)`` to tokens ``(B, h * w, embed_dims)`` and their grid ``(h, w)``.

        ``recompute`` checkpoints the token layers (their activations at 1/4 and 1/8 of the
        input's resolution are most of the backbone's memory).
        """
        grids = soft_split_grids(x.shape[2:])
        for i, ((kernel, stride, padding), layer) in enumerate(
                zip(SOFT_SPLITS, (self.attention1, self.attention2, None))):
            if i:
                x = nlc_to_nchw(x, grids[i - 1])
            x = F.unfold(x, kernel, padding=padding, stride=stride).transpose(1, 2)
            if layer is not None:
                x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        return self.project(x), grids[-1]


# -- the backbone -----------------------------------------------------------------------------
@register_model
class T2TViT(DenseBackbone):
    """T2T-ViT with the scale changes of ViTDet's simple pyramid: strides 4, 8, 16, 32.

    The column runs as pre-trained: the class token stays in the blocks' attention and the
    fixed sinusoid position table is added to it; only the patch tokens go out, through the
    final norm, as the stride-16 map. Level 0 (stride 4) is a 2x2/2 deconvolution to C/2,
    channel LayerNorm, GELU, a 2x2/2 deconvolution to C/4; level 1 (stride 8) one
    deconvolution to C/2; level 2 the map; level 3 a 2x2 max-pool: channels (C/4, C/2, C, C),
    e.g. (96, 192, 384, 384) for '14'. Only the levels in ``out_indices`` are built.

    Faithful to the authors' modules: token transformers with qkv without bias, one head and
    the logit scale of their input width (147 or 576), performers with the k, q, v split and
    32 fixed random features (``w``, in the checkpoint, frozen), both with the skip from v;
    blocks with qkv without bias and the scale ``head_dim ** -0.5`` (the scale the authors'
    evaluation builds with, for every variant, 14_wide included); LayerNorm eps 1e-5.

    Any input of at least 32x32 (``min_input_size``) is taken: the grids come from the unfold
    arithmetic, and the position table, made for ``img_size``, is resized as a 2-D grid
    (bicubic, ``align_corners=False``, the class row kept), as the authors resize it for
    transfer to other sizes. Inputs padded to a multiple of 32 (``size_divisor``) give maps of
    exactly H/s x W/s (a multiple of 16 makes the stride-16 grid exact; the stride-32
    max-pool needs an even one); other sizes round by less than one.

    The transformer-token variants attend over all H/4 x W/4 tokens in their first token
    layer: quadratic time (67,200 tokens at 800x1344); memory stays linear, since the fused
    attention never forms the N x N matrix.

    Args:
        arch: '7', '10', '12', '14', '19', '24' (performer tokens), 't_14', 't_19', 't_24'
            (transformer tokens), '14_resnext', '14_wide' (the authors' names without the
            ``t2t_vit_`` prefix; 14_wide as their code defines it, depth 4), or a dict with
            ``embed_dims``, ``depth``, ``num_heads``, ``mlp_ratio``, ``tokens_type``
            ('performer' or 'transformer') and optionally ``token_dims`` (64).
        img_size: the input size the position table is made for (int or (H, W); 224: a 14x14
            grid plus the class row, shape (1, 197, C)). Other inputs resize it at run time;
            a checkpoint's table of another square grid is resized on load.
        in_channels: channels of the input image.
        out_indices: levels to return, 0-based (strides 4, 8, 16, 32).
        drop_path_rate: stochastic depth of the last block, growing linearly from 0 over the
            blocks; None takes the variant's (0.1, the authors' training default: their
            main.py's --drop-path).
        token_scale: the transformer token layers' logit scale. 'official' (default):
            ``in_dims ** -0.5``, the authors' modules and weights. 'mmpretrain': a factor
            ``sqrt(token_dims)`` = 8, what mmpretrain 1.2.0's ``T2T_ViT`` computes and its own
            released weights were trained with. Performers have no such choice (mmpretrain has
            no performer T2T-ViT): 'mmpretrain' is refused for them.
        frozen_stages: 0 or -1 freeze nothing; ``k`` in 1..4 freezes the tokens-to-token
            module, the class token and the first ``k * depth // 4`` blocks, and with ``k = 4``
            the final norm too (the whole pre-trained column). The pyramid's scale changes are
            new layers and are never frozen.
        norm_eval, with_cp, check_finite, init_cfg: see ``DenseBackbone``. ``with_cp``
            recomputes the token layers and every block in the backward pass. ``init_cfg``
            loads the authors' release files (their EMA weights preferred), mmpretrain's
            ``T2T_ViT`` and mmpvt checkpoints.
    """

    required_arch_keys = ('embed_dims', 'depth', 'num_heads', 'mlp_ratio', 'tokens_type')
    level_strides = (4, 8, 16, 32)
    # An ImageNet checkpoint (the authors', mmpretrain's) has no scale changes by design.
    optional_groups = {'pyramid scale changes': SimplePyramid.PREFIXES}
    unbuilt_parts = 'pyramid levels'

    def __init__(self, arch: str | Mapping[str, Any] = '14', img_size: int | Sequence[int] = 224,
                 in_channels: int = 3, out_indices: int | Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float | None = None, token_scale: str = 'official', frozen_stages: int = -1,
                 norm_eval: bool = False, with_cp: bool = False, check_finite: bool = True,
                 init_cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__(arch, in_channels=in_channels, out_indices=out_indices, frozen_stages=frozen_stages,
                         norm_eval=norm_eval, with_cp=with_cp, check_finite=check_finite, init_cfg=init_cfg)
        settings = self.arch_settings
        dims, depth = settings['embed_dims'], settings['depth']
        self.tokens_type = settings['tokens_type']
        if token_scale not in TOKEN_SCALES:
            raise ValueError(f'T2TViT: token_scale must be one of {", ".join(TOKEN_SCALES)}, '
                             f'got {token_scale!r}')
        if token_scale != 'official' and self.tokens_type != 'transformer':
            raise ValueError(f"T2TViT: token_scale={token_scale!r} applies to transformer token layers only "
                             f"(mmpretrain has no performer T2T-ViT); this arch has {self.tokens_type} "
                             "tokens")
        self.token_scale = token_scale
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(img_hw) != 2 or min(img_hw) < self.min_input_size:
            raise ValueError(f'T2TViT: img_size must be an int or (H, W) of at least {self.min_input_size}, '
                             f'got {img_size}')

        self.tokens_to_token = TokensToToken(in_channels, dims, settings['token_dims'], self.tokens_type,
                                             token_scale)
        self.pos_grid = soft_split_grids(img_hw)[-1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims))
        # Fixed and frozen, but in the state dict under the authors' key (a buffer, so that
        # optimizers and the trainable-parameter count leave it out, as mmpretrain does).
        table = sinusoid_table(NUM_PREFIX_TOKENS + self.pos_grid[0] * self.pos_grid[1], dims)
        self.register_buffer('pos_embed', _on_default_device(table))
        rates = self.drop_path_rates(self.default(drop_path_rate, 'drop_path_rate'), depth)
        self.blocks = nn.ModuleList(
            TransformerBlock(dims, settings['num_heads'], settings['mlp_ratio'], qkv_bias=False,
                             norm_eps=NORM_EPS, drop_path=rate) for rate in rates)
        self.norm = nn.LayerNorm(dims, eps=NORM_EPS)
        self.pyramid = SimplePyramid(self, dims, self.out_indices)
        self.level_channels = self.pyramid.channels

        # The authors' initialisation: truncated-normal linears, unit LayerNorms, the class
        # token truncated-normal; the pyramid's deconvolutions keep PyTorch's default.
        self.apply(init_linear_and_norm)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        self.freeze_stages()

    # -- the family's part of the base ------------------------------------------------------
    def _complete_arch(self, settings: dict[str, Any]) -> dict[str, Any]:
        settings = {**T2T_DEFAULTS, **settings}
        dims, depth, heads = settings['embed_dims'], settings['depth'], settings['num_heads']
        if settings['tokens_type'] not in TOKENS_TYPES:
            raise ValueError(f'T2TViT: tokens_type must be one of {", ".join(TOKENS_TYPES)}, '
                             f'got {settings["tokens_type"]!r}')
        token_dims = settings['token_dims']
        if depth < 1 or dims % heads or dims % 4 or token_dims < 2:
            raise ValueError(f'T2TViT: arch needs depth >= 1, embed_dims divisible by num_heads and by 4 '
                             f'(the stride-4 level has embed_dims / 4 channels) and token_dims >= 2; got '
                             f'embed_dims={dims}, depth={depth}, num_heads={heads}, token_dims={token_dims}')
        return settings

    def frozen_modules(self, num_stages: int) -> list[nn.Module]:
        """The tokens-to-token module, the class token and the first ``num_stages`` quarters
        of the blocks (none for 0); all four quarters include the final norm.

        The class token is a bare parameter of the backbone (the authors' key ``cls_token``);
        it goes in as a one-entry ParameterList that views it.
        """
        if num_stages <= 0:
            return []
        modules = [self.tokens_to_token, nn.ParameterList([self.cls_token]),
                   *self.blocks[:len(self.blocks) * num_stages // self.num_stages]]
        if num_stages == self.num_stages:
            modules.append(self.norm)
        return modules

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer_id(self, name: str) -> int:
        if name in ('cls_token', 'pos_embed') or name.startswith('tokens_to_token.'):
            return 0
        if m := re.match(r'blocks\.(\d+)\.', name):
            return int(m[1]) + 1
        if name.startswith('norm.') or self.pyramid.owns(name):
            return self.num_layers + 1
        raise ValueError(f'T2TViT.layer_id: {name!r} is no parameter of the backbone')

    def position_grids(self) -> dict[str, tuple[int, HW, str]]:
        """The position table: one made for another square grid (the authors' 384 release:
        24x24) is resized bicubically, the class row kept."""
        return {'pos_embed': (NUM_PREFIX_TOKENS, self.pos_grid, 'bicubic')}

    def unbuilt_prefixes(self) -> tuple[str, ...]:
        return self.pyramid.unbuilt_prefixes

    def check_loaded_keys(self, keys: Sequence[str]) -> None:
        """Refuses token layers of the other type (performer weights into transformer tokens, or
        the reverse) with both lists of keys: the ones missing and the unexpected."""
        mine = [k for k in self.state_dict() if k.startswith('tokens_to_token.')]
        theirs = [k for k in keys if k.startswith('tokens_to_token.')]
        other = {_token_type(k) for k in theirs} - {None, self.tokens_type}
        if other:
            missing = [k for k in mine if k not in set(theirs)]
            unexpected = [k for k in theirs if k not in set(mine)]
            raise CheckpointError(
                f"{type(self).__name__}: the checkpoint's token layers are {other.pop()}s, this model's are "
                f"{self.tokens_type}s (the arch's tokens_type); missing keys: {', '.join(missing)}; "
                f"unexpected keys: {', '.join(unexpected)}")

    def convert_checkpoint(self, checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The family's conversion, saying what it took and warning of a scale mismatch."""
        logger = MMLogger.get_current_instance()
        if isinstance(checkpoint.get('state_dict_ema'), Mapping) and checkpoint['state_dict_ema']:
            print_log(f'{type(self).__name__}: loading the EMA weights (state_dict_ema), as the authors '
                      'evaluate them', logger)
        layout = self.checkpoint_format.layout(checkpoint)
        if layout == 'mmpretrain' and self.tokens_type == 'transformer' and self.token_scale == 'official':
            print_log(f"{type(self).__name__}: this is an mmpretrain T2T_ViT checkpoint, whose token layers "
                      "were trained with mmpretrain's logit scale (a factor 8), but the model has "
                      "token_scale='official'; build it with token_scale='mmpretrain' to get the features "
                      'the checkpoint was trained for', logger, level=logging.WARNING)
        return self.checkpoint_format.convert(checkpoint)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns the maps of ``out_indices``: ``(B, out_channels[k], H / s_k, W / s_k)``.

        Exact for inputs padded to ``size_divisor`` (32); otherwise the soft splits and the
        stride-32 max-pool round as their arithmetic does.
        """
        self.check_input(x)
        recompute = self.recompute
        tokens, hw = self.tokens_to_token(x, recompute)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = x + self._pos_embed(hw)
        # The shared blocks take (B, H, W, C) maps: the class token and the patch tokens go
        # in as one row, so that every token attends to every other, as in pre-training.
        x = x.unsqueeze(1)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        x = nlc_to_nchw(self.norm(x[:, 0, NUM_PREFIX_TOKENS:]), hw)
        return self.pyramid(self, x)

    def _pos_embed(self, hw: HW) -> torch.Tensor:
        """The position table for a ``hw`` grid: the class row, then the grid resized bicubically."""
        if not exporting() and tuple(hw) == self.pos_grid:
            return self.pos_embed
        grid = resize_pos_embed(self.pos_embed[:, NUM_PREFIX_TOKENS:], self.pos_grid, hw, mode='bicubic')
        return torch.cat([self.pos_embed[:, :NUM_PREFIX_TOKENS], grid], dim=1)


def _token_type(key: str) -> str | None:
    """The token layer type a ``tokens_to_token.`` key belongs to, None if both have it."""
    if re.match(r'tokens_to_token\.attention\d\.(w$|kqv\.|proj\.|mlp\.\d\.)', key):
        return 'performer'
    if re.match(r'tokens_to_token\.attention\d\.(attn\.|mlp\.fc\d\.)', key):
        return 'transformer'
    return None


# -- checkpoint conversion -------------------------------------------------------------------
# mmpvt's layout is the authors' names: cls_token, pos_embed (1, 1 + h*w, C),
# tokens_to_token.attention{1,2}.{w, kqv, proj, norm1, norm2, mlp.0, mlp.2} (performer) or
# .{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2} (transformer), tokens_to_token.project,
# blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm; then scale_x4.{0, 1, 3}
# and scale_x2.0. mmpretrain's T2T_ViT renames blocks to encoder and its layers' leaves:
_MMPRETRAIN_RENAMES = (
    (re.compile(r'^encoder\.(\d+)\.'), r'blocks.\1.'),
    (re.compile(r'\.ln([12])\.'), r'.norm\1.'),
    (re.compile(r'\.ffn\.layers\.0\.0\.'), '.mlp.fc1.'),
    (re.compile(r'\.ffn\.layers\.1\.'), '.mlp.fc2.'),
)
# The classifier of the authors' model; mmpretrain's (head.layers.head) is outside its backbone.
CLASSIFICATION_KEYS = re.compile(r'^head\.')


class T2TCheckpointFormat(CheckpointFormat):
    """T2T-ViT checkpoints: the authors' release files and files of the timm training script they
    used (``state_dict_ema`` before ``state_dict``: the EMA weights, which the authors evaluate;
    ``module.`` prefixes stripped), mmpretrain's ``T2T_ViT`` classifiers
    (``backbone.encoder.{i}.ln1`` ...; mmpretrain has transformer tokens only) and mmpvt's own,
    also inside a detector or segmentor. Dropped: the classifier and the rest of a detector.
    The class token, the position table, the performers' ``w`` and the final norm are kept: the
    backbone uses them.
    """

    family = 't2t'
    wrappers = ('state_dict_ema', 'state_dict', 'model', 'module')
    skip_empty_wrappers = True

    def _detect(self, inside: Mapping[str, Any], outside: Mapping[str, Any]) -> str:
        keys = list(inside)
        if not any(k.startswith('tokens_to_token.') for k in keys):
            raise ValueError('not a T2T-ViT state dict in any known layout (the authors\' release, '
                             f'mmpretrain T2T_ViT, mmpvt); first keys: {keys[:5]}')
        if any(k.startswith('encoder.') or '.ln1.' in k for k in keys):
            return 'mmpretrain'
        if outside or any(k.startswith(SimplePyramid.PREFIXES) for k in keys):
            return 'mmpvt'
        return 'official'

    def _drops(self, key: str, layout: str) -> bool:
        return bool(CLASSIFICATION_KEYS.match(key))

    def _convert(self, state: dict[str, Any], layout: str) -> dict[str, torch.Tensor]:
        if layout != 'mmpretrain':
            return state
        out = {}
        for key, value in state.items():
            for pattern, new in _MMPRETRAIN_RENAMES:
                key = pattern.sub(new, key)
            out[key] = value
        return out


# -- variants --------------------------------------------------------------------------------
# The authors' models/t2t_vit.py. Their factories set a qk scale of dim ** -0.5 only with
# pretrained=True, which loads nothing; their evaluation builds without it (head_dim ** -0.5).
# What every variant (and an arch dict) has unless it says otherwise: 64-wide token layers, as
# in every published variant, and the authors' stochastic depth.
T2T_DEFAULTS: dict[str, Any] = dict(token_dims=64, drop_path_rate=0.1)
# The authors' ImageNet-1k releases (``pretrained``: what the zoo's configs load).
_RELEASES = 'https://github.com/yitu-opensource/T2T-ViT/releases/download/main/'
_PERFORMER = dict(tokens_type='performer')
_TRANSFORMER = dict(tokens_type='transformer')
T2T_ARCHS: dict[str, dict[str, Any]] = {
    '7': dict(_PERFORMER, embed_dims=256, depth=7, num_heads=4, mlp_ratio=2.),
    '10': dict(_PERFORMER, embed_dims=256, depth=10, num_heads=4, mlp_ratio=2.),
    '12': dict(_PERFORMER, embed_dims=256, depth=12, num_heads=4, mlp_ratio=2.),
    '14': dict(_PERFORMER, embed_dims=384, depth=14, num_heads=6, mlp_ratio=3.,
               pretrained=_RELEASES + '81.5_T2T_ViT_14.pth.tar'),
    '19': dict(_PERFORMER, embed_dims=448, depth=19, num_heads=7, mlp_ratio=3.),
    '24': dict(_PERFORMER, embed_dims=512, depth=24, num_heads=8, mlp_ratio=3.),
    't_14': dict(_TRANSFORMER, embed_dims=384, depth=14, num_heads=6, mlp_ratio=3.,
                 pretrained=_RELEASES + '81.7_T2T_ViTt_14.pth.tar'),
    't_19': dict(_TRANSFORMER, embed_dims=448, depth=19, num_heads=7, mlp_ratio=3.),
    't_24': dict(_TRANSFORMER, embed_dims=512, depth=24, num_heads=8, mlp_ratio=3.),
    '14_resnext': dict(_PERFORMER, embed_dims=384, depth=14, num_heads=32, mlp_ratio=3.),
    '14_wide': dict(_PERFORMER, embed_dims=768, depth=4, num_heads=12, mlp_ratio=3.),
}

T2TViT.arch_zoo = T2T_ARCHS
T2TViT.checkpoint_format = T2TCheckpointFormat()
