"""What the tests of the model zoo (configs/) share: loading a config, building its model,
the fake COCO and ADE20K datasets, CPU-sized one-batch runs, and the backbone a config builds.

Every family's config tests (tests/test_*configs.py) use these; the fixtures ``coco_root``,
``ade_root`` and ``fast_init`` are in conftest.py.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from mmengine.config import Config, ConfigDict
from mmengine.evaluator import Evaluator
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from torch import nn

import mmpvt  # noqa: F401  (registers the backbones)
from mmpvt.models.layers import DropPath

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


_LOADED: dict[str, Config] = {}


def load(name: str) -> Config:
    """A fresh copy of configs/<name> (each file is parsed once per session)."""
    if name not in _LOADED:
        _LOADED[name] = Config.fromfile(str(CONFIGS / name))
    return copy.deepcopy(_LOADED[name])


def registry(cfg: Config):
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    return MODELS


def build_model(cfg: Config) -> torch.nn.Module:
    return registry(cfg).build(cfg.model)


def count_params(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def walk(node, visit):
    """Calls ``visit`` on every dict inside nested dicts and lists."""
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            walk(value, visit)
    elif isinstance(node, (list, tuple)):
        for value in node:
            walk(value, visit)


def set_data_root(cfg: Config, root: Path) -> None:
    """Applies the --cfg-options that configs/README.md gives for a dataset elsewhere."""
    root = f'{root}/'
    options = {f'{split}_dataloader.dataset.data_root': root for split in ('train', 'val', 'test')}
    if cfg.default_scope == 'mmdet':
        options.update({f'{split}_evaluator.ann_file': root + 'annotations/instances_val2017.json'
                        for split in ('val', 'test')})
    cfg.merge_from_dict(options)


def shrink(node, factor: int = 8) -> None:
    """Divides every resize scale and crop size in a pipeline (or data preprocessor) by factor."""
    def small(size):
        return tuple(max(1, round(s / factor)) for s in size)

    def visit(d):
        for key in ('scale', 'crop_size', 'size'):
            if isinstance(d.get(key), (tuple, list)) and all(isinstance(s, int) for s in d[key]):
                d[key] = small(d[key])
        if isinstance(d.get('scales'), list):
            d['scales'] = [small(s) for s in d['scales']]

    walk(node, visit)


# -- the backbone a config builds -----------------------------------------------------------------
# The zoo's 1x / 40k recipes (configs/_base_/retinanet.py, mask_rcnn.py, fpn_ade20k.py): AdamW's lr
# per method, weight decay 1e-4.
ZOO_LR = {'retinanet': 1e-4, 'mask_rcnn': 2e-4, 'fpn': 2e-4}


def check_zoo_recipe(cfg: Config, method: str) -> None:
    """The zoo's recipe for ``method``: AdamW, 12 epochs at a batch of 16 (detectors) or 40k
    iterations at 32 (Semantic FPN)."""
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', ZOO_LR[method], 1e-4)
    if method == 'fpn':
        assert cfg.train_cfg.max_iters == 40000 and cfg.auto_scale_lr.base_batch_size == 32
    else:
        assert cfg.train_cfg.max_epochs == 12 and cfg.auto_scale_lr.base_batch_size == 16


def check_fpn_wiring(cfg: Config, method: str, channels: list[int]) -> None:
    """The neck reads the backbone's levels of ``channels`` (all four): from stride 8 for
    RetinaNet (the stride-4 level, and its output norm, not built), from stride 4 otherwise."""
    backbone, neck = cfg.model.backbone, cfg.model.neck
    if method == 'retinanet':
        assert backbone.out_indices == (1, 2, 3)
        assert neck.in_channels == channels[1:] and neck.start_level == 0
    else:
        assert backbone.out_indices == (0, 1, 2, 3) and neck.in_channels == channels


def backbone_of(cfg: Config) -> nn.Module:
    """The config's backbone, built on the meta device (no memory, no weights loaded)."""
    from mmpvt.registry import MODELS
    backbone = dict(copy.deepcopy(cfg.model.backbone), init_cfg=None)
    backbone.pop('_delete_', None)
    with torch.device('meta'):
        return MODELS.build(backbone)


def drop_path_of(model: nn.Module) -> float:
    """The stochastic depth a built backbone trains with: its last (largest) block rate."""
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    return max(rates, default=0.)


# -- the fake datasets ------------------------------------------------------------------------------
IMAGE_HW = (120, 160)


def _image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)


