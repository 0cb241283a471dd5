"""mmpvt's model zoo as data: the OpenMMLab model index and the configs it names.

The index is ``model-index.yml`` (``Import:`` the metafiles) with ``configs/metafile.yml``
beside the configs, as in every OpenMMLab package. In a source checkout they sit at the
repository's root; an installed package carries them in ``mmpvt/.mim/`` (setup.py copies
them), which is where mmengine and openmim look. Importing mmpvt registers the package with
mmengine, so that a downstream config can inherit ``_base_ = 'mmpvt::zoo/retinanet_pvt_s.py'``.

Each model's ``Results`` are the papers' numbers (what a run of the config should reach).
``Weights`` is a trained checkpoint of the same architecture where a trusted source publishes
one, with ``Weights Results`` (its own published numbers) and ``Weights Source`` (where both
were read) in its metadata.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
# mmengine resolves 'mmpvt::<folder>/<name>.py' only with a folder ('\w*::\w*/\w*'): the
# configs are installed under this folder of .mim/configs.
CONFIG_FOLDER = 'zoo'
# Metric names of the index -> the keys tools/test.py reports.
METRIC_KEYS = {'box AP': 'coco/bbox_mAP', 'mask AP': 'coco/segm_mAP', 'mIoU': 'mIoU'}
TASKS = {'Object Detection': 'detection', 'Instance Segmentation': 'instance segmentation',
         'Semantic Segmentation': 'segmentation'}


class ModelIndexError(RuntimeError):
    """The model index is missing, malformed, or does not name what was asked for."""


@dataclass(frozen=True)
class ZooModel:
    """One entry of the model index.

    ``results`` maps a metric name of the index (``box AP``, ``mask AP``, ``mIoU``) to the
    paper's value; ``weights_results`` the same for ``weights``, when a trained checkpoint
    is published.
    """
    name: str
    collection: str
    config: Path
    tasks: tuple[str, ...]
    results: dict[str, float]
    weights: str | None = None
    weights_results: dict[str, float] = field(default_factory=dict)
    weights_source: str | None = None
    pretrained: str | None = None
    parameters_m: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """``detection``, ``instance segmentation`` or ``segmentation`` (the first result's)."""
        return TASKS.get(self.tasks[0], self.tasks[0]) if self.tasks else 'unknown'


def index_root() -> Path:
    """The folder holding ``model-index.yml``: the repository's root in a checkout, the
    package's ``.mim`` folder when installed."""
    for root in (PACKAGE_DIR / '.mim', PACKAGE_DIR.parent):
        if (root / 'model-index.yml').is_file():
            return root
    raise ModelIndexError(f'no model-index.yml in {PACKAGE_DIR / ".mim"} or {PACKAGE_DIR.parent}: '
                          'mmpvt was installed without its model zoo')


def _load_yaml(path: Path) -> Any:
    import yaml
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ModelIndexError(f'{path}: {error}') from error


def _metrics(results: list[dict[str, Any]] | None) -> dict[str, float]:
    return {name: float(value) for result in results or () for name, value in result['Metrics'].items()}


def _tasks_of(meta: dict[str, Any]) -> tuple[str, ...]:
    """The tasks of a model without published results, from its data and architecture."""
    if 'ADE' in str(meta.get('Training Data', '')):
        return ('Semantic Segmentation',)
    masks = any('Mask' in str(part) for part in meta.get('Architecture') or ())
    return ('Object Detection', 'Instance Segmentation') if masks else ('Object Detection',)


def load_models(root: str | os.PathLike | None = None) -> list[ZooModel]:
    """Every model of the index under ``root`` (default :func:`index_root`), in index order."""
    root = Path(root) if root is not None else index_root()
    index = _load_yaml(root / 'model-index.yml')
    models = []
    for metafile in (index or {}).get('Import', ()):
        for entry in _load_yaml(root / metafile).get('Models', ()):
            meta = dict(entry.get('Metadata') or {})
            models.append(ZooModel(
                name=entry['Name'], collection=entry.get('In Collection', ''), config=root / entry['Config'],
                tasks=tuple(result['Task'] for result in entry.get('Results') or ()) or _tasks_of(meta),
                results=_metrics(entry.get('Results')), weights=entry.get('Weights'),
                weights_results=_metrics(meta.pop('Weights Results', None)),
                weights_source=meta.pop('Weights Source', None), pretrained=meta.get('Pretrained'),
                parameters_m=meta.get('Parameters (M)'), metadata=meta))
    if not models:
        raise ModelIndexError(f'{root / "model-index.yml"} lists no models')
    return models


def select_models(models: list[ZooModel], patterns: list[str] | None = None, collection: str | None = None,
                  task: str | None = None, with_weights: bool = False) -> list[ZooModel]:
    """The models whose name matches one of ``patterns`` (shell wildcards), of ``collection``
    and ``task`` (as :attr:`ZooModel.task`, or a task name of the index); ModelIndexError when
    nothing matches, naming what there is."""
    chosen = [m for m in models
              if (not patterns or any(fnmatch.fnmatchcase(m.name, p) for p in patterns))
              and (collection is None or m.collection.lower() == collection.lower())
              and (task is None or task in (m.task, *m.tasks))
              and (not with_weights or m.weights)]
    if not chosen:
        asked = ', '.join(f'{k}={v}' for k, v in (('models', patterns), ('collection', collection),
                                                 ('task', task), ('with weights', with_weights)) if v)
        collections = ', '.join(sorted({m.collection for m in models}))
        tasks = ', '.join(sorted({m.task for m in models}))
        raise ModelIndexError(f'no model of the index matches {asked}; collections: {collections}; '
                              f'tasks: {tasks}')
    return chosen


def config_path(name: str) -> Path:
    """The path of a zoo config by model name (``retinanet_pvt_s``) or file name
    (``retinanet_pvt_s.py``), installed or in the checkout."""
    stem = Path(name).stem
    for model in load_models():
        if model.name == stem or model.config.stem == stem:
            if not model.config.is_file():
                raise ModelIndexError(f'{model.config}: listed in the model index but missing')
            return model.config
    raise ModelIndexError(f'no config named {name!r} in the model index')


def configs_root() -> Path:
    """The folder of the zoo's configs: ``configs/`` of the checkout, or ``.mim/configs``."""
    return index_root() / 'configs'


def zoo_config(relative: str) -> Path:
    """The file that ``mmpvt::<relative>`` names: ``zoo/<config>.py`` (a zoo config; mmengine
    needs a folder in the name) or ``_base_/<file>.py`` and the like (under the configs)."""
    parts = Path(relative).parts
    inside = Path(*parts[1:]) if parts and parts[0] == CONFIG_FOLDER else Path(relative)
    root = configs_root().resolve()
    path = (root / inside).resolve()
    if root not in path.parents or not path.is_file():
        raise FileNotFoundError(f'mmpvt::{relative}: no such config; write '
                                f'mmpvt::{CONFIG_FOLDER}/<config>.py for a zoo config or '
                                f'mmpvt::_base_/<file>.py for a base (under {root})')
    return path


def register_with_mmengine() -> None:
    """Lets mmengine resolve ``_base_ = 'mmpvt::zoo/<config>.py'`` (and ``mmpvt::_base_/...``)
    in a checkout and when installed.

    mmengine's own resolution of ``pkg::path`` reads ``<package>/.mim`` (absent in an editable
    install) and scopes the base's objects to the package (``_scope_='mmpvt'``), where mmdet's
    and mmseg's types are not registered. mmpvt's configs are mmdet and mmseg configs with
    their own ``default_scope``, so they are read as a local base would be: unscoped.
    """
    from mmengine.config import Config
    original = Config._get_cfg_path
    if getattr(original, 'resolves_mmpvt', False):
        return

    def get_cfg_path(cfg_path: str, filename: str) -> tuple[str, str | None]:
        if isinstance(cfg_path, str) and cfg_path.startswith('mmpvt::'):
            return str(zoo_config(cfg_path[len('mmpvt::'):])), None
        return original(cfg_path, filename)
    get_cfg_path.resolves_mmpvt = True
    Config._get_cfg_path = staticmethod(get_cfg_path)
