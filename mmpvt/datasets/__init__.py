"""Datasets made by mmpvt itself: the synthetic shapes set the demo and the tests train on.

Nothing is imported eagerly, so ``python -m mmpvt.datasets.synthetic`` runs without a
double import and ``import mmpvt`` stays as light as before.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ['synthetic']


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
