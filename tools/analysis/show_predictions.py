"""Predictions of a trained model drawn on the first images of its test set, as one PNG grid.

    python tools/analysis/show_predictions.py CONFIG CHECKPOINT [--num 8] [--score-thr 0.3]
                                              [--cols 4] [--out FILE.png]

Detectors: a box per prediction above the score threshold, labelled with class and score
(and the mask, tinted, for instance segmentation). Segmentors: the predicted classes tinted
over the image. Colours are the dataset's palette. The checkpoint must hold every tensor
of the config's model, each in the model's shape: otherwise the error names the keys.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from mmengine.config import DictAction
from mmengine.dataset import pseudo_collate

from mmpvt.apis import build_model
from mmpvt.cli import LaunchError, load_config, quiet_third_party_warnings


def colour_of(palette: list | None, label: int) -> tuple[int, int, int]:
    """The BGR colour of class ``label`` (the dataset palette is RGB)."""
    if palette and label < len(palette):
        r, g, b = palette[label]
        return int(b), int(g), int(r)
    rng = np.random.default_rng(label)
    return tuple(int(c) for c in rng.integers(60, 255, 3))


def draw_detections(img: np.ndarray, pred, classes: list, palette: list | None,
                    score_thr: float) -> np.ndarray:
    keep = pred.scores >= score_thr
    boxes, scores, labels = pred.bboxes[keep].numpy(), pred.scores[keep].numpy(), pred.labels[keep].numpy()
    masks = pred.masks[keep].numpy() if 'masks' in pred else None
    for i in np.argsort(scores):  # the most confident drawn last, on top
        colour = colour_of(palette, int(labels[i]))
        if masks is not None:
            img[masks[i]] = (0.5 * img[masks[i]] + 0.5 * np.array(colour)).astype(np.uint8)
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        cv2.rectangle(img, (x1, y1), (x2, y2), colour, 2)
        text = f'{classes[labels[i]] if labels[i] < len(classes) else labels[i]} {scores[i]:.2f}'
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)
        y = max(y1, th + 2)
        cv2.rectangle(img, (x1, y - th - 2), (x1 + tw + 2, y), colour, -1)
        cv2.putText(img, text, (x1 + 1, y - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def draw_segmentation(img: np.ndarray, pred, palette: list | None) -> np.ndarray:
    seg = pred.data[0].numpy()
    overlay = img.copy()
    for label in np.unique(seg):
        overlay[seg == label] = colour_of(palette, int(label))
    return cv2.addWeighted(img, 0.4, overlay, 0.6, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description='Draw a model\'s predictions on test images.')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--num', type=int, default=8, help='number of images')
    parser.add_argument('--score-thr', type=float, default=0.3, help='hide boxes scoring lower')
    parser.add_argument('--cols', type=int, default=4, help='images per row')
    parser.add_argument('--out', type=Path, default=Path('predictions.png'), help='PNG file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    args = parser.parse_args()

    cfg = load_config(args.config, args.cfg_options)
    model = build_model(cfg, args.checkpoint)
    from mmengine.registry import DATASETS
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    classes, palette = list(dataset.metainfo.get('classes', ())), dataset.metainfo.get('palette')
    tiles = []
    with torch.no_grad():
        for index in range(min(args.num, len(dataset))):
            sample = model.test_step(pseudo_collate([dataset[index]]))[0]
            img = cv2.imread(sample.img_path)
            if 'pred_instances' in sample:
                img = draw_detections(img, sample.pred_instances, classes, palette, args.score_thr)
            else:
                img = draw_segmentation(img, sample.pred_sem_seg, palette)
            tiles.append(img)
    if not tiles:
        raise LaunchError('the test set is empty')
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    tiles = [cv2.copyMakeBorder(t, 0, height - t.shape[0], 0, width - t.shape[1], cv2.BORDER_CONSTANT)
             for t in tiles]
    cols = min(args.cols, len(tiles))
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    grid = np.concatenate([np.concatenate(tiles[r:r + cols], 1) for r in range(0, len(tiles), cols)], 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), grid)
    print(f'wrote {args.out} ({min(args.num, len(dataset))} images)')


if __name__ == '__main__':
    quiet_third_party_warnings()  # before anything reads a config
    try:
        main()
    except LaunchError as exc:
        sys.exit(f'error: {exc}')
