"""Layer-wise learning-rate decay for every mmpvt backbone, as one optimizer-wrapper constructor.

Fine-tuning a pre-trained transformer, the layers near the input change least: ViTDet and
MAE scale block ``i``'s learning rate by ``rate ** (num_layers + 1 - layer_id)``, where
``layer_id`` is 0 for the patch and position embeddings, ``i + 1`` for block ``i`` and
``num_layers + 1`` (scale 1) for what follows the blocks. Each mmpvt backbone numbers its own
parameters (``DenseBackbone.layer_id`` and ``num_layers``); everything outside the backbone
(neck, heads) keeps scale 1. In a config::

    optim_wrapper = dict(
        constructor='LayerDecayOptimWrapperConstructor',
        optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
        paramwise_cfg=dict(layer_decay_rate=0.7, no_decay_names=('pos_embed', ),
                           norm_decay_mult=0.))

The name builds unprefixed under ``default_scope='mmdet'`` and ``'mmseg'`` (and as
``mmpvt.LayerDecayOptimWrapperConstructor`` under any scope).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from ..models.base import DenseBackbone
from ..registry import register_optim_wrapper_constructor


def backbones_of(model: nn.Module) -> dict[str, DenseBackbone]:
    """The mmpvt backbones in ``model`` by their prefix ('' when the model is one itself).

    Only the outermost: a backbone inside another one is numbered by the outer one.
    """
    found: dict[str, DenseBackbone] = {}
    for name, module in model.named_modules():
        if isinstance(module, DenseBackbone) and not any(
                name == p or name.startswith(p + '.') or p == '' for p in found):
            found[name] = module
    return found


@register_optim_wrapper_constructor
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor plus layer-wise lr decay over an mmpvt backbone.

    ``paramwise_cfg`` takes every option of ``DefaultOptimWrapperConstructor``
    (``custom_keys``, ``norm_decay_mult``, ``bias_decay_mult``, ...), applied first, and:

    - ``layer_decay_rate`` (required, in (0, 1]): the backbone parameter of layer ``l``
      gets its lr multiplied by ``rate ** (num_layers + 1 - l)``; parameters outside the
      backbone keep theirs.
    - ``no_decay_names`` (optional): regular expressions searched in each parameter's full
      name (``backbone.stages.0.pos_embed``); a parameter any of them matches gets weight
      decay 0, wherever it is in the model. E.g. ``('norm', 'pos_embed', 'rel_pos',
      r'\\.bias$')`` for MAE-style fine-tuning; ViTDet's B/L recipes exempt norms (by type:
      ``norm_decay_mult=0.``) and ``pos_embed`` only, and ViT-H exempts nothing.

    The model must hold an mmpvt backbone (a ``DenseBackbone``): as ``model.backbone`` in a
    detector or segmentor, or the model itself.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        cfg = self.paramwise_cfg
        if 'layer_decay_rate' not in cfg:
            raise ValueError('LayerDecayOptimWrapperConstructor needs paramwise_cfg.layer_decay_rate '
                             '(e.g. 0.7 for ViTDet-B); without layer decay use the default constructor')
        rate = cfg['layer_decay_rate']
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f'paramwise_cfg.layer_decay_rate must be a number in (0, 1], got {rate!r}')
        if self.base_lr is None:
            raise ValueError('layer decay scales the optimizer\'s lr, but optimizer.lr is not set')
        names = cfg.get('no_decay_names', ())
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(f'paramwise_cfg.no_decay_names must be a list of patterns, got {names!r}')
        if names and self.base_wd is None:
            raise ValueError('no_decay_names needs optimizer.weight_decay to be set')
        self.layer_decay_rate = float(rate)
        self.no_decay_patterns = [re.compile(p) for p in names]

    def lr_scale(self, backbone: DenseBackbone, name: str) -> float:
        """The lr factor of parameter ``name`` (relative to ``backbone``): rate ** (L + 1 - id)."""
        return self.layer_decay_rate ** (backbone.num_layers + 1 - backbone.layer_id(name))

    def add_params(self, params: list[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module: int | float | None = None) -> None:
        """The default constructor's parameter groups, then the layer decay over the backbone.

        The base class calls this method again for every submodule (with a prefix); those
        calls only collect groups, and the decay is applied once, on the whole model.
        """
        if prefix:
            super().add_params(params, module, prefix, is_dcn_module)
            return
        start = len(params)
        super().add_params(params, module, prefix, is_dcn_module)
        self._apply_layer_decay(params[start:], module)

    def _apply_layer_decay(self, groups: list[dict[str, Any]], model: nn.Module) -> None:
        backbones = backbones_of(model)
        if not backbones:
            raise TypeError(f'LayerDecayOptimWrapperConstructor: {type(model).__name__} holds no mmpvt '
                            'backbone (DenseBackbone) whose layers it could number')
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        for group in groups:
            (param,) = group['params']  # the base class makes one group per parameter
            name = names[id(param)]
            scale = 1.
            for prefix, backbone in backbones.items():
                if not prefix:
                    scale = self.lr_scale(backbone, name)
                elif name.startswith(prefix + '.'):
                    scale = self.lr_scale(backbone, name[len(prefix) + 1:])
            group['lr'] = group.get('lr', self.base_lr) * scale
            if any(p.search(name) for p in self.no_decay_patterns):
                group['weight_decay'] = 0.
        for prefix, backbone in backbones.items():
            rate, layers = self.layer_decay_rate, backbone.num_layers
            print_log(f'layer decay {rate} over {prefix or "the model"} ({type(backbone).__name__}, '
                      f'{layers} layers): lr x {rate ** (layers + 1):.3g} at layer 0 to x 1 after the '
                      'last block', logger='current')
