"""Run a trained detector or segmentor on one's own images: a drawn PNG per image and a JSON.

    python tools/infer.py INPUT CONFIG CHECKPOINT [--out-dir DIR] [--score-thr T] [--device D]
                          [--batch-size B] [--backend onnxruntime|torch.export --model FILE]
                          [--cfg-options KEY=VALUE ...]

INPUT is an image, a folder (its images) or a glob in quotes ('photos/*.jpg'). Any mmdet or
mmseg config runs, through mmdet's DetInferencer or mmseg's MMSegInferencer (the config's
default_scope decides). DIR receives one PNG per image, named after it (boxes or masks with
class names and scores; segmentation overlaid on the image) and predictions.json: per image
its size and the detections scoring at least T (class, score, box, mask as COCO RLE) or the
predicted classes with their share of the pixels. A checkpoint of another model (a key or a
shape that does not fit) is refused, naming the key and the shapes. With --backend, an export
of the model's tensor mode (tools/deploy/export.py without --backbone-only) runs the backbone,
neck and head on the CPU, between mmdet's or mmseg's own pre- and post-processing.
"""
import argparse
import json
import sys
from pathlib import Path

import cv2
import mmcv
import torch
from mmengine.config import DictAction
from mmengine.utils import ProgressBar

from mmpvt import cli
from mmpvt.apis import ImagePredictor, find_images, output_names
from mmpvt.checkpoint import CheckpointError
from mmpvt.deploy import ExportError

# backend -> the exported file's suffix
BACKENDS = {'pytorch': None, 'onnxruntime': '.onnx', 'torch.export': '.pt2'}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Predict on images with a trained model; draw and record.')
    parser.add_argument('input', help="an image, a folder of images, or a glob in quotes ('photos/*.jpg')")
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file of that config')
    parser.add_argument('--out-dir', type=Path, default=Path('outputs'),
                        help='where the PNGs and predictions.json go (default: outputs)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections scoring lower are neither drawn nor recorded (default: 0.3)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda or cuda:N (default: cuda when there is one)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward pass (default: 1)')
    parser.add_argument('--backend', choices=BACKENDS, default='pytorch',
                        help='what runs the backbone, neck and head: pytorch (default), or an export of '
                             "the model's tensor mode (tools/deploy/export.py) given as --model: "
                             'onnxruntime (.onnx) or torch.export (.pt2); pre- and post-processing stay '
                             "mmdet's or mmseg's")
    parser.add_argument('--model', type=Path,
                        help='the exported file, for --backend onnxruntime or torch.export')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.test_cfg.nms.iou_threshold=0.6')
    return parser.parse_args()


def read_size(image: Path) -> tuple[int, int]:
    """(height, width) of an image file that decodes; LaunchError naming it otherwise.

    Decoded as the test pipeline's LoadImageFromFile decodes it (mmcv, OpenCV), which
    refuses a truncated JPEG that cv2.imread would return in part.
    """
    array = mmcv.imfrombytes(image.read_bytes())
    if array is None:
        raise cli.LaunchError(f'cannot read image {image}: not an image file, or a damaged one')
    return array.shape[:2]


def main() -> None:
    args = parse_args()
    if args.batch_size < 1:
        raise cli.LaunchError(f'--batch-size must be >= 1, got {args.batch_size}')
    if not 0 <= args.score_thr <= 1:
        raise cli.LaunchError(f'--score-thr must be in [0, 1], got {args.score_thr}')
    suffix = BACKENDS[args.backend]
    if suffix and (args.model is None or args.model.suffix != suffix):
        raise cli.LaunchError(f'--backend {args.backend} runs an exported {suffix} file: pass it as --model '
                              f'(tools/deploy/export.py writes it); got {args.model}')
    if args.model is not None and not suffix:
        raise cli.LaunchError('--model is an exported file for --backend onnxruntime or torch.export')
    if suffix and args.device != 'cpu':
        raise cli.LaunchError(f'--backend {args.backend} runs on the CPU here: pass --device cpu')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise cli.LaunchError(f'--device {args.device}: no CUDA device here; use --device cpu')
    images, root = find_images(args.input)
    # Fail before the model loads rather than halfway through a folder.
    unreadable = [image for image in images if not cv2.haveImageReader(str(image))]
    if unreadable:
        raise cli.LaunchError(f'cannot read image {unreadable[0]}: not an image file'
                               + (f' ({len(unreadable) - 1} more like it)' if len(unreadable) > 1 else ''))
    cfg = cli.load_config(args.config, args.cfg_options)
    checkpoint = cli.check_file(args.checkpoint, 'checkpoint')
    try:
        predictor = ImagePredictor(cfg, checkpoint, args.device, args.score_thr, args.model)
    except (CheckpointError, FileNotFoundError, ExportError) as exc:
        raise cli.LaunchError(str(exc)) from exc

    names = output_names(images, root)
    records = []
    progress = ProgressBar(len(images), file=sys.stderr)
    for start in range(0, len(images), args.batch_size):
        batch = images[start:start + args.batch_size]
        try:
            sizes = [read_size(image) for image in batch]
        except cli.LaunchError:
            sys.stderr.write('\n')  # the error on a line of its own, after the progress bar
            raise
        try:
            predicted = list(predictor(batch))
        except ExportError as exc:  # an exported file that is not this model's tensor mode
            sys.stderr.write('\n')
            raise cli.LaunchError(str(exc)) from exc
        for image, name, (height, width), (drawing, record) in zip(batch, names[start:], sizes, predicted):
            out_file = args.out_dir / name
            out_file.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out_file), cv2.cvtColor(drawing, cv2.COLOR_RGB2BGR))
            records.append(dict(image=str(image), height=height, width=width, drawing=name, **record))
            progress.update()
    summary = dict(config=str(args.config), checkpoint=str(checkpoint), task=predictor.task,
                   classes=predictor.classes, images=records)
    if predictor.task == 'detection':
        summary['score_thr'] = args.score_thr
    json_file = args.out_dir / 'predictions.json'
    json_file.write_text(json.dumps(summary, indent=1))
    drawings = f'{len(records)} drawing' + ('s' if len(records) != 1 else '')
    print(f'\nwrote {drawings} and {json_file} ({predictor.task}) to {args.out_dir}/')


if __name__ == '__main__':
    cli.run_tool(main)
