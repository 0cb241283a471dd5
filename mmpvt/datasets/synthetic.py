"""A deterministic synthetic shapes dataset in COCO and ADE20K layouts, made without downloads.

Each image shows one to three filled shapes (``circle``, ``rectangle``, ``triangle``) of
varied colours, sizes, aspect ratios and rotations on a textured background (blended colour
fields, stripes or checks, stray lines, grain), some partly hidden behind others. Three
object scales are drawn, the smallest under 32 px (COCO's "small"), so that a detector has
to use several pyramid levels. The difficulty is set so that RetinaNet-PVTv2-b0 learns it
from scratch on a CPU in minutes (make demo) without it being a single-colour blob test.

The same images are written twice, in the directory layouts of the real datasets, so that
mmdet's ``CocoDataset`` and mmseg's ``ADE20KDataset`` read them unchanged::

    OUT/coco/annotations/instances_{train,val}2017.json   boxes and polygon masks
    OUT/coco/{train,val}2017/NNNNNN.jpg
    OUT/ade/ADEChallengeData2016/images/{training,validation}/NNNNNN.jpg
    OUT/ade/ADEChallengeData2016/annotations/{training,validation}/NNNNNN.png

The label PNGs follow ADE20K: 0 is "no class" (ignored with ``reduce_zero_label=True``)
and class ``k`` (0-based in ``CLASSES``) is stored as ``k + 1``. Instance annotations hold
the visible part of each object: an occluded object's box and polygons cover only what is
left in view, as in COCO.

Generation is deterministic: every image draws from its own random stream seeded by
``(seed, split, index)``, so the same seed gives the same bytes whatever the number of
images. Command line::

    python -m mmpvt.datasets.synthetic data/synthetic --num-train 1000 --num-val 100 --seed 0 --size 128
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CLASSES: tuple[str, ...] = ('circle', 'rectangle', 'triangle')
# One colour per class for drawing predictions and label maps (RGB).
PALETTE: tuple[tuple[int, int, int], ...] = ((220, 20, 60), (0, 130, 230), (250, 170, 30))

# Object sizes: the side of the square a shape is drawn in, in pixels whatever the image
# size (at most 0.9 of it). The first range lies under COCO's 32 px "small" limit.
SCALE_RANGES: tuple[tuple[float, float], ...] = ((20, 30), (44, 72), (80, 112))
SCALE_PROBS: tuple[float, ...] = (0.15, 0.45, 0.4)

# Objects may hide each other, but each keeps at least this share of its area in view.
MIN_VISIBLE = 0.65
# Objects per image: one to this many.
MAX_OBJECTS = 3
JPEG_QUALITY = 92
SPLITS = {'train': ('train2017', 'training', 0), 'val': ('val2017', 'validation', 1)}


@dataclass(frozen=True)
class Instance:
    """One drawn object: its class index (0-based), visible mask and drawn area in pixels."""

    label: int
    mask: np.ndarray  # bool, H x W: the part left in view
    full_area: int  # before occlusion; larger than mask.sum() for a partly hidden object


# -- drawing -------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random ``cells x cells`` grid upsampled smoothly."""
    grid = rng.random((cells, cells), dtype=np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _random_colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> np.ndarray:
    return rng.integers(low, high, 3).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray,
                        min_distance: float = 120) -> np.ndarray:
    """A random colour at least ``min_distance`` (RGB) from ``behind`` (a few tries, then the farthest).

    Objects vary in colour but do not vanish into the background: the task is to find
    shapes, not to guess at invisible ones.
    """
    best, best_distance = None, -1.0
    for _ in range(8):
        colour = _random_colour(rng)
        distance = float(np.linalg.norm(colour - behind))
        if distance >= min_distance:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: blended colour fields, stripes or checks, clutter and grain."""
    a, b = _random_colour(rng, 40, 220), _random_colour(rng, 40, 220)
    t = _smooth_noise(rng, size, int(rng.integers(2, 6)))[..., None]
    img = a * t + b * (1 - t)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    pattern = int(rng.integers(3))
    period = float(rng.uniform(6, 24))
    if pattern == 0:  # stripes at a random angle
        angle = rng.uniform(0, math.pi)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        img += 8 * wave[..., None]
    elif pattern == 1:  # checks
        checks = ((xx // period + yy // period) % 2) * 2 - 1
        img += 6 * checks[..., None]
    # Clutter that belongs to no class: thin lines of random colours.
    for _ in range(int(rng.integers(0, 2))):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(img, p1, p2, _random_colour(rng).tolist(), 1, cv2.LINE_AA)
    return img


def _shape_polygon(rng: np.random.Generator, label: int, extent: float,
                   centre: np.ndarray) -> np.ndarray:
    """The outline (N x 2 float, x-y) of a ``CLASSES[label]`` shape about ``extent`` px wide."""
    if CLASSES[label] == 'circle':
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        radius = extent / 2
        pts = np.stack([np.cos(angles), np.sin(angles)], 1) * radius
    elif CLASSES[label] == 'rectangle':
        aspect = rng.uniform(0.45, 1.0)  # from squares to 2:1 bars
        w, h = extent, extent * aspect
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], np.float64) / 2
    else:  # triangle: a randomly skewed one, not only equilateral
        angles = np.array([90, 210, 330], np.float64) + rng.uniform(-20, 20, 3)
        pts = np.stack([np.cos(np.radians(angles)), -np.sin(np.radians(angles))], 1) * extent / 2
    theta = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return pts @ rot.T + centre


def _fill(shape: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    """The boolean mask of ``polygon`` (sub-pixel vertices, 4 fractional bits)."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask.astype(bool)


