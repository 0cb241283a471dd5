"""mmpvt's backbones; importing this module registers them.

Each family's checkpoint reading is its ``checkpoint_format`` (``PVTv2.checkpoint_format.layout``,
``.convert``, ``.dropped_keys``; ``PVTv2.convert_state_dict`` converts).
"""
from .base import DenseBackbone
from .mvit import MViTv1, MViTv2
from .pvt import PVT, PVTv2
from .t2t_vit import T2TViT
from .vitdet import ViTDet, ViTDetNeck

__all__ = ['DenseBackbone', 'PVT', 'PVTv2', 'ViTDet', 'ViTDetNeck', 'MViTv1', 'MViTv2', 'T2TViT']