def write_fake_coco(root: Path) -> Path:
    """data/coco at ``root`` with train2017 (3 images), val2017 (2) and instances_*.json, boxes
    and polygons, of COCO's 80 categories."""
    from mmdet.datasets import CocoDataset

    (root / 'annotations').mkdir(parents=True)
    rng = np.random.default_rng(0)
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CocoDataset.METAINFO['classes'])]
    for split, num_images in (('train2017', 3), ('val2017', 2)):
        (root / split).mkdir()
        images, annotations = [], []
        for i in range(num_images):
            name = f'{i + 1:012d}.jpg'
            cv2.imwrite(str(root / split / name), _image(rng))
            images.append(dict(id=i + 1, file_name=name, height=IMAGE_HW[0], width=IMAGE_HW[1]))
            for j, (x, y, w, h) in enumerate([(10, 20, 60, 50), (80, 30, 50, 70)]):
                polygon = [x, y, x + w, y, x + w, y + h, x + w // 2, y + h - 10, x, y + h]
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=i + 1, category_id=1 + (i + j) % 3,
                    bbox=[x, y, w, h], area=float(w * h) * 0.9, iscrowd=0, segmentation=[polygon]))
        with open(root / 'annotations' / f'instances_{split}.json', 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return root


def write_fake_ade(root: Path) -> Path:
    """ADEChallengeData2016 at ``root`` with images/ and annotations/ (labels 0..150, 0 ignored)."""
    rng = np.random.default_rng(0)
    for split, num_images in (('training', 3), ('validation', 2)):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i in range(num_images):
            stem = f'ADE_{split[:5]}_{i + 1:08d}'
            cv2.imwrite(str(root / 'images' / split / f'{stem}.jpg'), _image(rng))
            label = np.zeros(IMAGE_HW, dtype=np.uint8)  # 0: "other", ignored
            label[10:70, 20:90] = 1 + i
            label[60:110, 80:150] = 150
            label[:, :10] = rng.integers(0, 151, (IMAGE_HW[0], 10))
            cv2.imwrite(str(root / 'annotations' / split / f'{stem}.png'), label)
    return root


# -- one batch through each method, on the real dataset layouts -----------------------------------
def cpu_sized(cfg: Config) -> None:
    """Images 8x smaller, data loaded in the process, fewer proposals and sampled RoIs: the same
    computation as the config's, a CPU-sized amount of it. Every family's one-batch tests use it."""
    for key in ('train_dataloader', 'val_dataloader'):
        shrink(cfg[key].dataset.pipeline)
        cfg[key].update(num_workers=0, persistent_workers=False)
        cfg[key].dataset.serialize_data = False  # its gc.collect() costs more than the test
    shrink(cfg.model.data_preprocessor)  # training pads: the 512 crops', LSJ's 1024 square

    def fewer_boxes(d):
        if d.get('type') == 'RandomSampler':
            d['num'] = 64
        if 'max_per_img' in d:
            d['max_per_img'] = min(d['max_per_img'], 100)
        if 'nms_pre' in d:
            d['nms_pre'] = min(d['nms_pre'], 200)
        if 'score_thr' in d:
            d['score_thr'] = 0.0  # an untrained head scores below the published threshold

    walk([cfg.model.get('train_cfg', {}), cfg.model.get('test_cfg', {})], fewer_boxes)


def first_batch(dataloader_cfg: ConfigDict, batch_size: int) -> dict:
    loader = Runner.build_dataloader(dict(copy.deepcopy(dataloader_cfg), batch_size=batch_size))
    return next(iter(loader))


def check_finite_losses(model, batch) -> None:
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode='loss')
    total, log_vars = model.parse_losses(losses)
    assert torch.isfinite(total), log_vars
    assert all(math.isfinite(v) for v in log_vars.values()), log_vars
    # Gradients for the backbone only: the heads' weight gradients are most of the cost.
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), 'no gradient reaches the backbone'


def detector_trains_and_predicts(cfg: Config, with_masks: bool) -> None:
    """One batch of loss (finite, reaching the backbone) and of predictions, evaluated."""
    model = build_model(cfg)
    model.init_weights()  # init_cfg is None: no download

    check_finite_losses(model, first_batch(cfg.train_dataloader, 2))

    model.eval()
    batch = first_batch(cfg.val_dataloader, 2)
    with torch.no_grad():
        outputs = model.val_step(batch)
    assert len(outputs) == 2
    for sample in outputs:
        pred = sample.pred_instances
        n = len(pred)
        assert n > 0
        assert pred.bboxes.shape == (n, 4) and pred.scores.shape == (n,) and pred.labels.shape == (n,)
        assert torch.isfinite(pred.bboxes).all() and ((pred.labels >= 0) & (pred.labels < 80)).all()
        assert sample.ori_shape == IMAGE_HW
        if with_masks:
            assert pred.masks.shape == (n, *IMAGE_HW)
    evaluator = Evaluator(cfg.val_evaluator)
    evaluator.dataset_meta = Runner.build_dataloader(cfg.val_dataloader).dataset.metainfo
    evaluator.process(outputs, batch)
    metrics = evaluator.evaluate(2)
    assert 'coco/bbox_mAP' in metrics and ('coco/segm_mAP' in metrics) == with_masks


def segmentor_trains_and_predicts(cfg: Config) -> None:
    """One batch of loss (labels reduced to 0..149 or ignored) and of prediction, evaluated."""
    model = build_model(cfg)
    model.init_weights()

    batch = first_batch(cfg.train_dataloader, 2)
    for sample in batch['data_samples']:
        labels = sample.gt_sem_seg.data.unique()
        assert ((labels < 150) | (labels == 255)).all()  # 1..150 became 0..149, 0 the ignore index
    check_finite_losses(model, batch)

    model.eval()
    batch = first_batch(cfg.val_dataloader, 1)
    with torch.no_grad():
        (sample,) = model.val_step(batch)
    seg = sample.pred_sem_seg.data
    assert seg.shape == (1, *IMAGE_HW)  # back at the original size, padding removed
    assert ((seg >= 0) & (seg < 150)).all()
    evaluator = Evaluator(cfg.val_evaluator)
    evaluator.dataset_meta = Runner.build_dataloader(cfg.val_dataloader).dataset.metainfo
    evaluator.process([sample], batch)
    assert 'mIoU' in evaluator.evaluate(1)
