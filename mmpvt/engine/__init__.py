"""Training-time additions to mmengine: the hooks mmpvt's tools add to every training run,
atomic checkpoint writes, the layer-wise learning-rate decay constructor for configs, and the
bfloat16 optimizer wrapper ``tools/train.py --amp`` uses on a CPU.

Importing the package registers the hooks in mmengine's root ``HOOKS`` registry, where every
default scope (``mmdet``, ``mmseg``) finds them, and ``LayerDecayOptimWrapperConstructor`` in
mmpvt's, mmdet's and mmseg's ``OPTIM_WRAPPER_CONSTRUCTORS`` registries, and
``CPUAmpOptimWrapper`` in mmengine's root ``OPTIM_WRAPPERS``: a config that a CPU run with
``--amp`` saved rebuilds wherever ``custom_imports=['mmpvt']`` is set (mmdet's own
tools/train.py included).
"""
from .amp import CPUAmpOptimWrapper, cpu_has_fast_bf16
from .atomic import atomic_write, install_atomic_checkpoints
from .hooks import InvalidLossError, InvalidLossHook, IterationSeedHook, iteration_seeds
from .optim import LayerDecayOptimWrapperConstructor

__all__ = ['CPUAmpOptimWrapper', 'InvalidLossError', 'InvalidLossHook', 'IterationSeedHook',
           'LayerDecayOptimWrapperConstructor', 'atomic_write', 'cpu_has_fast_bf16',
           'install_atomic_checkpoints', 'iteration_seeds']
