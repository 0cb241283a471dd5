"""Training curves of a run as a PNG, read from the scalars mmengine logs in its work dir.

    python tools/analysis/plot_curves.py WORK_DIR [--keys loss coco/bbox_mAP] [--out FILE.png]

mmengine writes one JSON line per logged step to ``WORK_DIR/<timestamp>/vis_data/scalars.json``
(the run's ``<timestamp>.json`` log holds the same). All runs in the work dir are read in
time order, so a resumed run continues its curve. Training values are plotted against the
iteration; validation metrics against the iteration they were measured at. Without
``--keys``: the loss and every mAP / mIoU metric found.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_METRICS = ('bbox_mAP', 'segm_mAP', 'mIoU', 'aAcc')


def read_scalars(work_dir: Path) -> tuple[list[dict], list[dict]]:
    """The training and validation records of all runs under ``work_dir``, oldest run first."""
    files = sorted(work_dir.glob('*/vis_data/scalars.json'))
    if not files:
        files = sorted(p for p in work_dir.glob('*/*.json') if p.stem == p.parent.name)
    if not files:
        raise SystemExit(f'error: no logs in {work_dir}: expected '
                         f'{work_dir}/<timestamp>/vis_data/scalars.json (mmengine writes it while training)')
    train, val = [], []
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                (train if 'lr' in record or 'iter' in record else val).append(record)
    # Epoch-based runs log validation at the epoch: place it at that epoch's last iteration.
    last_iter_of_epoch: dict[int, int] = {}
    for record in train:
        if 'epoch' in record:
            last_iter_of_epoch[record['epoch']] = record.get('iter', record['step'])
    for record in val:
        step = record['step']
        record['x'] = last_iter_of_epoch.get(step, step) if last_iter_of_epoch else step
    for record in train:
        record['x'] = record.get('iter', record['step'])
    return train, val


def plot(train: list[dict], val: list[dict], keys: list[str], out: Path, title: str) -> list[str]:
    """Draws one panel per key; returns the keys that had values."""
    found = [k for k in keys if any(k in r for r in train + val)]
    if not found:
        raise SystemExit(f'error: none of the keys {keys} is in the logs; logged keys: '
                         + ', '.join(sorted({k for r in train + val for k in r} - {'x', 'step'})))
    fig, axes = plt.subplots(1, len(found), figsize=(4.5 * len(found), 3.6), squeeze=False)
    for ax, key in zip(axes[0], found):
        records = [r for r in train if key in r] or [r for r in val if key in r]
        xs, ys = [r['x'] for r in records], [r[key] for r in records]
        ax.plot(xs, ys, marker='o' if len(xs) < 30 else None, markersize=4)
        ax.set_title(key)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description='Plot training curves of an mmengine run.')
    parser.add_argument('work_dir', type=Path, help='the run\'s work dir')
    parser.add_argument('--keys', nargs='+', help='logged keys to plot (default: loss and the main metrics)')
    parser.add_argument('--out', type=Path, help='PNG file (default: WORK_DIR/curves.png)')
    args = parser.parse_args()
    if not args.work_dir.is_dir():
        sys.exit(f'error: work dir not found: {args.work_dir}')
    train, val = read_scalars(args.work_dir)
    keys = args.keys or ['loss'] + sorted({k for r in val for k in r
                                           if k.rsplit('/', 1)[-1] in DEFAULT_METRICS})
    out = args.out or args.work_dir / 'curves.png'
    found = plot(train, val, keys, out, args.work_dir.name)
    print(f'wrote {out} ({", ".join(found)})')


if __name__ == '__main__':
    main()
