"""mmpvt's backbones; importing this module registers them."""
from .base import DenseBackbone
from .mvit import MViTv2, convert_mvit_state_dict
from .pvt import PVT, PVTv2, convert_pvt_state_dict
from .t2t_vit import T2TViT, convert_t2t_state_dict
from .vitdet import ViTDet, ViTDetNeck, convert_vitdet_state_dict

__all__ = ['DenseBackbone', 'PVT', 'PVTv2', 'convert_pvt_state_dict',
           'ViTDet', 'ViTDetNeck', 'convert_vitdet_state_dict',
           'MViTv2', 'convert_mvit_state_dict',
           'T2TViT', 'convert_t2t_state_dict']
