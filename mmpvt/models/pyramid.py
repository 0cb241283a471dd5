"""The simple feature pyramid of ViTDet (Li, Mao, Girshick, He; ECCV 2022) for columnar backbones.

A columnar backbone (ViTDet's plain ViT, T2T-ViT) makes one stride-16 map; the pyramid's scale
changes turn it into the four levels, strides 4, 8, 16 and 32, that mmpvt promises to any FPN
neck. The paper's per-level 1x1/3x3 convolutions after them are a neck (``ViTDetNeck``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm2d, nchw_maps


class SimplePyramid:
    """The scale changes of the simple pyramid, built on a host backbone.

    Level 0 (stride 4): a 2x2/2 deconvolution to ``dims / 2``, channel LayerNorm, GELU, a 2x2/2
    deconvolution to ``dims / 4``. Level 1 (stride 8): one deconvolution to ``dims / 2``.
    Level 2 is the map itself, level 3 a 2x2 max-pool; neither has layers. Only the layers of
    the requested ``levels`` are built, so that no parameter goes unused.

    The layers are registered on the host under ``MODULES`` (``scale_x4``, ``scale_x2``), so
    that checkpoint keys stay flat (``scale_x4.0.weight``), as mmpvt's layout has always had
    them. The component knows its keys (``PREFIXES``, :attr:`unbuilt_prefixes`) and keeps no
    reference to the host, which passes itself to :meth:`__call__`.

    Args:
        host: the backbone that receives the layers.
        dims: channels of the stride-16 map.
        levels: the levels to build, 0-based (the host's ``out_indices``).
        norm_eps: eps of level 0's channel LayerNorm (detectron2's 1e-6).
    """

    MODULES = ('scale_x4', 'scale_x2')  # the layers of levels 0 and 1
    PREFIXES = tuple(f'{name}.' for name in MODULES)

    def __init__(self, host: nn.Module, dims: int, levels: Sequence[int], norm_eps: float = 1e-6) -> None:
        self.levels = tuple(levels)
        self.channels = (dims // 4, dims // 2, dims, dims)
        if 0 in self.levels:
            host.scale_x4 = nn.Sequential(
                nn.ConvTranspose2d(dims, dims // 2, 2, stride=2), LayerNorm2d(dims // 2, eps=norm_eps),
                nn.GELU(), nn.ConvTranspose2d(dims // 2, dims // 4, 2, stride=2))
        if 1 in self.levels:
            host.scale_x2 = nn.Sequential(nn.ConvTranspose2d(dims, dims // 2, 2, stride=2))

    def __call__(self, host: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The maps of :attr:`levels`, in order, from the stride-16 map ``x`` ``(B, C, H, W)``."""
        return nchw_maps(self.level(host, level, x) for level in self.levels)

    @staticmethod
    def level(host: nn.Module, level: int, x: torch.Tensor) -> torch.Tensor:
        """Level ``level`` (stride ``4 * 2**level``) of the stride-16 map ``x``."""
        if level == 0:
            return host.scale_x4(x)
        if level == 1:
            return host.scale_x2(x)
        return x if level == 2 else F.max_pool2d(x, kernel_size=2, stride=2)

    @property
    def unbuilt_prefixes(self) -> tuple[str, ...]:
        """The keys of the levels not built: a checkpoint of the whole pyramid loads into a
        model of fewer levels with these skipped."""
        return tuple(prefix for level, prefix in enumerate(self.PREFIXES) if level not in self.levels)

    @classmethod
    def owns(cls, name: str) -> bool:
        """Whether parameter ``name`` (relative to the host) is one of the pyramid's."""
        return name.startswith(cls.PREFIXES)
