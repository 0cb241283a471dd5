"""Building a whole detector or segmentor from a config for the analysis tools.

tools/analysis/benchmark.py, get_flops.py and show_predictions.py share these: the model
of any mmdet or mmseg config (the config's ``default_scope`` picks the registry), a batch
of the form its ``test_step`` takes, and a FLOP counter that knows the fused attention op
the PVT backbones call.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from mmengine.config import Config
from torch import nn

from .errors import check_file


def build_model(cfg: Config, checkpoint: str | os.PathLike | None = None, device: str = 'cpu') -> nn.Module:
    """The config's model in eval mode, with ``checkpoint``'s weights if given.

    Without a checkpoint the backbone is not initialised from its ``init_cfg`` (that may be a
    download): timing and counting need no trained weights.
    """
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        load_checkpoint(model, str(check_file(checkpoint, 'checkpoint')), map_location='cpu', logger='silent')
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


def count_flops(module: nn.Module, inputs: Sequence[Any]) -> tuple[int, dict[str, int]]:
    """Multiply-adds of ``module(*inputs)`` (fvcore's convention: one per fused multiply-add).

    Returns the total and the operators the counter skipped, by name and number of calls
    (element-wise ops such as activations, which fvcore does not count by design).
    """
    from mmengine.analysis import FlopAnalyzer

    analyzer = FlopAnalyzer(module, tuple(inputs))
    analyzer.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flop_jit)
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