def render_image(rng: np.random.Generator, size: int = 128,
                 max_objects: int = MAX_OBJECTS) -> tuple[np.ndarray, list[Instance]]:
    """Draws one image (``size x size`` BGR uint8) and its annotated objects.

    Objects are drawn back to front; each new one may hide part of those before it, but is
    placed again (a few tries) if that would leave less than ``MIN_VISIBLE`` of an earlier
    object in view, so every annotated object stays recognisable.
    """
    img = _background(rng, size)
    drawn: list[tuple[int, np.ndarray]] = []  # (label, full mask) back to front
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(CLASSES)))
        low, high = SCALE_RANGES[int(rng.choice(len(SCALE_RANGES), p=SCALE_PROBS))]
        extent = min(rng.uniform(low, high), 0.9 * size)
        for _attempt in range(10):
            centre = rng.uniform(extent * 0.4, size - extent * 0.4, 2)
            polygon = _shape_polygon(rng, label, extent, centre)
            mask = _fill((size, size), polygon)
            if mask.sum() < 16:
                continue
            if all((m & ~_later(drawn, i, mask)).sum() >= MIN_VISIBLE * m.sum()
                   for i, (_, m) in enumerate(drawn) if (m & mask).any()):
                break
        else:
            continue  # no place found: leave this object out
        colour = _contrasting_colour(rng, img[mask].mean(0))
        # Shade the object (a gradient and grain) so that colour is not one flat value.
        shade = 0.9 + 0.2 * _smooth_noise(rng, size, 3)[..., None]
        img[mask] = np.clip(colour * shade[mask], 0, 255)
        # Anti-aliased edge so the outline is not a hard pixel staircase.
        cv2.polylines(img, [np.round(polygon * 16).astype(np.int32)], True, colour.tolist(), 1,
                      cv2.LINE_AA, shift=4)
        drawn.append((label, mask))
    img += rng.normal(0, 4, img.shape).astype(np.float32)  # sensor grain
    instances = []
    for i, (label, mask) in enumerate(drawn):
        visible = mask & ~_later(drawn, i)
        if visible.sum() >= 16:
            instances.append(Instance(label, visible, int(mask.sum())))
    return np.clip(img, 0, 255).astype(np.uint8), instances


def _later(drawn: list[tuple[int, np.ndarray]], index: int, extra: np.ndarray | None = None) -> np.ndarray:
    """The union of the masks drawn after ``drawn[index]`` (and ``extra``): what hides it."""
    union = np.zeros_like(drawn[index][1]) if extra is None else extra.copy()
    for _, mask in drawn[index + 1:]:
        union |= mask
    return union


# -- annotations ---------------------------------------------------------------------------------
def mask_to_polygons(mask: np.ndarray, upsample: int = 4) -> list[list[float]]:
    """COCO polygons (flat x, y lists) of a mask's outer contours, one per visible part.

    Contours of the mask itself run through the centres of its boundary pixels, which loses
    half a pixel all round: a third of a small object's area. Tracing a nearest-upsampled
    copy puts the outline within ``1 / (2 * upsample)`` px of the pixel edges instead, so the
    polygons rasterise back to the mask (mean IoU 0.997).
    """
    big = cv2.resize(mask.astype(np.uint8), None, fx=upsample, fy=upsample, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) >= 3:
            points = (contour.reshape(-1, 2) + 0.5) / upsample
            polygons.append([float(v) for v in points.reshape(-1)])
    return polygons


