"""Attention for the plain-ViT and MViT families: windows, decomposed relative positions, and
the attention that adds them as a mask, on PyTorch's fused kernel where it pays.

Token maps here are laid out as ``(B, H, W, C)``, detectron2's convention: windows are cut and
attention runs on the trailing channel dimension without a transpose. ViTDet and T2T-ViT
build their columns from :class:`TransformerBlock`; MViTv2's pooling attention uses the
windows, the relative positions and :func:`rel_pos_attention`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import HW, DropPath, Mlp, exporting


# -- windows ---------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, HW]:
    """Cuts a ``(B, H, W, C)`` map into ``(B * n, window_size, window_size, C)`` windows.

    The map is zero-padded at the bottom and right to a multiple of ``window_size`` first,
    and no mask hides the padding afterwards: the ViTDet and MViTv2 detectors were trained
    that way. Returns the windows and the padded size ``(Hp, Wp)`` that
    :func:`window_unpartition` needs.
    """
    B, H, W, C = x.shape
    # Windows per side first and the padded size from them (not H + (-H % n)): an exported
    # model's symbolic sizes then divide exactly, with no guard on the input size. Rounded up
    # on positive numbers: ONNX divides integers towards zero, so -(-H // n) would export wrong.
    rows, cols = (H + window_size - 1) // window_size, (W + window_size - 1) // window_size
    Hp, Wp = rows * window_size, cols * window_size
    if exporting() or Hp > H or Wp > W:  # exported: padded by what the input size needs, maybe 0
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    x = x.view(B, rows, window_size, cols, window_size, C).permute(0, 1, 3, 2, 4, 5)
    if exporting():  # a copy whatever the sizes: reshape would ask whether a view can do
        windows = x.clone(memory_format=torch.contiguous_format).view(-1, window_size, window_size, C)
        return windows, (Hp, Wp)
    windows = x.reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window_size: int, padded_hw: Sequence[int],
                       hw: Sequence[int]) -> torch.Tensor:
    """Puts :func:`window_partition`'s windows back into a ``(B, H, W, C)`` map, padding cut off."""
    Hp, Wp = padded_hw
    H, W = hw
    rows, cols = Hp // window_size, Wp // window_size
    B = windows.shape[0] // (rows * cols)
    x = windows.view(B, rows, cols, window_size, window_size, -1).permute(0, 1, 3, 2, 4, 5)
    if exporting():
        # Copied whatever the sizes (see window_partition) and cropped by gathering the rows
        # and columns kept: a slice would ask whether H <= Hp, which symbolic sizes cannot show.
        x = x.clone(memory_format=torch.contiguous_format).view(B, Hp, Wp, -1)
        x = x.index_select(1, torch.arange(H, device=x.device))
        return x.index_select(2, torch.arange(W, device=x.device))
    x = x.reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


# -- decomposed relative positions ------------------------------------------------------------
def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resizes a ``(L, C)`` relative-position table to ``(length, C)``.

    Tables are learned for one distance range (2 * 14 - 1 rows for 14x14 windows); a grid
    of another size needs ``2 * size - 1`` rows. ``align_corners=False``, as detectron2
    resizes them. Returns ``table`` itself when the length already fits.
    """
    if not exporting() and table.shape[0] == length:
        return table  # exported: resized to the same length where it fits, the identity
    resized = F.interpolate(table.t()[None], size=length, mode='linear', align_corners=False)
    return resized[0].t()


def rel_pos_lookup(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """The ``(q_size, k_size, C)`` embeddings of every query/key distance along one axis.

    ``table`` holds one row per distance; it is resized to ``2 * max(q_size, k_size) - 1``
    rows when it holds another number. When queries and keys differ in length (pooled keys
    in MViTv2), the shorter axis' coordinates are stretched by the length ratio, so that
    positions are compared in the same units, then truncated to a row index, as detectron2
    and the MViTv2 authors do.
    """
    if exporting():
        return _exported_rel_pos_lookup(q_size, k_size, table)
    table = resize_rel_pos(table, 2 * max(q_size, k_size) - 1)
    q_scale, k_scale = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=table.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=table.device)[None, :] * k_scale
    index = (q_coords - k_coords) + (k_size - 1) * k_scale
    return table[index.long()]


def _exported_rel_pos_lookup(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """:func:`rel_pos_lookup` on symbolic sizes, the same arithmetic in tensors: no branch on a
    size (``torch.sym_max``), and the ratios as float64 tensors rounded to float32 where the
    eager path's Python floats meet float32 tensors (ONNX has no symbolic float scalars)."""
    table = resize_rel_pos(table, 2 * torch.sym_max(q_size, k_size) - 1)
    q_len, k_len = (torch.scalar_tensor(n, dtype=torch.float64, device=table.device)
                    for n in (q_size, k_size))
    q_scale, k_scale = (k_len / q_len).clamp(min=1.0), (q_len / k_len).clamp(min=1.0)
    q_coords = torch.arange(q_size, device=table.device)[:, None] * q_scale.float()
    k_coords = torch.arange(k_size, device=table.device)[None, :] * k_scale.float()
    index = (q_coords - k_coords) + ((k_len - 1) * k_scale).float()
    return table[index.long()]


