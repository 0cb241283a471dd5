"""mmpvt's backbones; importing this module registers them."""
from .pvt import PVT, PVTv2, convert_pvt_state_dict

__all__ = ['PVT', 'PVTv2', 'convert_pvt_state_dict']
