"""Compiled operators behind mmpvt's layers, each with a PyTorch fallback."""
from . import dwconv_gelu

__all__ = ['dwconv_gelu']
