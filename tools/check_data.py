"""Read every image and annotation a config trains and evaluates on, and list the problems.

    python tools/check_data.py CONFIG [--split train val] [--workers N] [--out report.json]
                               [--cfg-options KEY=VALUE ...]

Every image must decode; every annotation's image and category must exist in the config's
classes; boxes must lie inside their images with a positive size; label maps may hold only
classes and the ignore index. A table of problems by kind with the first files of each is
printed last; the exit status is 1 if a problem would stop a run.
"""
import argparse
import json

from mmengine.config import DictAction

from mmpvt import cli
from mmpvt.cli.dataset_scan import check_datasets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Check the datasets of a config before training.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--split', nargs='+', choices=['train', 'val', 'test'], default=['train', 'val'],
                        help='which dataloaders\' datasets to read (default: train val)')
    parser.add_argument('--workers', type=int, default=1, help='processes that decode images (default 1)')
    parser.add_argument('--out', help='also write the report as JSON to this file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. train_dataloader.dataset.data_root=/data/coco/')
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.workers < 1:
        raise cli.LaunchError(f'--workers must be at least 1, got {args.workers}')
    cfg = cli.load_config(args.config, args.cfg_options)
    cli.check_data(cfg, tuple(args.split))  # a missing directory: the layout, not a list of files
    report = check_datasets(cfg, args.split, workers=args.workers)
    print(report.summary(), flush=True)
    if args.out:
        with open(args.out, 'w', encoding='utf-8') as f:
            json.dump(report.to_dict(), f, indent=1)
    return 1 if report.blocking else 0


if __name__ == '__main__':
    cli.run_tool(main)
