"""mmpvt's registries and the decorator that makes its backbones visible to mmdet and mmseg.

mmpvt owns a child of mmengine's root ``MODELS`` registry under the scope ``mmpvt``, so
``type='mmpvt.PVTv2'`` resolves from any default scope. An unprefixed name is looked up
only in the current scope's registry and its parents, never in siblings; to let a plain
``type='PVTv2'`` build under ``default_scope='mmdet'`` and ``'mmseg'``, each backbone is
also registered into those packages' registries when they are installed. Neither package
is required: mmpvt imports with only one of them (or none) present.
"""
from __future__ import annotations

import importlib
from typing import TypeVar

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmpvt', locations=['mmpvt.models'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry('optimizer wrapper constructor',
                                      parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, scope='mmpvt',
                                      locations=['mmpvt.engine'])

# The downstream packages whose registries receive mmpvt's models, by import path.
DOWNSTREAM_REGISTRIES = ('mmdet.registry', 'mmseg.registry')

T = TypeVar('T', bound=type)


def _downstream_model_registries(name: str = 'MODELS') -> list[Registry]:
    """The ``MODELS`` (or ``name``) registries of the installed downstream packages."""
    registries = []
    for module_name in DOWNSTREAM_REGISTRIES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name.split('.')[0]:
                continue  # that package is not installed
            raise
        registries.append(getattr(module, name))
    return registries


def register_model(cls: T) -> T:
    """Registers ``cls`` in mmpvt's registry and in every installed downstream one."""
    MODELS.register_module(module=cls)
    for registry in _downstream_model_registries():
        registry.register_module(module=cls)
    return cls


def register_optim_wrapper_constructor(cls: T) -> T:
    """Registers an optimizer-wrapper constructor in mmpvt's registry and every downstream one."""
    OPTIM_WRAPPER_CONSTRUCTORS.register_module(module=cls)
    for registry in _downstream_model_registries('OPTIM_WRAPPER_CONSTRUCTORS'):
        registry.register_module(module=cls)
    return cls


def downstream_scopes() -> list[str]:
    """Scopes (``mmdet``, ``mmseg``) in which mmpvt's models build without a prefix."""
    return [registry.scope for registry in _downstream_model_registries()]
