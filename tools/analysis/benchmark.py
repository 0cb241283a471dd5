"""Inference speed of a config's whole model: images per second and latency, after warm-up.

    python tools/analysis/benchmark.py CONFIG [CHECKPOINT] [--shape H W] [--iters N]
                                       [--warmup N] [--batch-size B] [--device cpu|cuda]

Each timed iteration runs ``model.test_step`` on a batch of random H x W images: data
preprocessing, the network and post-processing (box decoding and NMS, or resizing the
segmentation to the input size). Without a checkpoint the weights are random, which
changes only how many boxes reach NMS. A checkpoint with a tensor of another shape is
refused; one that lacks some of the model's tensors is timed, with a warning naming them.
"""
import argparse
import statistics
import sys
import time

import torch
from mmengine.config import DictAction

from mmpvt.apis import build_model
from mmpvt.cli import LaunchError, load_config, quiet_third_party_warnings
from mmpvt.cli.analysis import default_shape, dummy_batch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Measure inference speed of a model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', nargs='?', help='checkpoint file (default: random weights)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), help='input size')
    parser.add_argument('--iters', type=int, default=20, help='timed iterations')
    parser.add_argument('--warmup', type=int, default=5, help='untimed iterations first')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        raise LaunchError('--iters and --batch-size must be >= 1 and --warmup >= 0')
    cfg = load_config(args.config, args.cfg_options)
    height, width = args.shape or default_shape(cfg)
    model = build_model(cfg, args.checkpoint, args.device, missing_keys='warn')
    batch = dummy_batch(cfg, height, width, args.batch_size)
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            sync()
            start = time.perf_counter()
            model.test_step(batch)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    threads = f', {torch.get_num_threads()} threads' if args.device == 'cpu' else ''
    print(f'{type(model).__name__} on {args.device}{threads}, batch {args.batch_size} of {height}x{width}, '
          f'{args.iters} iterations after {args.warmup} warm-up')
    print(f'images/s: {args.batch_size * len(times) / sum(times):.2f}')
    print(f'latency per batch (ms): median {1e3 * statistics.median(times):.1f}, '
          f'mean {1e3 * statistics.mean(times):.1f}, min {1e3 * min(times):.1f}')


if __name__ == '__main__':
    quiet_third_party_warnings()  # before anything reads a config
    try:
        main()
    except LaunchError as exc:
        sys.exit(f'error: {exc}')
