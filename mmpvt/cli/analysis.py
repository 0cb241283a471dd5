"""What the analysis tools share beside the model (``mmpvt.apis.build_model``).

tools/analysis/benchmark.py, get_flops.py and show_predictions.py: a batch of the form a
model's ``test_step`` takes, a parameter count, the input size a config tests at, and a FLOP
counter that knows the fused attention op the backbones call and mmpvt's fused depthwise-conv
+ GELU kernel.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from mmengine.config import Config
from torch import nn


def dummy_batch(cfg: Config, height: int, width: int, batch_size: int = 1, seed: int = 0) -> dict[str, Any]:
    """A batch of random ``height x width`` images as a dataloader would give it to ``test_step``.

    The images are uint8 noise; the data samples carry the metadata the detector or
    segmentor reads when it post-processes predictions (image shapes, no rescaling), and a
    detector's no ground-truth boxes (Sparse R-CNN's tensor mode unpacks them).
    """
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
              for _ in range(batch_size)]
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                scale_factor=(1.0, 1.0), flip=False, flip_direction=None)
    if cfg.get('default_scope') == 'mmseg':
        from mmseg.structures import SegDataSample
        return dict(inputs=inputs, data_samples=[SegDataSample(metainfo=dict(meta))
                                                 for _ in range(batch_size)])
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    samples = [DetDataSample(metainfo=dict(meta)) for _ in range(batch_size)]
    for sample in samples:
        sample.gt_instances = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
    return dict(inputs=inputs, data_samples=samples)


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