def rel_pos_terms(q: torch.Tensor, R_h: torch.Tensor, R_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of MViTv2's decomposed relative-position term.

    For a query at ``(i, j)`` and a key at ``(m, n)`` the logit gains
    ``q · R_h[i, m] + q · R_w[j, n]``: one table per axis instead of one per 2-D offset.

    Args:
        q: queries ``(..., q_h * q_w, C)`` before the attention scale is applied.
        R_h, R_w: the looked-up embeddings (:func:`rel_pos_lookup`) of every query/key
            distance, ``(q_h, k_h, C)`` and ``(q_w, k_w, C)``.

    Returns:
        ``q · R_h``, ``(..., q_h, q_w, k_h)``, and ``q · R_w``, ``(..., q_h, q_w, k_w)``,
        both contiguous.
    """
    grid_q = q.unflatten(-2, (R_h.shape[0], R_w.shape[0]))
    if exporting():
        return _axis_products(grid_q, R_h.to(q.dtype), -3), _axis_products(grid_q, R_w.to(q.dtype), -2)
    # einsum may return permuted strides; the broadcast sum of the two would inherit them,
    # and flattening it would then copy the whole (q_h*q_w) x (k_h*k_w) bias. Made
    # contiguous, the sum is born in the layout the attention reads.
    rel_h = torch.einsum('...hwc,hkc->...hwk', grid_q, R_h.to(q.dtype)).contiguous()
    rel_w = torch.einsum('...hwc,wkc->...hwk', grid_q, R_w.to(q.dtype)).contiguous()
    return rel_h, rel_w


def _axis_products(grid_q: torch.Tensor, R: torch.Tensor, axis: int) -> torch.Tensor:
    """``einsum('...hwc,hkc->...hwk')`` (``axis`` -3) or ``'...hwc,wkc->...hwk'`` (-2) as one
    batched product over the axis, for an exported model: einsum's own reshapes ask whether
    a leading size is 1, which ties the export to the traced number of windows."""
    moved = grid_q.movedim(axis, 0)  # (n, ..., other axis, c), n = R's rows
    flat = moved.clone(memory_format=torch.contiguous_format).view(R.shape[0], -1, R.shape[-1])
    out = torch.bmm(flat, R.transpose(1, 2))  # (n, tokens, k)
    out = out.view(*moved.shape[:-1], R.shape[1]).movedim(0, axis)
    return out.clone(memory_format=torch.contiguous_format)


def _rel_pos_spread(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor | None:
    """The 0/1 matrix that spreads the two factors over the keys, ``(k_h + k_w, k_h * k_w)``,
    where :func:`_rel_pos_mask` builds the mask as a product; None where it adds.

    The outer sum is a broadcast add, except in bfloat16 and float16 on the CPU: there the
    reduced-precision matrix units compute the product of the two factors side by side with
    this matrix 3-8 times faster than the broadcast add (MViTv2-T's blocks at 800x1344). Each
    output is one term plus the other, rounded once: the same values.
    """
    if rel_h.device.type != 'cpu' or rel_h.dtype not in (torch.bfloat16, torch.float16):
        return None
    k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
    eye_h = torch.eye(k_h, dtype=rel_h.dtype, device=rel_h.device)
    eye_w = torch.eye(k_w, dtype=rel_h.dtype, device=rel_h.device)
    # row m of the first block is 1 at every key (m, .); row n of the second at (., n)
    return torch.cat([eye_h.repeat_interleave(k_w, dim=1), eye_w.repeat(1, k_h)])


def _rel_pos_mask(rel_h: torch.Tensor, rel_w: torch.Tensor, spread: torch.Tensor | None) -> torch.Tensor:
    """``(..., q_h * q_w, k_h * k_w)``: every query's term for every key, from the factors,
    with :func:`_rel_pos_spread`'s matrix (made once per attention)."""
    if spread is not None:
        return (torch.cat([rel_h, rel_w], dim=-1) @ spread).flatten(-3, -2)
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-4, -3).flatten(-2, -1)


def decomposed_rel_pos(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                       q_hw: Sequence[int], k_hw: Sequence[int]) -> torch.Tensor:
    """The decomposed relative-position term of :func:`rel_pos_terms` as one additive mask,
    ``(..., q_h * q_w, k_h * k_w)``, to be added to ``q @ k.T * scale`` (the ``attn_mask``
    of ``scaled_dot_product_attention``)."""
    (q_h, q_w), (k_h, k_w) = q_hw, k_hw
    R_h, R_w = rel_pos_lookup(q_h, k_h, rel_pos_h), rel_pos_lookup(q_w, k_w, rel_pos_w)
    rel_h, rel_w = rel_pos_terms(q, R_h, R_w)
    return _rel_pos_mask(rel_h, rel_w, _rel_pos_spread(rel_h, rel_w))


# Inference on the CPU builds the relative-position mask for a slice of the queries at a
# time, about this many bytes, and attends with it while it is still in cache. Built whole,
# the mask is as large as the attention matrix (59 MB for one MViTv2-T block at 800x1344):
# writing it, faulting its fresh pages in and reading it back took as long as the
# attention itself.
REL_POS_CHUNK_BYTES = 16 * 2**20


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, R_h: torch.Tensor,
                      R_w: torch.Tensor, dropout_p: float = 0.) -> torch.Tensor:
    """``softmax(q @ k.T / sqrt(head_dims) + decomposed_rel_pos) @ v`` for ``(N, heads, tokens, C)``
    operands (the ViTDet and MViTv2 attentions), ``R_h`` and ``R_w`` as in :func:`rel_pos_terms`.

    Returns ``(N, heads, Nq, Cv)``, in a layout that depends on the path: callers read it
    through views. A step that needs gradients, or one off the CPU, attends with the whole
    mask (:func:`masked_attention`; memory ``(N, heads, Nq, Cv)``); inference on the CPU
    builds the mask in slices of about ``REL_POS_CHUNK_BYTES`` (whole batch entries, i.e.
    windows, when one fits, otherwise runs of query rows of one entry) and writes each
    slice's result into memory ``(N, Nq, heads, Cv)``, which flattens into tokens.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, R_h, R_w))
    rel_h, rel_w = rel_pos_terms(q, R_h, R_w)
    spread = _rel_pos_spread(rel_h, rel_w)
    if needs_grad or q.device.type != 'cpu' or exporting():  # exported: no loop over sizes
        return masked_attention(q, k, v, _rel_pos_mask(rel_h, rel_w, spread), dropout_p)
    n, heads, nq, _ = q.shape
    q_h, q_w = R_h.shape[0], R_w.shape[0]
    out = q.new_empty(n, nq, heads, v.shape[-1]).transpose(1, 2)
    row_bytes = heads * q_w * k.shape[-2] * q.element_size()  # one query row's mask, all heads
    rows = max(1, REL_POS_CHUNK_BYTES // row_bytes)
    if rows >= q_h:
        step = rows // q_h
        for i in range(0, n, step):
            b = slice(i, i + step)
            mask = _rel_pos_mask(rel_h[b], rel_w[b], spread)
            out[b] = F.scaled_dot_product_attention(q[b], k[b], v[b], attn_mask=mask, dropout_p=dropout_p)
        return out
    for i in range(n):
        for r in range(0, q_h, rows):
            t = slice(r * q_w, (r + rows) * q_w)
            mask = _rel_pos_mask(rel_h[i, :, r:r + rows], rel_w[i, :, r:r + rows], spread)
            out[i, :, t] = F.scaled_dot_product_attention(q[i, :, t], k[i], v[i], attn_mask=mask,
                                                          dropout_p=dropout_p)
    return out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     dropout_p: float = 0.) -> torch.Tensor:
    """``softmax(q @ k.T / sqrt(head_dims) + mask) @ v`` over the last two dimensions.

    Inference, and any step on a GPU, runs PyTorch's fused ``scaled_dot_product_attention``.
    A CPU training step (an operand that needs a gradient) runs the product written out,
    the mask added inside the first matrix product (``baddbmm``): there the fused kernel has
    no backward for a mask that needs a gradient, and the path it falls back to normalises
    with a NaN-safe softmax that alone took more time than the rest of the attention. One
    attention forward and backward took 0.72-0.89x the fallback's time (the windowed and
    global blocks of ViTDet-B, MViTv2-T's pooled blocks; 2-core CPU, float32). The mask
    never holds -inf here, so the two softmaxes agree.

    Args:
        q, k, v: ``(..., Nq, C)``, ``(..., Nk, C)``, ``(..., Nk, Cv)``.
        mask: additive, broadcastable to ``(..., Nq, Nk)``.
        dropout_p: dropout on the attention weights (pass 0 outside training).
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, mask))
    if q.device.type != 'cpu' or not needs_grad:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    lead, (nq, c), nk = q.shape[:-2], q.shape[-2:], k.shape[-2]
    q3, k3, v3 = q.reshape(-1, nq, c), k.reshape(-1, nk, c), v.reshape(-1, nk, v.shape[-1])
    mask3 = mask.expand(*lead, nq, nk).reshape(-1, nq, nk)
    attn = torch.baddbmm(mask3, q3, k3.transpose(1, 2), alpha=c ** -0.5).softmax(-1)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    return torch.bmm(attn, v3).view(*lead, nq, v.shape[-1])


