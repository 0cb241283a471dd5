"""A detector or segmentor from its config, with a checkpoint that fits it.

The inference API's first step, and what tools/test.py checks and the analysis tools load:
mmengine's loader keeps the random tensors of keys a checkpoint lacks or holds in another
shape and only logs them; here a checkpoint that does not fit is refused, naming the key and
both shapes, so that no prediction comes from a half-loaded model.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mmengine.config import Config
from torch import nn

from ..errors import LaunchError, check_file


def _listed(keys: Sequence[str], limit: int = 8) -> str:
    """``keys`` for a one-line message: the first ``limit`` and how many more."""
    more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def _model_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The whole model's state dict in a checkpoint: mmengine's ``state_dict`` entry, or the
    file itself when it is a bare state dict; without the ``module.`` prefix of a model saved
    inside DistributedDataParallel (mmengine's loader strips it too)."""
    from ..checkpoint import unwrap_checkpoint

    return unwrap_checkpoint(checkpoint, ('state_dict',))


def _fitting_state(model: nn.Module, checkpoint: str | os.PathLike
                   ) -> tuple[Any, dict[str, Any], list[str], list[str]]:
    """The checkpoint's whole-model state dict fitted to ``model``, with the missing and the
    unexpected keys; raises LaunchError for an unreadable file or a tensor of another shape."""
    from ..checkpoint import CheckpointError, load_checkpoint_file

    path = check_file(checkpoint, 'checkpoint')
    name = type(model).__name__
    try:
        state = _model_state_dict(load_checkpoint_file(path))
        for prefix, module in model.named_modules():
            if hasattr(module, 'adapt_loaded_state_dict'):
                module.adapt_loaded_state_dict(state, f'{prefix}.' if prefix else '')
    except CheckpointError as exc:  # unreadable, unsafe, or refused by a backbone
        raise LaunchError(f'{path}: {exc}' if str(path) not in str(exc) else str(exc)) from exc
    own = model.state_dict()
    mismatched = [key for key, value in own.items()
                  if key in state and getattr(state[key], 'shape', None) != value.shape]
    if mismatched:
        key = mismatched[0]
        others = f'; {len(mismatched) - 1} more differ: {_listed(mismatched[1:])}' if mismatched[1:] else ''
        raise LaunchError(
            f'{path} does not fit the {name} of this config: {key} has shape '
            f'{tuple(getattr(state[key], "shape", ()))} in the checkpoint and {tuple(own[key].shape)} '
            f'in the model{others} (a checkpoint of another config or number of classes?)')
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    return path, state, missing, unexpected


def _missing_keys_error(path: Any, missing: Sequence[str], model: nn.Module,
                        state: Mapping[str, Any]) -> LaunchError:
    if hasattr(model, 'backbone') and state and not any(key.startswith('backbone.') for key in state):
        # A detector's or segmentor's checkpoint holds its backbone under 'backbone.'.
        return LaunchError(
            f'{path} holds no backbone.* tensors: it is a backbone or classification checkpoint (ImageNet '
            f'weights: timm\'s, the authors\'), not one of this {type(model).__name__}. Such weights start a '
            f'training run: --cfg-options model.backbone.init_cfg.checkpoint={path} (any layout the family '
            'reads; tools/convert_checkpoint.py converts one ahead). Testing and inference need the '
            'checkpoint a training run wrote (work_dirs/<config>/epoch_*.pth or iter_*.pth)')
    return LaunchError(
        f'{path} lacks {len(missing)} of the {len(model.state_dict())} tensors of the '
        f'{type(model).__name__} of this config ({_listed(missing)}); they would stay random '
        '(a checkpoint of another config?)')


def check_checkpoint_fits(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Raises LaunchError unless ``checkpoint`` holds every tensor of ``model``, each of its shape.

    What tools/test.py asks before mmengine's runner loads the checkpoint: mmengine's loader
    logs missing tensors and tensors of another shape, then evaluates the model with those
    tensors left random, which prints a metrics table of a model nobody trained. Nothing is
    loaded into ``model``; the messages are :func:`load_model_checkpoint`'s.
    """
    from mmengine.model import is_model_wrapper

    model = model.module if is_model_wrapper(model) else model
    path, state, missing, _ = _fitting_state(model, checkpoint)
    if missing:
        raise _missing_keys_error(path, missing, model, state)


def load_model_checkpoint(model: nn.Module, checkpoint: str | os.PathLike,
                          missing_keys: str = 'error') -> dict[str, list[str]]:
    """Loads a whole-model checkpoint into ``model`` for an analysis tool, refusing wrong ones.

    A tensor whose shape differs from the model's, anywhere in the model, raises LaunchError
    naming the key and both shapes (mmengine's loader would only log it and keep the random
    tensor). Backbones that fit tensors on load do so first (PVT v1 position embeddings of
    another grid are resized, as on every load path). The tensors loaded, the missing and
    the unexpected keys are then logged in one line each, as the backbone loader logs them.

    Args:
        missing_keys: what a checkpoint lacking some of the model's tensors gets: 'error'
            raises LaunchError naming them (those tensors would stay randomly initialised,
            so predictions drawn from the model would be meaningless); 'warn' logs the
            warning only and loads the rest (timing does not depend on the values).
            Unexpected keys (in the checkpoint, not in the model) are logged as a warning.

    Returns:
        ``{'missing': [...], 'unexpected': [...]}``, the keys of each kind.
    """
    from mmengine.logging import MMLogger, print_log

    if missing_keys not in ('error', 'warn'):
        raise ValueError(f"missing_keys must be 'error' or 'warn', got {missing_keys!r}")
    path, state, missing, unexpected = _fitting_state(model, checkpoint)
    name = type(model).__name__
    logger = MMLogger.get_current_instance()
    print_log(f'{name}: loaded {len(state) - len(unexpected)} tensors from {path}', logger)
    print_log(f'{name}: missing keys: {", ".join(missing) if missing else "none"}', logger,
              level=logging.WARNING if missing else logging.INFO)
    print_log(f'{name}: unexpected keys: {", ".join(unexpected) if unexpected else "none"}', logger,
              level=logging.WARNING if unexpected else logging.INFO)
    if missing and missing_keys == 'error':
        raise _missing_keys_error(path, missing, model, state)
    model.load_state_dict(state, strict=False)
    return {'missing': missing, 'unexpected': unexpected}


def build_model(cfg: Config, checkpoint: str | os.PathLike | None = None, device: str = 'cpu',
                missing_keys: str = 'error') -> nn.Module:
    """The config's model in eval mode, with ``checkpoint``'s weights if given.

    The checkpoint loads through :func:`load_model_checkpoint`: a tensor of another shape is
    refused, and a checkpoint lacking some of the model's tensors is refused too unless
    ``missing_keys='warn'`` (benchmark.py: the time does not depend on the values).
    Without a checkpoint the backbone is not initialised from its ``init_cfg`` (that may be a
    download): timing and counting need no trained weights.
    """
    from mmengine.registry import MODELS, init_default_scope

    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        load_model_checkpoint(model, checkpoint, missing_keys)
    return model.to(device).eval()