def coco_annotation(instance: Instance, image_id: int, ann_id: int) -> dict[str, Any] | None:
    """The COCO record of one object (box ``[x, y, w, h]`` of its visible part), or None."""
    polygons = mask_to_polygons(instance.mask)
    if not polygons:
        return None
    ys, xs = np.nonzero(instance.mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return dict(id=ann_id, image_id=image_id, category_id=instance.label + 1, iscrowd=0,
                area=float(instance.mask.sum()),
                bbox=[float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
                segmentation=polygons)


def label_map(instances: Sequence[Instance], size: int) -> np.ndarray:
    """The ADE-style label PNG content: 0 for no class, ``label + 1`` on each visible object."""
    out = np.zeros((size, size), np.uint8)
    for inst in instances:
        out[inst.mask] = inst.label + 1
    return out


# -- writing -------------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _encode(ext: str, array: np.ndarray, params: Sequence[int] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, array, list(params))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise RuntimeError(f'could not encode a {ext} image')
    return buf.tobytes()


def _render_record(job: tuple[int, int, int, int, int]) -> tuple[bytes, bytes, list[dict[str, Any]]]:
    """Renders image ``index`` of a split: its JPEG, its label PNG and its COCO records (no ids)."""
    seed, split_id, index, size, max_objects = job
    rng = np.random.default_rng([seed, split_id, index])
    img, instances = render_image(rng, size, max_objects)
    records = [r for r in (coco_annotation(inst, index + 1, 0) for inst in instances) if r is not None]
    return (_encode('.jpg', img, (cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY)),
            _encode('.png', label_map(instances, size)), records)


def generate_split(out_dir: str | Path, split: str, num_images: int, seed: int = 0,
                   size: int = 128, workers: int = 1, max_objects: int = MAX_OBJECTS) -> dict[str, int]:
    """Writes ``num_images`` images of ``split`` ('train' or 'val') in both layouts.

    ``workers`` processes render in parallel; the output does not depend on their number.
    Returns the number of images and of annotated objects per scale (small < 32x32 px of
    area, medium, large, as COCO counts them).
    """
    coco_dir, ade_dir, split_id = SPLITS[split]
    out_dir = Path(out_dir)
    coco_root, ade_root = out_dir / 'coco', out_dir / 'ade' / 'ADEChallengeData2016'
    images, annotations = [], []
    counts = dict(images=num_images, objects=0, small=0, medium=0, large=0)
    jobs = [(seed, split_id, index, size, max_objects) for index in range(num_images)]
    pool = multiprocessing.get_context('fork').Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_render_record, jobs, chunksize=8) if pool else map(_render_record, jobs)
        for index, (jpeg, png, records) in enumerate(results):
            name = f'{index:06d}'
            _write(coco_root / coco_dir / f'{name}.jpg', jpeg)
            _write(ade_root / 'images' / ade_dir / f'{name}.jpg', jpeg)
            _write(ade_root / 'annotations' / ade_dir / f'{name}.png', png)
            images.append(dict(id=index + 1, file_name=f'{name}.jpg', height=size, width=size))
            for record in records:
                record['id'] = len(annotations) + 1
                annotations.append(record)
                area = record['area']
                counts['small' if area < 32 ** 2 else 'medium' if area < 96 ** 2 else 'large'] += 1
    finally:
        if pool:
            pool.close()
            pool.join()
    counts['objects'] = len(annotations)
    coco = dict(
        info=dict(description=f'mmpvt synthetic shapes, {split}, seed {seed}', version='1.0'),
        licenses=[], images=images, annotations=annotations,
        categories=[dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)])
    _write(coco_root / 'annotations' / f'instances_{coco_dir}.json',
           json.dumps(coco, separators=(',', ':')).encode())
    return counts


def generate(out_dir: str | Path, num_train: int = 1000, num_val: int = 100, seed: int = 0,
             size: int = 128, workers: int = 1, max_objects: int = MAX_OBJECTS) -> dict[str, dict[str, int]]:
    """Writes the train and val splits under ``out_dir``; returns their counts per split."""
    if num_train < 1 or num_val < 1 or size < 64:
        raise ValueError(f'need at least one image per split and a size >= 64, got '
                         f'num_train={num_train}, num_val={num_val}, size={size}')
    return {split: generate_split(out_dir, split, n, seed, size, workers, max_objects)
            for split, n in (('train', num_train), ('val', num_val))}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog='python -m mmpvt.datasets.synthetic',
        description='Generate the synthetic shapes dataset (COCO and ADE20K layouts).')
    parser.add_argument('out_dir', help='output directory (coco/ and ade/ are created inside)')
    parser.add_argument('--num-train', type=int, default=1000)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--size', type=int, default=128, help='image side in pixels (the demo configs: 128)')
    parser.add_argument('--max-objects', type=int, default=MAX_OBJECTS, help='objects per image: 1 to this')
    parser.add_argument('--workers', type=int, default=min(os.cpu_count() or 1, 8),
                        help='processes rendering in parallel (the output is the same for any number)')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = generate(args.out_dir, args.num_train, args.num_val, args.seed, args.size, args.workers,
                      args.max_objects)
    for split, c in counts.items():
        print(f'{split}: {c["images"]} images, {c["objects"]} objects '
              f'({c["small"]} small, {c["medium"]} medium, {c["large"]} large)')
    print(f'wrote {Path(args.out_dir).resolve()} in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
    main()