# -- the plain transformer block ---------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention over a ``(B, H, W, C)`` map, with decomposed relative position.

    Runs on PyTorch's fused ``scaled_dot_product_attention``; the relative-position term goes
    in as its additive mask (see :func:`masked_attention` for CPU training steps).

    Args:
        dims: channels of the tokens.
        num_heads: attention heads; must divide ``dims``.
        qkv_bias: bias in the query/key/value projection.
        rel_pos_size: the ``(h, w)`` grid the relative-position tables are sized for
            (``2 * h - 1`` and ``2 * w - 1`` rows; resized when the grid differs);
            ``None`` for none.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dims: int, num_heads: int, qkv_bias: bool = True, rel_pos_size: HW | None = None,
                 attn_drop: float = 0., proj_drop: float = 0.) -> None:
        super().__init__()
        if dims % num_heads:
            raise ValueError(f'num_heads ({num_heads}) must divide the embedding dims ({dims})')
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dims, 3 * dims, bias=qkv_bias)
        self.proj = nn.Linear(dims, dims)
        self.proj_drop = nn.Dropout(proj_drop)
        head_dims = dims // num_heads
        if rel_pos_size is not None:
            # Zero start, as detectron2's default: pre-training checkpoints carry no tables.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, head_dims))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, head_dims))
        else:
            self.register_parameter('rel_pos_h', None)
            self.register_parameter('rel_pos_w', None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        heads = self.num_heads
        # (B, heads, H*W, head_dim) each, as strided views of the projection.
        q, k, v = self.qkv(x).reshape(B, H * W, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop if self.training else 0.
        if self.rel_pos_h is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            R_h, R_w = rel_pos_lookup(H, H, self.rel_pos_h), rel_pos_lookup(W, W, self.rel_pos_w)
            out = rel_pos_attention(q, k, v, R_h, R_w, dropout_p)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, H, W, C)))


