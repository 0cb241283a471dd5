"""Data pipeline checks that turn silently wrong training data into an error naming the file.

``CheckSegLabels`` goes right after mmseg's ``LoadAnnotations`` in a semantic segmentation
pipeline. A label PNG with a value that is no class of the dataset (a map made for another
class list, a palette image saved with colour indices, a wrongly shifted map) does not
fail by itself: the loss ignores or mis-assigns such pixels, or CUDA asserts somewhere
inside the loss with no file named. The check fails on the first such file instead::

    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=len(metainfo['classes'])),

It is registered in mmseg's ``TRANSFORMS`` when mmseg is installed; configs import it with
``custom_imports = dict(imports=['mmpvt', 'mmpvt.datasets.transforms'])``.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class SegLabelError(ValueError):
    """A label map holds values that are neither classes nor the ignore index."""


def _describe(values: np.ndarray, limit: int = 10) -> str:
    shown = ', '.join(str(int(v)) for v in values[:limit])
    return shown + (f' and {len(values) - limit} more' if len(values) > limit else '')


def check_seg_labels(seg_map: np.ndarray, num_classes: int, ignore_index: int = 255,
                     reduce_zero_label: bool = False, label_map: dict | None = None,
                     path: str = '<label map>') -> None:
    """Raises SegLabelError if ``seg_map`` (as LoadAnnotations returns it) has a value that is no class.

    Allowed are ``0 .. num_classes - 1`` and ``ignore_index``. The message speaks of the
    values stored in the file: with ``reduce_zero_label`` the file's ``k`` was loaded as
    ``k - 1`` (and its 0 as ``ignore_index``), so a stored value is the loaded one plus 1.
    A dataset ``label_map`` (a subset of a larger class list) renumbers values in a way that
    cannot be undone here, so then the loaded values are named.
    """
    bad = (seg_map >= num_classes) & (seg_map != ignore_index)
    if not bad.any():
        return
    loaded = np.unique(seg_map[bad])
    if label_map:
        raise SegLabelError(
            f'label map {path} has values {_describe(loaded)} (after the dataset\'s label_map) that are '
            f'not classes: {num_classes} classes are 0..{num_classes - 1}, and {ignore_index} is ignored')
    if reduce_zero_label:
        stored = loaded + 1
        allowed = (f'stored values 1..{num_classes} are the {num_classes} classes; 0 and 255 are '
                   'ignored (reduce_zero_label=True)')
    else:
        stored = loaded
        allowed = (f'stored values 0..{num_classes - 1} are the {num_classes} classes; {ignore_index} '
                   'is ignored (reduce_zero_label=False)')
    raise SegLabelError(f'label map {path} has values {_describe(stored)} that are not classes of the '
                        f'dataset: {allowed}')


try:
    from mmcv.transforms import BaseTransform
except ImportError:  # pragma: no cover - mmcv comes with mmseg; without it only the function exists
    BaseTransform = None

if BaseTransform is not None:
    class CheckSegLabels(BaseTransform):
        """Fails on a label map whose values are not the dataset's classes, naming the PNG.

        Args:
            num_classes: the number of classes of the dataset (``len(metainfo['classes'])``).
            ignore_index: the value the loss ignores (mmseg's default, 255).

        Whether the file was shifted by ``reduce_zero_label`` and renumbered by a label map is
        read from the sample, where the dataset put it for LoadAnnotations.
        """

        def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
            if num_classes < 1:
                raise ValueError(f'num_classes must be positive, got {num_classes}')
            self.num_classes = num_classes
            self.ignore_index = ignore_index

        def transform(self, results: dict[str, Any]) -> dict[str, Any]:
            check_seg_labels(results['gt_seg_map'], self.num_classes, self.ignore_index,
                             reduce_zero_label=bool(results.get('reduce_zero_label')),
                             label_map=results.get('label_map'),
                             path=str(results.get('seg_map_path', '<label map>')))
            return results

        def __repr__(self) -> str:
            return f'{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index})'

    try:
        from mmseg.registry import TRANSFORMS
    except ImportError:  # pragma: no cover - mmdet-only installation
        TRANSFORMS = None
    if TRANSFORMS is not None:
        TRANSFORMS.register_module(module=CheckSegLabels)
