"""Writers of the checkpoint layouts users bring, written independently of mmpvt's converter.

They go the other way (to the foreign layout) so that a test loading their output through
mmpvt exercises the converter against an independent statement of each layout. Also here:
where each of mmpvt's tensors lies in each source's checkpoint, and the resize that loading a
v1 position embedding of another size must apply.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger


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


# -- where each of mmpvt's tensors lies in a source's checkpoint ---------------------------
# The other direction again: for a key of mmpvt's state dict, the key that holds it in the
# authors' release, timm or mmdet (as pvt_facts-style layout descriptions state them), and
# what turns that tensor into mmpvt's. A test builds a checkpoint from a source's own key
# manifest and checks every loaded tensor against these, independently of the converter.

Source = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _split_stage(key: str) -> tuple[int, str]:
    m = re.match(r'stages\.(\d+)\.(.*)', key)
    if m is None:
        raise KeyError(f'{key} is not an mmpvt backbone key (stages.<i>....)')
    return int(m[1]), m[2]


def official_source(key: str, num_stages: int = 4) -> Source:
    """Where the authors' ``pvt_*.pth`` / ``pvt_v2_*.pth`` files keep mmpvt's ``key``.

    Stages count from 1 there (``patch_embed1``, ``block1.0``, ``norm1``); the v2 depthwise
    convolution sits one module deeper (``mlp.dwconv.dwconv``); v1's last position
    embedding has the class token's slot in front.
    """
    stage, rest = _split_stage(key)
    n = stage + 1
    if rest == 'pos_embed':
        return f'pos_embed{n}', (lambda t: t[:, 1:]) if n == num_stages else _same
    part, _, tail = rest.partition('.')
    if part == 'blocks':
        return f'block{n}.{tail.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")}', _same
    if part in ('patch_embed', 'norm'):
        return f'{part}{n}.{tail}', _same
    raise KeyError(f'no place in the authors\' layout for {key}')


def timm_source(key: str) -> Source:
    """Where timm's ``pvt_v2_*`` keeps mmpvt's ``key``: stage 1's patch embedding at the
    top level, the later ones as each stage's ``downsample``; the rest under the same names."""
    stage, rest = _split_stage(key)
    if rest.startswith('patch_embed.'):
        return (rest if stage == 0 else f'stages.{stage}.downsample.{rest[len("patch_embed."):]}'), _same
    return key, _same


def _conv1x1_as_linear(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, 0, 0]


def mmdet_source(key: str, v1: bool) -> Source:
    """Where mmdet 3.x's ``PyramidVisionTransformer(V2)`` keeps mmpvt's ``key``.

    Each stage is ``layers.<i>`` = [patch embedding, blocks, norm]; v1's position embedding
    is element 0 of the blocks, which then start at 1. Attention is ``nn.MultiheadAttention``
    (q, k, v packed in ``in_proj``: q is the first third), the MLP a sequence of convolutions
    (1x1 for the linears, the depthwise 3x3 at index 1 in v2, fc2 after GELU and dropout).
    """
    stage, rest = _split_stage(key)
    part, _, tail = rest.partition('.')
    if rest == 'pos_embed':
        return f'layers.{stage}.1.0.pos_embed', _same
    if part == 'patch_embed':
        sub, _, leaf = tail.partition('.')
        return f'layers.{stage}.0.{"projection" if sub == "proj" else sub}.{leaf}', _same
    if part == 'norm':
        return f'layers.{stage}.2.{tail}', _same
    if part != 'blocks':
        raise KeyError(f'no place in mmdet\'s layout for {key}')
    index, _, name = tail.partition('.')
    block = f'layers.{stage}.1.{int(index) + v1}.'
    if m := re.match(r'attn\.(q|kv)\.(weight|bias)$', name):
        query = m[1] == 'q'

        def part_of_in_proj(t: torch.Tensor) -> torch.Tensor:
            dims = t.shape[0] // 3
            return t[:dims] if query else t[dims:]
        return f'{block}attn.attn.in_proj_{m[2]}', part_of_in_proj
    fc2 = 'ffn.layers.3.' if v1 else 'ffn.layers.4.'
    renames = {'attn.proj.': 'attn.attn.out_proj.', 'mlp.fc1.': 'ffn.layers.0.',
               'mlp.dwconv.': 'ffn.layers.1.', 'mlp.fc2.': fc2}
    for ours, theirs in renames.items():
        if name.startswith(ours):
            linear = ours in ('mlp.fc1.', 'mlp.fc2.') and name.endswith('weight')
            return block + theirs + name[len(ours):], _conv1x1_as_linear if linear else _same
    return block + name, _same  # norm1, norm2, attn.sr, attn.norm keep their names


# -- what loading v1 position embeddings of another size must give --------------------------
def bilinear_resize(pos_embed: torch.Tensor, side: int, hw: tuple[int, int]) -> torch.Tensor:
    """A ``(1, side*side, C)`` position embedding resized to an ``h x w`` grid, as the authors'
    classification code and mmdet's AbsolutePositionEmbedding resize theirs: tokens are rows
    of the grid, bilinear interpolation with ``align_corners=False`` (F.interpolate's default)."""
    grid = pos_embed.reshape(1, side, side, pos_embed.shape[-1]).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=hw, mode='bilinear', align_corners=False)
    return grid.flatten(2).transpose(1, 2)


@contextlib.contextmanager
def logged_messages() -> Iterator[list[str]]:
    """The messages mmengine's current logger receives inside the ``with`` block."""
    logger = MMLogger.get_current_instance()
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


# -- key manifests: the names and shapes each source's models hold --------------------------
MANIFEST_DIR = Path(__file__).resolve().parent / 'manifests'
_RUN = re.compile(r'\{(\d+)-(\d+)\}')


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest of ``manifests/`` with each variant's names spelled out (``{a-b}`` runs expanded).

    Returns the file's ``source``, ``layout`` and ``family``, and ``variants``: for each arch
    a dict from tensor name to shape.
    """
    manifest = json.loads(path.read_text())
    variants = {}
    for arch, names in manifest['variants'].items():
        shapes = {}
        for name, shape in names.items():
            m = _RUN.search(name)
            for i in range(int(m[1]), int(m[2]) + 1) if m else [None]:
                shapes[name if m is None else f'{name[:m.start()]}{i}{name[m.end():]}'] = tuple(shape)
        variants[arch] = shapes
    return dict(manifest, variants=variants)
