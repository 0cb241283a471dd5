"""A trained detector or segmentor run on one's own images (tools/infer.py).

mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer``, as the config's ``default_scope``
says, prepares the images, runs the model and draws its predictions; this module adds what
a command-line run needs around them:

* the images of an input that is one image, a folder or a glob, each named by a path
  relative to the input, and readable, or an error naming the file;
* a checkpoint that fits the model: the inferencers load with ``strict=False``, which keeps
  the random tensors of keys the checkpoint lacks or holds in another shape. Here every key
  and shape is checked first (:func:`~mmpvt.apis.analysis.load_model_checkpoint`), and a
  checkpoint that does not fit is refused, naming the key and both shapes. Both loads read
  the file with ``weights_only=True``: mmengine's loader for local files is mmpvt's
  (``mmpvt.checkpoint.install_safe_loading``);
* one drawn PNG per image and one JSON record of the predictions per image.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mmengine.config import Config

from ..errors import LaunchError
from .model import load_model_checkpoint

__all__ = ['IMAGE_SUFFIXES', 'ImagePredictor', 'detection_record', 'find_images', 'output_names',
           'segmentation_record']

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
# Test-pipeline steps that read or check ground truth, which images to infer on do not have.
ANNOTATION_TRANSFORMS = ('LoadAnnotations', 'LoadDepthAnnotation', 'CheckSegLabels')


def _is_image_name(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def find_images(source: str | os.PathLike) -> tuple[list[Path], Path]:
    """The images ``source`` names, sorted, and the directory their output names start from.

    ``source`` is an image file (taken whatever its suffix), a folder (its files with an
    image suffix, not its subfolders) or a glob (``'photos/*.jpg'``, ``'data/**/*.png'``;
    the matching files with an image suffix). Raises LaunchError if it names none.
    """
    text = str(source)
    path = Path(text)
    suffixes = ', '.join(IMAGE_SUFFIXES)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if _is_image_name(p))
        if not images:
            raise LaunchError(f'no images found in {path}/ (looked for files ending in {suffixes})')
        return images, path
    if glob.has_magic(text):
        images = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if _is_image_name(p))
        if not images:
            raise LaunchError(f'no images match {text} (files ending in {suffixes})')
        root = Path(os.path.commonpath([str(p.parent) for p in images]))
        return images, root
    raise LaunchError(f'input not found: {text} (expected an image, a folder of images or a glob)')


def output_names(images: Sequence[Path], root: Path) -> list[str]:
    """A PNG name per image: its path under ``root`` with the suffix ``.png``.

    Two images that would share a name (``a.jpg`` and ``a.png``) keep their suffix in it
    (``a_jpg.png``, ``a_png.png``).
    """
    relative = [image.relative_to(root) if image.is_relative_to(root) else Path(image.name)
                for image in images]
    plain = [str(rel.with_suffix('.png')) for rel in relative]
    clashing = {name for name in plain if plain.count(name) > 1}
    return [str(rel.with_name(f'{rel.stem}_{rel.suffix.lstrip(".")}.png')) if name in clashing else name
            for rel, name in zip(relative, plain)]


def _without_annotation_steps(pipeline: list) -> list:
    return [step for step in pipeline
            if str(step.get('type', '')).split('.')[-1] not in ANNOTATION_TRANSFORMS]


def _checked_inferencer(scope: str) -> type:
    """The scope's inferencer class, loading checkpoints only when they fit the model."""
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer as Base
    elif scope == 'mmseg':
        from mmseg.apis import MMSegInferencer as Base
    else:
        raise LaunchError(f"infer.py runs mmdet and mmseg configs; this config's default_scope is {scope!r}")

    class CheckedInferencer(Base):
        """``Base``, refusing a checkpoint that does not fit instead of loading part of it."""

        def _init_model(self, cfg: Any, weights: str | None, device: str = 'cpu') -> Any:
            self.weights_file = weights  # _load_weights_to_model gets the loaded dict only
            return super()._init_model(cfg, weights, device)

        def _load_weights_to_model(self, model: Any, checkpoint: dict | None, cfg: Any) -> None:
            if checkpoint is not None:
                load_model_checkpoint(model, self.weights_file)  # every key and shape, or LaunchError
            super()._load_weights_to_model(model, checkpoint, cfg)  # class names and palette

        def _init_visualizer(self, cfg: Any) -> Any:
            if cfg.get('visualizer'):  # drawings are returned, not stored: no storage backends
                cfg.visualizer.pop('vis_backends', None)
            return super()._init_visualizer(cfg)

        def _init_pipeline(self, cfg: Any) -> Any:
            dataset = cfg.test_dataloader.dataset
            dataset.pipeline = _without_annotation_steps(dataset.pipeline)
            return super()._init_pipeline(cfg)

    return CheckedInferencer


