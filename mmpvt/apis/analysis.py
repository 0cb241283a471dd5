"""Building a whole detector or segmentor from a config for the analysis tools.

tools/analysis/benchmark.py, get_flops.py and show_predictions.py share these: the model
of any mmdet or mmseg config (the config's ``default_scope`` picks the registry) with a
checkpoint's weights that never loads partly (``load_model_checkpoint``), a batch
of the form its ``test_step`` takes, and a FLOP counter that knows the fused attention op
the PVT backbones call and mmpvt's fused depthwise-conv + GELU kernel.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from mmengine.config import Config
from torch import nn

from .errors import LaunchError, check_file


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


def _missing_keys_error(path: Any, missing: Sequence[str], model: nn.Module) -> LaunchError:
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
    path, _, missing, _ = _fitting_state(model, checkpoint)
    if missing:
        raise _missing_keys_error(path, missing, model)


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
        raise _missing_keys_error(path, missing, model)
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


def dummy_batch(cfg: Config, height: int, width: int, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
    """A batch of random ``height x width`` images as a dataloader would give it to ``test_step``.

    The images are uint8 noise; the data samples carry the metadata the detector or
    segmentor reads when it post-processes predictions (image shapes, no rescaling).
    """
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
              for _ in range(batch_size)]
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                scale_factor=(1.0, 1.0), flip=False, flip_direction=None)
    if cfg.get('default_scope') == 'mmseg':
        from mmseg.structures import SegDataSample as DataSample
    else:
        from mmdet.structures import DetDataSample as DataSample
    return dict(inputs=inputs, data_samples=[DataSample(metainfo=dict(meta)) for _ in range(batch_size)])


def count_parameters(module: nn.Module) -> int:
    """The number of parameters of ``module`` (each shared tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of ``scaled_dot_product_attention``: q @ k^T, then the weights @ v."""
    from mmengine.analysis.jit_handles import get_shape
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * q[-1] + batch * q[-2] * k[-2] * v[-1]


def _dwconv_gelu_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of ``mmpvt::dwconv_gelu``: those of the 3x3 depthwise convolution it fuses.

    Counted as the counter counts that convolution on the layer path (9 per output element;
    fvcore counts no bias, and GELU is element-wise), so that a model's FLOPs do not depend
    on whether the kernel was built. The op's inputs are ``(h, height, width, taps, ...)``
    with ``h`` of shape ``(B, H*W, C)``.
    """
    from mmengine.analysis.jit_handles import conv_flop_count, get_shape
    batch, _, channels = get_shape(inputs[0])
    height, width = inputs[1].toIValue(), inputs[2].toIValue()
    return conv_flop_count([batch, channels, height, width], [channels, 1, 3, 3],
                           [batch, channels, height, width])


def count_flops(module: nn.Module, inputs: Sequence[Any]) -> tuple[int, dict[str, int]]:
    """Multiply-adds of ``module(*inputs)`` (fvcore's convention: one per fused multiply-add).

    mmpvt's fused ops count as the layers they replace. Returns the total and the operators
    the counter skipped, by name and number of calls (element-wise ops such as activations,
    which fvcore does not count by design).
    """
    from mmengine.analysis import FlopAnalyzer

    analyzer = FlopAnalyzer(module, tuple(inputs))
    analyzer.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flop_jit)
    analyzer.set_op_handle('mmpvt::dwconv_gelu', _dwconv_gelu_flop_jit)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
    return int(analyzer.total()), dict(analyzer.unsupported_ops())


def default_shape(cfg: Config) -> tuple[int, int]:
    """The input size (H, W) a config tests at, for tools given no ``--shape``.

    mmseg configs: their training crop (``crop_size``). mmdet configs: the first ``Resize``
    scale of the test pipeline, read as (W, H) like mmdet does (1333 x 800 for COCO).
    """
    if cfg.get('default_scope') == 'mmseg' and cfg.get('crop_size'):
        height, width = cfg.crop_size
        return int(height), int(width)
    pipeline = (cfg.get('test_dataloader') or {}).get('dataset', {}).get('pipeline', [])
    for step in pipeline:
        if 'Resize' in str(step.get('type')) and isinstance(step.get('scale'), (tuple, list)):
            width, height = step['scale']
            return int(height), int(width)
    return 800, 1333
