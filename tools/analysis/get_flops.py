"""FLOPs and parameters of a config's whole model and of its backbone.

    python tools/analysis/get_flops.py CONFIG [--shape H W] [--cfg-options ...]

FLOPs are multiply-adds of one forward pass on one image of H x W (fvcore's convention,
as in the PVT papers' tables), through the network up to the heads' raw outputs: box
decoding and NMS are not counted. mmpvt's fused depthwise-conv + GELU kernel counts as the
convolution it replaces, so the numbers do not depend on whether it was built. The default
shape is the config's test size (1333 x 800 for COCO configs, the crop for ADE20K ones).
"""
import argparse
import sys

import torch
from mmengine.config import DictAction
from torch import nn

from mmpvt.apis import build_model
from mmpvt.cli import LaunchError, load_config, quiet_third_party_warnings
from mmpvt.cli.analysis import count_flops, count_parameters, default_shape, dummy_batch


class TensorForward(nn.Module):
    """``model(inputs, data_samples, mode='tensor')`` as a one-argument module for tracing."""

    def __init__(self, model: nn.Module, data_samples: list) -> None:
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model(inputs, self.data_samples, mode='tensor')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Count FLOPs and parameters of a model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), help='input size')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)
    height, width = args.shape or default_shape(cfg)
    model = build_model(cfg)
    proposals = getattr(model, 'rpn_head', None)
    if hasattr(proposals, 'init_proposal_bboxes'):
        # Sparse R-CNN's learned proposals: build_model leaves them uninitialised, and random
        # boxes have negative sizes that RoIAlign refuses; their initial values are whole images.
        proposals.init_weights()
    with torch.no_grad():
        data = model.data_preprocessor(dummy_batch(cfg, height, width), False)
        inputs = data['inputs']
        rows = []
        for name, module, module_inputs in (
                ('model', TensorForward(model, data['data_samples']), (inputs,)),
                ('backbone', model.backbone, (inputs,))):
            flops, skipped = count_flops(module, module_inputs)
            rows.append((name, type(model if name == 'model' else module).__name__, flops,
                         count_parameters(module), skipped))
    shape = 'x'.join(str(s) for s in inputs.shape[1:])
    print(f'input: 1x{shape} (padded from {height}x{width})')
    print('| part | type | GFLOPs | FLOPs | params (M) | params |')
    print('|---|---|---|---|---|---|')
    for name, kind, flops, params, _ in rows:
        print(f'| {name} | {kind} | {flops / 1e9:.2f} | {flops} | {params / 1e6:.2f} | {params} |')
    skipped = sorted(rows[0][4].items())
    if skipped:
        print('not counted (no multiply-adds by fvcore\'s convention, or no counter): '
              + ', '.join(f'{op} x{n}' for op, n in skipped))


if __name__ == '__main__':
    quiet_third_party_warnings()  # before anything reads a config
    try:
        main()
    except LaunchError as exc:
        sys.exit(f'error: {exc}')
