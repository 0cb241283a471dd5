"""Training-time additions to mmengine: the hooks mmpvt's tools add to every training run.

Importing the package registers them in mmengine's root ``HOOKS`` registry, where every
default scope (``mmdet``, ``mmseg``) finds them.
"""
from .hooks import IterationSeedHook, iteration_seeds

__all__ = ['IterationSeedHook', 'iteration_seeds']
