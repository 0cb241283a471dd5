"""Broken datasets fail with one line naming the file: no traceback from deep inside a dataset.

Each test generates the tiny synthetic dataset, breaks one file, and runs the tool the way
a user would (or calls the check it relies on).
"""
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmpvt.cli import LaunchError, check_data, explain_data_error, load_config
from mmpvt.datasets.synthetic import generate
from mmpvt.datasets.transforms import SegLabelError, check_seg_labels

from tooling import DEMO_CONFIGS, TOOLS
from tooling import run_tool as run

RETINANET = DEMO_CONFIGS['retinanet']
FPN = DEMO_CONFIGS['fpn']
COCO = Path('data/synthetic/coco')
ADE = Path('data/synthetic/ade/ADEChallengeData2016')
# Two iterations of two images: every one of the four training images is loaded.
SHORT = ['train_cfg.max_iters=2', 'train_dataloader.batch_size=2', 'val_cfg=None', 'val_dataloader=None',
         'val_evaluator=None']


@pytest.fixture(scope='module')
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('pristine')
    generate(root / 'data' / 'synthetic', num_train=4, num_val=2, seed=0, size=128)
    return root


@pytest.fixture
def workspace(pristine, tmp_path) -> Path:
    """A copy of the dataset of this test's own, to break."""
    shutil.copytree(pristine / 'data', tmp_path / 'data')
    return tmp_path


