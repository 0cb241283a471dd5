"""tools/check_data.py finds every kind of problem in a dataset before a run, and an image that
cannot be decoded during a run stops training or evaluation with one line naming the file and
pointing to tools/check_data.py."""
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest

from mmpvt.cli import explain_data_error, load_config
from mmpvt.datasets.synthetic import generate

from tooling import DEMO_CONFIGS, TOOLS, run_tool

RETINANET = DEMO_CONFIGS['retinanet']
FPN = DEMO_CONFIGS['fpn']
COCO = Path('data/synthetic/coco')
ADE = Path('data/synthetic/ade/ADEChallengeData2016')
SHORT = ['train_cfg.max_iters=1', 'train_dataloader.batch_size=2', 'val_cfg=None', 'val_dataloader=None',
         'val_evaluator=None']


@pytest.fixture(scope='module')
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('pristine_images')
    generate(root / 'data' / 'synthetic', num_train=2, num_val=2, seed=0, size=128)
    return root


@pytest.fixture
def workspace(pristine, tmp_path) -> Path:
    shutil.copytree(pristine / 'data', tmp_path / 'data')
    return tmp_path


def break_image(path: Path) -> None:
    """Keeps only the JPEG header, as a copy cut short does; the decoder then returns nothing."""
    path.write_bytes(path.read_bytes()[:120])
    assert cv2.imread(str(path)) is None


def assert_one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1, out.stderr[-3000:]
    assert 'Traceback' not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_undecodable_training_image_is_one_error_line(workspace):
    image = sorted((workspace / COCO / 'train2017').glob('*.jpg'))[0]
    break_image(image)
    out = run_tool([TOOLS / 'train.py', RETINANET, '--cfg-options', *SHORT], workspace)
    error = assert_one_error_line(out)
    assert f'image cannot be decoded: {COCO / "train2017" / image.name} ' in error, error
    assert 'train_dataloader.dataset (CocoDataset)' in error
    assert error.endswith(f'python tools/check_data.py {RETINANET}')


def test_undecodable_test_image_is_explained(workspace, monkeypatch):
    """The exception the test set's own pipeline raises, as test.py's wrapper sees it."""
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope

    monkeypatch.chdir(workspace)
    cfg = load_config(RETINANET)
    init_default_scope(cfg.default_scope)
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    image = dataset.get_data_info(1)['img_path']
    break_image(Path(image))
    with pytest.raises(Exception) as info:
        dataset[1]
    error = explain_data_error(cfg, info.value, ('test',))
    assert error is not None, f'not recognised: {info.value!r}'
    assert str(error).startswith(f'image cannot be decoded: {image} ')
    assert 'test_dataloader.dataset (CocoDataset)' in str(error)


# -- tools/check_data.py ---------------------------------------------------------------------------
def _coco_json(workspace: Path) -> Path:
    return workspace / COCO / 'annotations' / 'instances_train2017.json'


def test_check_of_clean_datasets_finds_nothing(workspace, monkeypatch):
    from mmpvt.cli.dataset_scan import check_datasets

    monkeypatch.chdir(workspace)
    for config in (RETINANET, FPN):
        report = check_datasets(load_config(config), ('train', 'val'), progress=False)
        assert not any(report.problems.values()) and report.images == 4 and not report.blocking


def test_check_finds_each_kind_of_coco_problem(workspace, monkeypatch):
    import json

    from mmpvt.cli.dataset_scan import check_datasets

    monkeypatch.chdir(workspace)
    path = _coco_json(workspace)
    coco = json.loads(path.read_text())
    first, second = coco['annotations'][0], coco['annotations'][1]
    image = next(i for i in coco['images'] if i['id'] == first['image_id'])
    first['bbox'] = [image['width'] - 5, 0, 20, 10]  # reaches 15 px beyond the right edge
    second['category_id'] = 999
    coco['annotations'].append({**first, 'id': 10**6, 'bbox': [3, 3, 0, 4]})
    coco['annotations'].append({**first, 'id': 10**6 + 1, 'image_id': 424242})
    coco['images'].append({'id': 777, 'file_name': 'unannotated.jpg', 'width': 128, 'height': 128})
    path.write_text(json.dumps(coco))
    images = workspace / COCO / 'train2017'
    shutil.copy(images / image['file_name'], images / 'unannotated.jpg')
    broken = sorted((workspace / COCO / 'val2017').glob('*.jpg'))[0]
    break_image(broken)
    report = check_datasets(load_config(RETINANET), ('train', 'val'), workers=2, progress=False)
    found = {kind: files for kind, files in report.problems.items() if files}
    assert set(found) == {'box_outside_image', 'box_without_area', 'unknown_category', 'unknown_image_id',
                          'undecodable_image'}
    assert found['undecodable_image'] == [str(COCO / 'val2017' / broken.name)]
    assert found['box_outside_image'][0].startswith(str(COCO / 'train2017' / image['file_name']))
    assert 'category 999' in found['unknown_category'][0]
    assert report.without_annotations == 1 and report.images == 2 + 1 + 2  # train, the added image, val
    assert report.blocking


def test_check_finds_invalid_label_values(workspace, monkeypatch):
    from mmpvt.cli.dataset_scan import check_datasets

    monkeypatch.chdir(workspace)
    label_map = sorted((workspace / ADE / 'annotations' / 'training').glob('*.png'))[0]
    labels = cv2.imread(str(label_map), cv2.IMREAD_UNCHANGED)
    labels[0, 0] = 200  # the demo has few classes; 200 is none of them (255 is ignored)
    cv2.imwrite(str(label_map), labels)
    report = check_datasets(load_config(FPN), ('train',), progress=False)
    found = {kind: files for kind, files in report.problems.items() if files}
    assert list(found) == ['invalid_label_values'] and str(label_map.name) in found['invalid_label_values'][0]
    assert '200' in found['invalid_label_values'][0] and report.blocking


@pytest.mark.slow
def test_check_data_tool_exit_status_and_report(workspace):
    import json

    image = sorted((workspace / COCO / 'train2017').glob('*.jpg'))[0]
    break_image(image)
    bad = run_tool([TOOLS / 'check_data.py', RETINANET, '--split', 'train', '--workers', '2',
                    '--out', 'bad.json'], workspace)
    assert bad.returncode == 1, bad.stderr[-3000:]
    row = next(line for line in bad.stdout.splitlines() if line.startswith('| image cannot be decoded'))
    assert '| 1 | yes |' in row and image.name in row
    assert json.loads((workspace / 'bad.json').read_text())['problems']['undecodable_image'] == [
        str(COCO / 'train2017' / image.name)]
