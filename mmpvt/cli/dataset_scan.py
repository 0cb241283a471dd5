"""Reads every image and annotation a config trains and evaluates on, before the GPUs are spent.

``tools/check_data.py`` runs :func:`check_datasets`. For a COCO-style dataset (an mmdet
dataset with a JSON ``ann_file``) the JSON is read directly, because mmdet's own loader stops
at the first annotation whose category is not one of the config's classes; the classes
come from the config's ``metainfo`` or else from the dataset class's ``METAINFO``. Other
datasets (ADE20K and every mmseg layout) are listed by the config's own dataset class, with
an empty pipeline. Each image (and label map) is then decoded in ``workers`` processes.

Problems are kinds with a list of files. ``BLOCKING`` kinds stop a run when the sample is
drawn (an image that does not decode, a missing file, a category that is no class, a label
map value that is no class); the others are reported and counted but training goes on
(boxes outside their image or without area, which mmdet clips or drops).
"""
from __future__ import annotations

import json
import multiprocessing
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mmengine.config import Config

from .data_errors import _leaf_datasets

# kind -> what the summary calls it
KINDS = {
    'undecodable_image': 'image cannot be decoded',
    'missing_image': 'image listed but missing',
    'unknown_image_id': 'annotation of an image id not in the file',
    'unknown_category': 'category id is no class of the config',
    'missing_label_map': 'label map missing',
    'undecodable_label_map': 'label map cannot be decoded',
    'invalid_label_values': 'label map values that are no class',
    'box_outside_image': 'box outside its image',
    'box_without_area': 'box with zero or negative size',
}
BLOCKING = frozenset({'undecodable_image', 'missing_image', 'unknown_category', 'missing_label_map',
                      'undecodable_label_map', 'invalid_label_values'})


@dataclass
class Sample:
    """One image to read: its boxes ``(x, y, w, h)`` in pixels, or its label map and classes."""

    image: str
    width: int | None = None
    height: int | None = None
    boxes: list[list[float]] = field(default_factory=list)
    seg_map: str | None = None
    num_classes: int = 0
    ignore_index: int = 255
    reduce_zero_label: bool = False


@dataclass
class Report:
    """What :func:`check_datasets` found: files per problem kind, counts, and the reading rate."""

    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    images: int = 0
    without_annotations: int = 0
    seconds: float = 0.0

    @property
    def blocking(self) -> bool:
        """Whether a problem would stop a training or evaluation run."""
        return any(kind in BLOCKING and files for kind, files in self.problems.items())

    def to_dict(self) -> dict[str, Any]:
        return dict(images=self.images, without_annotations=self.without_annotations,
                    seconds=round(self.seconds, 3), images_per_second=round(self.rate, 2),
                    blocking=self.blocking, problems={k: v for k, v in self.problems.items() if v})

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self, first: int = 3) -> str:
        """A table of problem kinds with their counts and first files, and the totals."""
        lines = ['| problem | count | stops a run | first files |', '|---|---|---|---|']
        for kind, files in self.problems.items():
            if files:
                shown = ', '.join(files[:first]) + (', ...' if len(files) > first else '')
                stops = 'yes' if kind in BLOCKING else 'no'
                lines.append(f'| {KINDS[kind]} | {len(files)} | {stops} | {shown} |')
        if len(lines) == 2:
            lines = ['no problems found']
        lines.append(f'{self.images} images read in {self.seconds:.1f} s ({self.rate:.1f} images/s); '
                     f'{self.without_annotations} without annotations')
        return '\n'.join(lines)


def _classes(dataset: Mapping[str, Any]) -> list[str]:
    from mmengine.registry import DATASETS
    metainfo = dataset.get('metainfo') or {}
    if metainfo.get('classes'):
        return list(metainfo['classes'])
    cls = DATASETS.get(dataset['type']) if isinstance(dataset['type'], str) else dataset['type']
    return list(getattr(cls, 'METAINFO', {}).get('classes', []))


def _coco_samples(dataset: Mapping[str, Any], report: Report) -> list[Sample]:
    """The images of a COCO JSON, with the annotation problems found in the JSON itself."""
    root = Path(dataset.get('data_root') or '')
    ann_file = root / dataset['ann_file']
    image_dir = root / ((dataset.get('data_prefix') or {}).get('img') or '')
    with open(ann_file, encoding='utf-8') as f:
        coco = json.load(f)
    names = set(_classes(dataset))
    class_ids = {c['id'] for c in coco.get('categories', []) if c.get('name') in names}
    samples = {img['id']: Sample(str(image_dir / img['file_name']), img.get('width'), img.get('height'))
               for img in coco.get('images', [])}
    for ann in coco.get('annotations', []):
        sample = samples.get(ann.get('image_id'))
        if sample is None:
            report.problems['unknown_image_id'].append(f'{ann_file} (annotation {ann.get("id")})')
            continue
        if ann.get('category_id') not in class_ids:
            report.problems['unknown_category'].append(
                f'{sample.image} (category {ann.get("category_id")}, annotation {ann.get("id")})')
        sample.boxes.append(list(ann.get('bbox') or [0, 0, 0, 0]))
    report.without_annotations += sum(not s.boxes for s in samples.values())
    return list(samples.values())