def assert_clean_error(out: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 1, a one-line ``error: ...`` with every expected text, no traceback."""
    assert out.returncode == 1, out.stderr[-3000:]
    assert 'Traceback' not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, out.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# -- annotation files ------------------------------------------------------------------------------
def test_missing_annotation_file_is_named(workspace, monkeypatch):
    """The image directories exist; the JSON that lists the images does not."""
    (workspace / COCO / 'annotations' / 'instances_train2017.json').unlink()
    out = run([TOOLS / 'train.py', RETINANET], workspace)
    assert_clean_error(out, f'dataset path not found: {COCO}/annotations/instances_train2017.json',
                       'train_dataloader.dataset (CocoDataset)')
    # The check that found it lists the layout with the missing file marked.
    monkeypatch.chdir(workspace)
    with pytest.raises(LaunchError, match=r'instances_train2017\.json   <- missing'):
        check_data(load_config(RETINANET), ('train',))


@pytest.mark.slow
def test_truncated_annotation_file_is_named_with_line_and_column(workspace):
    path = workspace / COCO / 'annotations' / 'instances_train2017.json'
    truncate(path)
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        where = f'line {exc.lineno} column {exc.colno}: {exc.msg}'
    out = run([TOOLS / 'train.py', RETINANET, '--cfg-options', *SHORT], workspace)
    assert_clean_error(out, f'annotation file is not valid JSON: {COCO}/annotations/instances_train2017.json',
                       where, 'train_dataloader.dataset.ann_file')


@pytest.mark.slow
def test_test_tool_names_a_broken_val_annotation_file(workspace):
    """tools/test.py reads the JSON before the checkpoint: any file stands in for it."""
    truncate(workspace / COCO / 'annotations' / 'instances_val2017.json')
    (workspace / 'model.pth').write_bytes(b'')
    out = run([TOOLS / 'test.py', RETINANET, workspace / 'model.pth'], workspace)
    assert_clean_error(out, f'annotation file is not valid JSON: {COCO}/annotations/instances_val2017.json',
                       'line 1 column')


def test_json_error_is_traced_to_its_file_through_a_re_raise(workspace, monkeypatch):
    """As a dataset class or a builder may raise another exception while handling json's."""
    monkeypatch.chdir(workspace)
    cfg = load_config(RETINANET)
    bad = workspace / COCO / 'annotations' / 'instances_val2017.json'
    bad.write_text('{"images": [1, 2,, 3]}')
    with pytest.raises(TypeError) as info:
        try:
            json.loads(bad.read_text())
        except json.JSONDecodeError as exc:
            raise TypeError(f'CocoDataset: {exc}') from None  # a re-raise that drops the cause...
    assert info.value.__context__ is not None  # ...still keeps the original as its context
    error = explain_data_error(cfg, info.value, ('train', 'val'))
    assert error is not None
    assert str(error).startswith(
        f'annotation file is not valid JSON: {COCO}/annotations/instances_val2017.json '
        '(line 1 column 18: Expecting value; val_dataloader.dataset.ann_file)')
    assert explain_data_error(cfg, ValueError('unrelated'), ('train', 'val')) is None
    # A missing file that belongs to no dataset (a checkpoint, say) is not a data error.
    missing = FileNotFoundError(2, 'No such file or directory', str(workspace / 'model.pth'))
    assert explain_data_error(cfg, missing, ('train', 'val')) is None


# -- images ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_image_is_named_with_the_annotation_file_listing_it(workspace):
    (workspace / COCO / 'train2017' / '000002.jpg').unlink()
    out = run([TOOLS / 'train.py', RETINANET, '--cfg-options', *SHORT], workspace)
    assert_clean_error(out, f'image not found: {COCO}/train2017/000002.jpg',
                       f'listed in {COCO}/annotations/instances_train2017.json')


def test_errors_raised_in_dataloader_workers_are_explained_too(workspace, monkeypatch):
    """With num_workers > 0 torch re-raises a worker's exception with only its traceback text."""
    from torch._utils import ExceptionWrapper

    def from_worker(raise_it) -> Exception:
        try:
            raise_it()
        except Exception:
            wrapper = ExceptionWrapper(where='in DataLoader worker process 0')
        with pytest.raises(Exception) as info:
            wrapper.reraise()
        assert 'Original Traceback' in str(info.value)
        return info.value

    monkeypatch.chdir(workspace)
    cfg = load_config(RETINANET)
    (workspace / COCO / 'train2017' / '000002.jpg').unlink()
    missing = from_worker(lambda: open(COCO / 'train2017' / '000002.jpg', 'rb'))
    assert str(explain_data_error(cfg, missing, ('train',))).startswith(
        f'image not found: {COCO}/train2017/000002.jpg '
        f'(listed in {COCO}/annotations/instances_train2017.json')

    def bad_labels():
        check_seg_labels(np.array([[9]], dtype=np.uint8), 3, reduce_zero_label=True, path='x.png')
    error = explain_data_error(cfg, from_worker(bad_labels), ('train',))
    assert str(error) == ('label map x.png has values 10 that are not classes of the dataset: stored values '
                          '1..3 are the 3 classes; 0 and 255 are ignored (reduce_zero_label=True)')


# -- label maps --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_label_map_with_values_that_are_no_class_is_named(workspace):
    png = workspace / ADE / 'annotations' / 'training' / '000001.png'
    labels = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    labels[:8, :8] = 200
    cv2.imwrite(str(png), labels)
    out = run([TOOLS / 'train.py', FPN, '--cfg-options', *SHORT], workspace)
    assert_clean_error(out, f'label map {ADE}/annotations/training/000001.png has values 200 ',
                       'stored values 1..3 are the 3 classes; 0 and 255 are ignored (reduce_zero_label=True)')


def test_check_seg_labels_speaks_of_the_stored_values():
    # As LoadAnnotations returns a map with reduce_zero_label: stored k -> k - 1, stored 0 -> 255.
    loaded = np.array([[255, 0, 1, 2], [199, 199, 7, 255]], dtype=np.uint8)
    with pytest.raises(SegLabelError, match=r'a\.png has values 8, 200 that are not classes .* 1\.\.3'):
        check_seg_labels(loaded, 3, reduce_zero_label=True, path='a.png')
    with pytest.raises(SegLabelError, match=r'has values 7, 199 .* stored values 0\.\.2 .* 255 is ignored'):
        check_seg_labels(loaded, 3, reduce_zero_label=False, path='a.png')
    with pytest.raises(SegLabelError, match=r"values 7, 199 \(after the dataset's label_map\)"):
        check_seg_labels(loaded, 3, label_map={5: 0}, path='a.png')
    check_seg_labels(loaded, 200)  # every value a class or ignored


def test_check_seg_labels_is_an_mmseg_transform():
    from mmseg.registry import TRANSFORMS
    check = TRANSFORMS.build(dict(type='CheckSegLabels', num_classes=3))
    good = dict(gt_seg_map=np.array([[0, 2, 255]], dtype=np.uint8), seg_map_path='x.png',
                reduce_zero_label=True)
    assert check(dict(good)) is not None
    with pytest.raises(SegLabelError, match=r'x\.png has values 4 '):
        check(dict(good, gt_seg_map=np.array([[3]], dtype=np.uint8)))
