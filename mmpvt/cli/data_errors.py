"""Dataset checks: a missing directory before the run, and a bad file during it, named for the user.

Before a run, :func:`check_data` lists what the config expects to read and marks what is
missing. During a run, :func:`explain_data_errors` turns the exception a dataset class or
the data pipeline raises on a malformed annotation file, a missing or undecodable image or an
invalid label map into one message that names the file.
"""
from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mmengine.config import Config

from ..errors import LaunchError, is_remote

KNOWN_LAYOUTS = {
    'CocoDataset': 'annotations/instances_{train,val}2017.json, train2017/, val2017/',
    'ADE20KDataset': 'images/{training,validation}/*.jpg, annotations/{training,validation}/*.png',
}
SYNTHETIC_HINT = ('For a small offline dataset in these layouts: '
                  'python -m mmpvt.datasets.synthetic data/synthetic')



def _leaf_datasets(dataset: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The datasets that read files, looking through Concat/Repeat/ClassBalanced wrappers."""
    if 'datasets' in dataset:
        for child in dataset['datasets']:
            yield from _leaf_datasets(child)
    elif 'dataset' in dataset:
        yield from _leaf_datasets(dataset['dataset'])
    else:
        yield dataset


def _dataset_paths(dataset: Mapping[str, Any]) -> list[Path]:
    """The files and directories a dataset config reads (data_root joined, as mmengine does)."""
    root = dataset.get('data_root') or ''
    paths = []
    if dataset.get('ann_file'):
        paths.append(Path(root) / dataset['ann_file'])
    for prefix in (dataset.get('data_prefix') or {}).values():
        if prefix:
            paths.append(Path(root) / prefix)
    return paths


def check_data(cfg: Config, stages: tuple[str, ...]) -> None:
    """Raises LaunchError if a dataset directory or file that ``stages`` read is missing.

    ``stages`` are ``'train'``, ``'val'`` and ``'test'``; each checks its dataloader's
    datasets and its evaluator's annotation file. The message names the missing path and
    lists every path the config expects, with the usual layout of the dataset type.
    """
    missing: list[str] = []
    for stage in stages:
        loader = cfg.get(f'{stage}_dataloader')
        if not loader or (stage != 'train' and not cfg.get(f'{stage}_cfg')):
            continue
        for dataset in _leaf_datasets(loader['dataset']):
            root = dataset.get('data_root')
            if root and is_remote(root):
                continue
            expected = _dataset_paths(dataset)
            absent = [p for p in expected if not p.exists()]
            if not absent:
                continue
            kind = dataset.get('type', 'dataset')
            lines = [f'  {p}{"" if p.suffix else "/"}{"   <- missing" if p in absent else ""}'
                     for p in expected]
            where = f'{stage}_dataloader.dataset ({kind})'
            if root and not Path(root).is_dir():
                head = f'dataset directory not found: {root} (data_root of {where})'
            else:
                head = f'dataset path not found: {absent[0]} ({where})'
            layout = KNOWN_LAYOUTS.get(str(kind).split('.')[-1])
            missing.append('\n'.join([head, 'expected layout:', *lines]
                                     + ([f'  (usual layout under data_root: {layout})'] if layout else [])))
        evaluators = cfg.get(f'{stage}_evaluator') or []
        for evaluator in evaluators if isinstance(evaluators, list) else [evaluators]:
            ann_file = evaluator.get('ann_file') if isinstance(evaluator, Mapping) else None
            if ann_file and not is_remote(ann_file) and not Path(ann_file).is_file():
                missing.append(f'annotation file not found: {ann_file} ({stage}_evaluator.ann_file)')
    if missing:
        # One dataset is usually shared by val and test: report each problem once.
        unique = list(dict.fromkeys(missing))
        raise LaunchError('\n'.join(unique) + '\nSet data_root in the config or with --cfg-options. '
                          + SYNTHETIC_HINT)


# -- data errors during a run ---------------------------------------------------------------------
def _annotation_files(cfg: Config, stages: tuple[str, ...]) -> dict[Path, str]:
    """The local annotation files ``stages`` read, each with the first config entry that names it."""
    files: dict[Path, str] = {}
    for stage in stages:
        loader = cfg.get(f'{stage}_dataloader')
        if loader and (stage == 'train' or cfg.get(f'{stage}_cfg')):
            for dataset in _leaf_datasets(loader['dataset']):
                root = dataset.get('data_root') or ''
                if dataset.get('ann_file') and not is_remote(root):
                    path = Path(root) / dataset['ann_file']
                    files.setdefault(path, f'{stage}_dataloader.dataset.ann_file')
        evaluators = cfg.get(f'{stage}_evaluator') or []
        for evaluator in evaluators if isinstance(evaluators, list) else [evaluators]:
            ann_file = evaluator.get('ann_file') if isinstance(evaluator, Mapping) else None
            if ann_file and not is_remote(ann_file):
                files.setdefault(Path(ann_file), f'{stage}_evaluator.ann_file')
    return {path: where for path, where in files.items() if path.is_file()}


def _json_problem(path: Path) -> str | None:
    """Why ``path`` is not valid JSON (json's message with line and column), or None if it is."""
    try:
        with open(path, encoding='utf-8') as f:
            json.load(f)
    except json.JSONDecodeError as exc:
        return f'line {exc.lineno} column {exc.colno}: {exc.msg}'
    except UnicodeDecodeError as exc:
        return f'not UTF-8 text at byte {exc.start}'
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _own_message(exc: BaseException) -> str:
    """The exception's message, without the worker traceback a DataLoader worker wraps it in."""
    text = str(exc)
    if 'Original Traceback' not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(': ', 1)[1] if ': ' in last else last


def _missing_path(exc: BaseException) -> str | None:
    if getattr(exc, 'filename', None):
        return str(exc.filename)
    # A FileNotFoundError re-raised from a DataLoader worker keeps only its text.
    match = re.search(r"No such file or directory: '([^']+)'", str(exc))
    return match.group(1) if match else None


def _run_datasets(cfg: Config, stages: tuple[str, ...]) -> Iterator[tuple[Mapping[str, Any], Path, str]]:
    """Each dataset config a run of ``stages`` reads: the config, its data root, and where it sits
    (``val_dataloader.dataset (CocoDataset)``). Stages the config does not run are passed over."""
    for stage in stages:
        loader = cfg.get(f'{stage}_dataloader')
        if not loader or (stage != 'train' and not cfg.get(f'{stage}_cfg')):
            continue
        for dataset in _leaf_datasets(loader['dataset']):
            yield dataset, Path(dataset.get('data_root') or ''), \
                f'{stage}_dataloader.dataset ({dataset.get("type", "dataset")})'


def _explain_missing_file(cfg: Config, missing: str, stages: tuple[str, ...]) -> LaunchError | None:
    """Names the dataset (and the annotation file listing it) that a missing file belongs to."""
    missing_dir = Path(missing).parent.resolve()
    for dataset, root, where in _run_datasets(cfg, stages):
        for kind, prefix in (dataset.get('data_prefix') or {}).items():
            if not prefix or (root / prefix).resolve() != missing_dir:
                continue
            if 'seg' in kind:  # mmseg pairs each image with the label map of the same name
                return LaunchError(f'label map not found: {missing} (the label map of an image in '
                                   f'{root / dataset["data_prefix"].get("img_path", "")}, {where})')
            if dataset.get('ann_file'):
                return LaunchError(f'image not found: {missing} (listed in {root / dataset["ann_file"]}, '
                                   f'{where})')
            return LaunchError(f'file not found: {missing} ({where})')
    return None


# mmcv's LoadImageFromFile asserts this when the image decoder returns nothing (a truncated
# or corrupt file, or one that is no image); a DataLoader worker passes on only the text.
_UNDECODABLE = re.compile(r'failed to load image: (.+?)\s*$', re.MULTILINE)


def _where_image(cfg: Config, image: str, stages: tuple[str, ...]) -> str:
    """The dataset config entry whose image directory holds ``image`` ('' if none does)."""
    image_dir = Path(image).parent.resolve()
    for dataset, root, where in _run_datasets(cfg, stages):
        prefixes = (dataset.get('data_prefix') or {}).values()
        if any(prefix and (root / prefix).resolve() == image_dir for prefix in prefixes):
            return where
    return ''


def _explain_undecodable(cfg: Config, chain: list[BaseException],
                         stages: tuple[str, ...]) -> LaunchError | None:
    for error in chain:
        match = _UNDECODABLE.search(str(error))
        if match:
            image = match.group(1)
            where = _where_image(cfg, image, stages)
            config = cfg.filename or 'CONFIG'
            return LaunchError(f'image cannot be decoded: {image} (truncated, corrupt or not an image'
                               f'{"; " + where if where else ""}). Find every such file before a run with '
                               f'python tools/check_data.py {config}')
    return None


def explain_data_error(cfg: Config, exc: BaseException, stages: tuple[str, ...]) -> LaunchError | None:
    """A LaunchError naming the data file behind ``exc``, a failure of a run; None if it is not one.

    Recognised: an annotation file that is not valid JSON, an image or label map that a
    dataset lists but that is missing, an image that cannot be decoded, and a label map
    with values that are no class (``CheckSegLabels``). The files are looked at only after a
    failure: parsing every annotation file up front would read COCO's 450 MB of JSON on each
    start just to repeat what the dataset does anyway a few seconds later. The failing file is found by
    parsing the config's annotation files in turn, the one with the length of the failed
    document first, so a valid file is parsed again only when several are candidates.
    """
    chain = list(_chain(exc))
    decode_errors = [e for e in chain if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError))]
    if decode_errors:
        doc = getattr(decode_errors[0], 'doc', None)
        size = len(doc.encode('utf-8', 'replace')) if isinstance(doc, str) else -1
        files = _annotation_files(cfg, stages)
        for path in sorted(files, key=lambda p: p.stat().st_size != size):
            problem = _json_problem(path)
            if problem:
                return LaunchError(f'annotation file is not valid JSON: {path} ({problem}; {files[path]}). '
                                   'A truncated download or copy? Make or fetch the file again.')
    undecodable = _explain_undecodable(cfg, chain, stages)
    if undecodable:
        return undecodable
    from mmpvt.datasets.transforms import SegLabelError
    for error in chain:
        if isinstance(error, SegLabelError):
            return LaunchError(_own_message(error))
    for error in chain:
        if isinstance(error, FileNotFoundError):
            missing = _missing_path(error)
            explained = _explain_missing_file(cfg, missing, stages) if missing else None
            if explained:
                return explained
    return None


@contextlib.contextmanager
def explain_data_errors(cfg: Config, stages: tuple[str, ...]) -> Iterator[None]:
    """Re-raises a data failure inside the block as a LaunchError (see :func:`explain_data_error`).

    Other exceptions pass unchanged, with their traceback.
    """
    try:
        yield
    except Exception as exc:
        error = explain_data_error(cfg, exc, stages)
        if error is None:
            raise
        raise error from exc
