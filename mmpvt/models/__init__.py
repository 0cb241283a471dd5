"""mmpvt's backbones; importing this module registers them."""
from .base import DenseBackbone
from .pvt import PVT, PVTv2, convert_pvt_state_dict
from .vitdet import ViTDet, ViTDetNeck, convert_vitdet_state_dict

__all__ = ['DenseBackbone', 'PVT', 'PVTv2', 'convert_pvt_state_dict',
           'ViTDet', 'ViTDetNeck', 'convert_vitdet_state_dict']