class TransformerBlock(nn.Module):
    """A plain pre-norm transformer block on a ``(B, H, W, C)`` map, windowed or global.

    ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. With ``window_size > 0`` attention
    runs inside non-overlapping windows of the normalised map (zero-padded to a multiple of
    the window, no mask), otherwise over the whole map.

    Args:
        dims, num_heads, qkv_bias: the attention's settings.
        mlp_ratio: hidden width of the MLP relative to ``dims``.
        window_size: side of the attention windows; 0 for global attention.
        rel_pos_size: grid the relative-position tables are sized for (the window for a
            windowed block); ``None`` for no relative position.
        norm_eps: eps of both LayerNorms.
        drop, attn_drop: dropout rates.
        drop_path: stochastic-depth rate of both residual branches.
    """

    def __init__(self, dims: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 window_size: int = 0, rel_pos_size: HW | None = None, norm_eps: float = 1e-6,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dims, eps=norm_eps)
        self.attn = Attention(dims, num_heads, qkv_bias, rel_pos_size, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dims, eps=norm_eps)
        self.mlp = Mlp(dims, int(dims * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            windows, padded_hw = window_partition(h, self.window_size)
            h = window_unpartition(self.attn(windows), self.window_size, padded_hw, hw)
        else:
            h = self.attn(h)
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))
