"""Export a config's backbone to ONNX or torch.export's ExportedProgram, and prove it equal.

    python tools/deploy/export.py CONFIG [CHECKPOINT] --format onnx|pt2 --shape H W
                                  [--dynamic] [--backbone-only] --out FILE [--cfg-options ...]

CHECKPOINT is the trained detector's or segmentor's; without it the model keeps its
initialisation (a shape-only export). Exported: the backbone (--backbone-only), or the model's
tensor mode (mmdet's and mmseg's ``_forward``: backbone, neck and head outputs before any
post-processing; a two-stage detector's up to its first NMS: the RPN's outputs and the neck's
maps, its RoI head staying in PyTorch; mmpvt.deploy.TensorMode). The
artefact is traced at 1x3xHxW; with --dynamic its height and width are symbolic (64 to 4096
pixels; more at the low end where the coarsest output needs it: 129 for RetinaNet). After writing it, the
tool runs it (onnxruntime on the CPU, or the loaded program) against the PyTorch model at the
export size and, when dynamic, at a non-square size and one that is not a multiple of 32, and
fails if any output map differs by more than 1e-4 of its scale. Exit status: 0 exported and
equal, 1 not.
"""
import argparse
import sys
from pathlib import Path

from mmengine.config import DictAction

from mmpvt import cli, deploy


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export a backbone to ONNX or .pt2 and check it against PyTorch.')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', nargs='?', help="the trained model's checkpoint (optional)")
    parser.add_argument('--format', choices=deploy.FORMATS, required=True, help='onnx or pt2 (torch.export)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), required=True,
                        help='image height and width to trace at')
    parser.add_argument('--dynamic', action='store_true',
                        help=f'height and width symbolic, {deploy.MIN_SIDE} to {deploy.MAX_SIDE} pixels')
    parser.add_argument('--backbone-only', action='store_true',
                        help='export the backbone alone (default: the tensor mode of the whole model)')
    parser.add_argument('--out', type=Path, required=True, help='the file to write')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.arch=b1')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if missing := deploy.missing_packages(args.format):
        raise cli.LaunchError(f'exporting to ONNX needs {", ".join(missing)}: pip install "mmpvt[deploy]"')
    cfg = cli.load_config(args.config, args.cfg_options)
    from mmpvt.apis import build_model
    model = build_model(cfg, args.checkpoint)
    if args.checkpoint is None:
        print('no checkpoint: the model keeps its initialisation (pass CHECKPOINT for trained weights)')
    try:
        model = model.backbone if args.backbone_only else deploy.TensorMode(model)
        artefact = deploy.export(model, (1, 3, *args.shape), args.format, args.out, args.dynamic)
        print(artefact.describe())
        sizes = deploy.check_sizes(artefact.input_shape, args.dynamic, artefact.min_side)
        results = deploy.parity(model, deploy.load_runner(artefact), sizes)
    except deploy.ExportError as error:
        raise cli.LaunchError(str(error)) from None
    worst = 0.
    for shape, errors in results:
        worst = max(worst, *errors)
        levels = ', '.join(f'{e:.1e}' for e in errors)
        print(f'parity at {"x".join(map(str, shape))}: largest difference {max(errors):.1e} of a map\'s '
              f'scale (per level: {levels})')
    if worst > deploy.PARITY_TOLERANCE:
        print(f'FAILED: the export differs from the PyTorch model by {worst:.1e} of a map\'s scale '
              f'(tolerance {deploy.PARITY_TOLERANCE:.0e})', file=sys.stderr)
        sys.exit(1)
    print(f'equal to the PyTorch model within {deploy.PARITY_TOLERANCE:.0e} of every map\'s scale')


if __name__ == '__main__':
    cli.run_tool(main)
