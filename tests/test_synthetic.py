"""The synthetic shapes dataset: deterministic, non-trivial, and readable by mmdet and mmseg."""
import filecmp
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mmpvt.datasets import synthetic
from mmpvt.datasets.synthetic import CLASSES, generate, render_image

ADE = Path('ade/ADEChallengeData2016')


@pytest.fixture(scope='module')
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('synthetic')
    generate(out, num_train=24, num_val=6, seed=3, size=128)
    return out


def all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob('*') if p.is_file())


def test_layout_is_that_of_coco_and_ade20k(dataset_dir):
    assert (dataset_dir / 'coco/annotations/instances_train2017.json').is_file()
    assert (dataset_dir / 'coco/annotations/instances_val2017.json').is_file()
    assert len(list((dataset_dir / 'coco/train2017').glob('*.jpg'))) == 24
    assert len(list((dataset_dir / 'coco/val2017').glob('*.jpg'))) == 6
    for split, n in (('training', 24), ('validation', 6)):
        assert len(list((dataset_dir / ADE / 'images' / split).glob('*.jpg'))) == n
        assert len(list((dataset_dir / ADE / 'annotations' / split).glob('*.png'))) == n


def test_same_seed_same_bytes_whatever_the_workers(dataset_dir, tmp_path):
    generate(tmp_path / 'a', num_train=24, num_val=6, seed=3, size=128, workers=2)
    files = all_files(dataset_dir)
    assert files == all_files(tmp_path / 'a')
    names = [str(f) for f in files]
    _, mismatch, errors = filecmp.cmpfiles(dataset_dir, tmp_path / 'a', names, shallow=False)
    assert not mismatch and not errors


def test_another_seed_other_images(dataset_dir, tmp_path):
    generate(tmp_path / 'b', num_train=2, num_val=1, seed=4, size=128)
    same = dataset_dir / 'coco/train2017/000000.jpg'
    assert same.read_bytes() != (tmp_path / 'b/coco/train2017/000000.jpg').read_bytes()


def test_prefix_of_a_larger_set_is_the_same(dataset_dir, tmp_path):
    """Each image has its own random stream: a smaller set is the start of a larger one."""
    generate(tmp_path / 'c', num_train=3, num_val=1, seed=3, size=128)
    for name in ('000000.jpg', '000002.jpg'):
        assert (dataset_dir / 'coco/train2017' / name).read_bytes() == \
            (tmp_path / 'c/coco/train2017' / name).read_bytes()


def test_coco_annotations_load_and_fit_their_images(dataset_dir):
    coco = COCO(str(dataset_dir / 'coco/annotations/instances_train2017.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == 24
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 24 * 1.5  # one to three objects per image, a few left out when hidden
    assert len({a['id'] for a in anns}) == len(anns)
    for ann in anns:
        x, y, w, h = ann['bbox']
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
        assert ann['iscrowd'] == 0 and ann['segmentation']
        # The polygons rasterise back to the annotated area, small objects included.
        rle = mask_utils.merge(mask_utils.frPyObjects(ann['segmentation'], 128, 128))
        assert mask_utils.area(rle) == pytest.approx(ann['area'], rel=0.1, abs=3)


def test_the_task_is_not_trivial(tmp_path):
    """Three classes, three COCO scales (small under 32 px), occlusion, varied colours."""
    counts = generate(tmp_path, num_train=40, num_val=1, seed=0, size=256)['train']
    assert counts['small'] > 0 and counts['medium'] > 0 and counts['large'] > 0
    coco = json.loads((tmp_path / 'coco/annotations/instances_train2017.json').read_text())
    assert {a['category_id'] for a in coco['annotations']} == {1, 2, 3}
    # Occlusion: some objects are partly hidden, none by more than 1 - MIN_VISIBLE, and the
    # visible masks (what the annotations hold) do not overlap.
    occluded = 0
    for index in range(40):
        _, instances = render_image(np.random.default_rng([0, 0, index]), 256)
        union = np.zeros((256, 256), bool)
        for inst in instances:
            assert not (inst.mask & union).any()
            union |= inst.mask
            assert inst.mask.sum() >= synthetic.MIN_VISIBLE * inst.full_area - 1
            occluded += inst.mask.sum() < inst.full_area
    assert occluded >= 3
    full_vs_visible = [
        (a['area'], a['bbox'][2] * a['bbox'][3]) for a in coco['annotations']]
    assert all(area <= box for area, box in full_vs_visible)
    img = cv2.imread(str(tmp_path / 'coco/train2017/000000.jpg'))
    assert img.shape == (256, 256, 3) and img.reshape(-1, 3).std(0).min() > 5  # textured, not flat


def test_label_maps_agree_with_the_instances(dataset_dir):
    coco = COCO(str(dataset_dir / 'coco/annotations/instances_val2017.json'))
    for image in coco.loadImgs(coco.getImgIds()):
        label = cv2.imread(str(dataset_dir / ADE / 'annotations/validation' / image['file_name'].replace(
            '.jpg', '.png')), cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and label.shape == (128, 128)
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image['id'])):
            mask = coco.annToMask(ann).astype(bool)
            assert (label[mask] == ann['category_id']).mean() > 0.95


def test_mmdet_coco_dataset_reads_it(dataset_dir):
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets import CocoDataset
    from mmdet.datasets.transforms import LoadAnnotations

    # Transform objects rather than registry names: the lookup would depend on the default
    # scope other tests left behind.
    dataset = CocoDataset(
        data_root=str(dataset_dir / 'coco'), ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'), metainfo=dict(classes=CLASSES),
        pipeline=[LoadImageFromFile(), LoadAnnotations(with_bbox=True, with_mask=True)])
    assert len(dataset) == 6
    sample = dataset[0]
    assert sample['img'].shape == (128, 128, 3)
    assert len(sample['gt_bboxes']) == len(sample['gt_masks']) > 0
    assert set(sample['gt_bboxes_labels'].tolist()) <= {0, 1, 2}


def test_mmseg_dataset_classes_read_it(dataset_dir):
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets import ADE20KDataset, BaseSegDataset
    from mmseg.datasets.transforms import LoadAnnotations

    pipeline = [LoadImageFromFile(), LoadAnnotations()]
    prefix = dict(img_path='images/validation', seg_map_path='annotations/validation')
    ade = ADE20KDataset(data_root=str(dataset_dir / ADE), data_prefix=prefix, pipeline=pipeline)
    assert len(ade) == 6
    # The demo's class list, in the same layout.
    demo = BaseSegDataset(data_root=str(dataset_dir / ADE), data_prefix=prefix, pipeline=pipeline,
                          img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True,
                          metainfo=dict(classes=CLASSES, palette=synthetic.PALETTE))
    assert len(demo) == 6 and demo.metainfo['classes'] == CLASSES
    seg = demo[0]['gt_seg_map']
    assert seg.shape == (128, 128) and set(np.unique(seg)) <= {0, 1, 2, 255} and (seg != 255).any()


def test_command_line(tmp_path, python):
    out = subprocess.run(
        [python, '-m', 'mmpvt.datasets.synthetic', str(tmp_path), '--num-train', '2', '--num-val', '1',
         '--seed', '1', '--size', '64', '--workers', '1'],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'train: 2 images' in out.stdout and 'val: 1 images' in out.stdout
    assert (tmp_path / 'coco/annotations/instances_val2017.json').is_file()


def test_bad_arguments():
    with pytest.raises(ValueError, match='at least one image'):
        generate('unused', num_train=0, num_val=1)
    with pytest.raises(ValueError, match='size >= 64'):
        generate('unused', num_train=1, num_val=1, size=32)