def _class_name(classes: Sequence[str], label: int) -> str:
    return str(classes[label]) if 0 <= label < len(classes) else str(label)


def detection_record(pred: dict[str, Any], classes: Sequence[str], score_thr: float) -> dict[str, Any]:
    """One image's detections as recorded in predictions.json.

    ``pred`` is what DetInferencer returns per image (``labels``, ``scores``, ``bboxes``,
    ``masks`` as COCO RLE for instance segmentation). Kept: the instances scoring at least
    ``score_thr`` (those drawn), best first, each with its class index and name, score, box
    ``[x1, y1, x2, y2]`` in pixels of the image and mask.
    """
    instances = []
    masks = pred.get('masks')
    for i, (label, score, box) in enumerate(zip(pred['labels'], pred['scores'], pred['bboxes'])):
        if score < score_thr:
            continue
        instance = dict(label=int(label), class_name=_class_name(classes, int(label)),
                        score=round(float(score), 4), bbox=[round(float(v), 2) for v in box])
        if masks is not None:
            instance['mask'] = masks[i]
        instances.append(instance)
    instances.sort(key=lambda inst: -inst['score'])
    return dict(instances=instances)


def segmentation_record(seg: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """One image's segmentation as recorded in predictions.json: the predicted classes,
    most pixels first, each with its pixel count and share of the image."""
    labels, counts = np.unique(seg, return_counts=True)
    order = np.argsort(-counts, kind='stable')
    return dict(classes=[dict(label=int(labels[i]), class_name=_class_name(classes, int(labels[i])),
                              pixels=int(counts[i]), fraction=round(int(counts[i]) / seg.size, 4))
                         for i in order])


class ImagePredictor:
    """A config's model with a checkpoint's weights, predicting and drawing batches of images.

    Args:
        cfg: the config (``mmpvt.apis.load_config``); its ``default_scope`` picks mmdet's
            or mmseg's inferencer.
        checkpoint: a checkpoint of that config's model (every tensor, each of the
            model's shape).
        device: ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
        score_thr: detections scoring lower are neither drawn nor recorded (detectors only).
        exported: an export of the model's tensor mode (``tools/deploy/export.py``; ``.onnx``,
            run by onnxruntime on the CPU, or ``.pt2``) that runs in place of the PyTorch
            backbone, neck and head; pre- and post-processing stay mmdet's or mmseg's
            (:func:`mmpvt.deploy.predict_with_export`).
    """

    def __init__(self, cfg: Config, checkpoint: str | os.PathLike, device: str = 'cpu',
                 score_thr: float = 0.3, exported: str | os.PathLike | None = None) -> None:
        self.scope = cfg.get('default_scope', 'mmdet')
        self.score_thr = score_thr
        inferencer = _checked_inferencer(self.scope)
        # The inferencer works on its own (deep) copy of the config.
        self.inferencer = inferencer(model=cfg, weights=str(checkpoint), device=device, scope=self.scope)
        self.inferencer.show_progress = False  # the tool shows one bar for all batches
        if exported is not None:
            from ..deploy import predict_with_export
            predict_with_export(self.inferencer.model, exported)
        self.classes = list(self.inferencer.model.dataset_meta.get('classes') or [])

    @property
    def task(self) -> str:
        return 'detection' if self.scope == 'mmdet' else 'segmentation'

    def __call__(self, images: Sequence[str]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        """For each image of one batch: the drawing (RGB, the image's size) and the prediction
        record (:func:`detection_record` or :func:`segmentation_record`)."""
        images = [str(image) for image in images]
        if self.scope == 'mmdet':
            out = self.inferencer(images, batch_size=len(images), return_vis=True, no_save_vis=True,
                                  no_save_pred=True, pred_score_thr=self.score_thr)
            records = [detection_record(pred, self.classes, self.score_thr) for pred in out['predictions']]
        else:
            out = self.inferencer(images, batch_size=len(images), return_vis=True)
            preds = out['predictions']
            # MMSegInferencer returns a single image's results unwrapped.
            preds = [preds] if isinstance(preds, np.ndarray) else preds
            records = [segmentation_record(pred, self.classes) for pred in preds]
        drawings = out['visualization']
        drawings = [drawings] if isinstance(drawings, np.ndarray) else drawings
        yield from zip(drawings, records)