def _listed_samples(dataset: Mapping[str, Any], scope: str) -> list[Sample]:
    """The images (and label maps) the config's own dataset class lists, with an empty pipeline."""
    from mmengine.registry import DATASETS, init_default_scope
    init_default_scope(scope)
    built = DATASETS.build({**dataset, 'pipeline': [], 'serialize_data': False, 'lazy_init': False})
    num_classes = len(built.metainfo.get('classes') or [])
    ignore_index = int(getattr(built, 'ignore_index', dataset.get('ignore_index', 255)))
    return [Sample(info['img_path'], seg_map=info.get('seg_map_path'), num_classes=num_classes,
                   ignore_index=ignore_index, reduce_zero_label=bool(info.get('reduce_zero_label')))
            for info in (built.get_data_info(i) for i in range(len(built)))]


def _check_sample(sample: Sample) -> list[tuple[str, str]]:
    """Decodes one sample's files; returns its problems as (kind, description)."""
    import cv2

    from mmpvt.datasets.transforms import SegLabelError, check_seg_labels

    problems = []
    path = Path(sample.image)
    if not path.is_file():
        return [('missing_image', sample.image)]
    image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return [('undecodable_image', sample.image)]
    height, width = image.shape[:2]
    for x, y, w, h in sample.boxes:
        if w <= 0 or h <= 0:
            problems.append(('box_without_area', f'{sample.image} (box {[x, y, w, h]})'))
        elif x < 0 or y < 0 or x + w > width + 1 or y + h > height + 1:  # 1 px: COCO's rounding
            problems.append(('box_outside_image', f'{sample.image} (box {[x, y, w, h]} in {width}x{height})'))
    if sample.seg_map:
        seg_path = Path(sample.seg_map)
        if not seg_path.is_file():
            return [*problems, ('missing_label_map', sample.seg_map)]
        seg = cv2.imdecode(np.frombuffer(seg_path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        if seg is None:
            return [*problems, ('undecodable_label_map', sample.seg_map)]
        if sample.reduce_zero_label:  # as mmseg's LoadAnnotations loads it
            seg = seg.astype(np.int64)
            seg = np.where(seg == 0, 255, seg - 1)
        try:
            check_seg_labels(seg, sample.num_classes, sample.ignore_index, sample.reduce_zero_label,
                             path=sample.seg_map)
        except SegLabelError as exc:
            problems.append(('invalid_label_values', str(exc)))
    return problems


def _stage_datasets(cfg: Config, stages: Iterable[str]) -> list[Mapping[str, Any]]:
    datasets, seen = [], set()
    for stage in stages:
        loader = cfg.get(f'{stage}_dataloader')
        if not loader or (stage != 'train' and not cfg.get(f'{stage}_cfg')):
            continue
        for dataset in _leaf_datasets(loader['dataset']):
            key = json.dumps({k: dataset.get(k) for k in ('type', 'data_root', 'ann_file', 'data_prefix')},
                             sort_keys=True, default=str)
            if key not in seen:  # val and test usually share one dataset: read it once
                seen.add(key)
                datasets.append(dataset)
    return datasets


def check_datasets(cfg: Config, stages: Iterable[str] = ('train', 'val'), workers: int = 1,
                   progress: bool = True) -> Report:
    """Reads every sample of the datasets ``stages`` use (see the module docstring)."""
    from mmengine.utils import ProgressBar

    report = Report()
    samples: list[Sample] = []
    for dataset in _stage_datasets(cfg, stages):
        ann_file = str(dataset.get('ann_file') or '')
        if cfg.get('default_scope') == 'mmdet' and ann_file.endswith('.json'):
            samples += _coco_samples(dataset, report)
        else:
            samples += _listed_samples(dataset, cfg.get('default_scope') or 'mmengine')
    report.images = len(samples)
    start = time.perf_counter()
    bar = ProgressBar(len(samples)) if progress and samples else None
    pool = multiprocessing.get_context('fork').Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_check_sample, samples, chunksize=8) if pool else map(_check_sample, samples)
        for problems in results:
            for kind, text in problems:
                report.problems[kind].append(text)
            if bar:
                bar.update()
    finally:
        if pool:
            pool.close()
            pool.join()
    report.seconds = time.perf_counter() - start
    if bar:
        print(flush=True)
    return report
