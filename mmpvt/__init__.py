"""mmpvt: Pyramid Vision Transformer backbones for MMDetection 3.x and MMSegmentation 1.x.

Importing the package is all a config needs::

    custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

It registers the backbones (``PVT``, ``PVTv2``, ``ViTDet`` with its neck ``ViTDetNeck``,
``MViTv2``, ``T2TViT``) so that they build unprefixed under the ``mmdet`` and ``mmseg``
default scopes, and as ``mmpvt.<name>`` under any scope; the layer-decay optimizer
constructor and the engine's hooks and wrappers; and makes checkpoints load safely
(``weights_only``) under torch >= 2.6; and lets a config inherit a zoo config as
``_base_ = 'mmpvt::zoo/retinanet_pvt_s.py'`` (``mmpvt.config_path(name)`` gives its path).
``mmpvt.apis`` is the inference API.
"""
from .compat import check_versions
from .version import __version__

# Before anything imports mmdet or mmseg, whose own checks fail less clearly.
check_versions()

from . import engine  # noqa: E402,F401  (registers the layer-decay optimizer constructor)
from .checkpoint import install_safe_loading  # noqa: E402
from .model_index import config_path, register_with_mmengine  # noqa: E402
from .models import PVT, MViTv2, PVTv2, T2TViT, ViTDet, ViTDetNeck  # noqa: E402

install_safe_loading()
register_with_mmengine()

__all__ = ['__version__', 'PVT', 'PVTv2', 'ViTDet', 'ViTDetNeck', 'MViTv2', 'T2TViT', 'config_path']
