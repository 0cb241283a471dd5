"""Writers of the checkpoint layouts users bring, written independently of mmpvt's converter.

They go the other way (to the foreign layout) so that a test loading their output through
mmpvt exercises the converter against an independent statement of each layout.
"""
from __future__ import annotations

import re

import torch


def timm_v2_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's pvt_v2 state dict in the layout of the authors' pvt_v2_*.pth release files."""
    out = {}
    for key, value in state.items():
        if key.startswith('patch_embed.'):
            key = 'patch_embed1.' + key[len('patch_embed.'):]
        elif m := re.match(r'stages\.(\d+)\.downsample\.(.*)', key):
            key = f'patch_embed{int(m[1]) + 1}.{m[2]}'
        elif m := re.match(r'stages\.(\d+)\.blocks\.(\d+)\.(.*)', key):
            key = f'block{int(m[1]) + 1}.{m[2]}.{m[3].replace("mlp.dwconv.", "mlp.dwconv.dwconv.")}'
        elif m := re.match(r'stages\.(\d+)\.norm\.(.*)', key):
            key = f'norm{int(m[1]) + 1}.{m[2]}'
        out[key] = value
    return out


def mmpvt_v1_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmpvt PVT (v1) state dict in the layout of the authors' pvt_*.pth files.

    Adds what the release files carry for classification: the class token and its slot in
    the last stage's position embedding, the final norm and the head.
    """
    out = {}
    num_stages = 1 + max(int(re.match(r'stages\.(\d+)', k)[1]) for k in state)
    dims = state[f'stages.{num_stages - 1}.patch_embed.norm.weight'].numel()
    for key, value in state.items():
        if m := re.match(r'stages\.(\d+)\.pos_embed$', key):
            stage = int(m[1]) + 1
            if stage == num_stages:
                value = torch.cat([torch.randn(1, 1, value.shape[2]), value], dim=1)
            key = f'pos_embed{stage}'
        elif m := re.match(r'stages\.(\d+)\.patch_embed\.(.*)', key):
            key = f'patch_embed{int(m[1]) + 1}.{m[2]}'
        elif m := re.match(r'stages\.(\d+)\.blocks\.(\d+)\.(.*)', key):
            key = f'block{int(m[1]) + 1}.{m[2]}.{m[3]}'
        out[key] = value
    out['cls_token'] = torch.randn(1, 1, dims)
    out['norm.weight'], out['norm.bias'] = torch.ones(dims), torch.zeros(dims)
    out['head.weight'], out['head.bias'] = torch.randn(1000, dims), torch.zeros(1000)
    return out
