"""mmpvt: Pyramid Vision Transformer backbones for MMDetection 3.x and MMSegmentation 1.x.

Importing the package is all a config needs::

    custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

It registers ``PVT`` and ``PVTv2`` so that they build unprefixed under the ``mmdet`` and
``mmseg`` default scopes, and as ``mmpvt.PVT`` / ``mmpvt.PVTv2`` under any scope.
"""
from .compat import check_versions
from .version import __version__

# Before anything imports mmdet or mmseg, whose own checks fail less clearly.
check_versions()

from . import engine  # noqa: E402,F401  (registers the layer-decay optimizer constructor)
from .checkpoint import install_safe_loading  # noqa: E402
from .models import PVT, PVTv2, convert_pvt_state_dict  # noqa: E402

install_safe_loading()

__all__ = ['__version__', 'PVT', 'PVTv2', 'convert_pvt_state_dict']
