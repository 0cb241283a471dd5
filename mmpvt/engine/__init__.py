"""Training-time additions to mmengine: the hooks mmpvt's tools add to every training run,
atomic checkpoint writes, and the layer-wise learning-rate decay constructor for configs.

Importing the package registers the hooks in mmengine's root ``HOOKS`` registry, where every
default scope (``mmdet``, ``mmseg``) finds them, and ``LayerDecayOptimWrapperConstructor`` in
mmpvt's, mmdet's and mmseg's ``OPTIM_WRAPPER_CONSTRUCTORS`` registries.
"""
from .atomic import atomic_write, install_atomic_checkpoints
from .hooks import InvalidLossError, InvalidLossHook, IterationSeedHook, iteration_seeds
from .optim import LayerDecayOptimWrapperConstructor

__all__ = ['InvalidLossError', 'InvalidLossHook', 'IterationSeedHook', 'LayerDecayOptimWrapperConstructor',
           'atomic_write', 'install_atomic_checkpoints', 'iteration_seeds']
