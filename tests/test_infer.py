"""tools/infer.py: a trained detector and segmentor on a folder of images, and the bad inputs.

The models are the demo configs trained for two iterations on a tiny synthetic set (they
predict nothing sensible, which does not matter here): the drawings must decode at each
image's own size and predictions.json must hold one well-formed record per image.
"""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mmpvt.apis import (
    ImagePredictor,
    build_model,
    check_checkpoint_fits,
    detection_record,
    find_images,
    output_names,
    segmentation_record,
)
from mmpvt.checkpoint import CheckpointError
from mmpvt.cli import LaunchError, load_config
from mmpvt.datasets.synthetic import generate

from tooling import DEMO_CONFIGS, TOOLS
from tooling import run_tool as run

CLASSES = ['circle', 'rectangle', 'triangle']
# Two iterations of two images, no validation, a checkpoint at the end.
TINY_RUN = ['train_cfg.max_iters=2', 'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=2',
            'train_dataloader.batch_size=2']
# An untrained detector scores everything under its default 0.05: keep every box it finds.
KEEP_ALL = ['--score-thr', '0', '--cfg-options', 'model.test_cfg.score_thr=0.0']


@pytest.fixture(scope='module')
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('infer')
    generate(root / 'data' / 'synthetic', num_train=4, num_val=2, seed=0, size=128)
    return root


def train(kind: str, workspace: Path) -> Path:
    work_dir = workspace / f'work_{kind}'
    out = run([TOOLS / 'train.py', DEMO_CONFIGS[kind], '--work-dir', work_dir, '--cfg-options', *TINY_RUN],
              cwd=workspace)
    assert out.returncode == 0, out.stderr[-3000:]
    return work_dir / 'iter_2.pth'


@pytest.fixture(scope='module')
def detector(workspace) -> Path:
    return train('retinanet', workspace)


@pytest.fixture(scope='module')
def segmentor(workspace) -> Path:
    return train('fpn', workspace)


def image_folder(images: list[Path], folder: Path) -> dict[str, tuple[int, int]]:
    """The images, plus one resized to 160x96 as a PNG; returns each file's (height, width)."""
    folder.mkdir()
    sizes = {}
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
        sizes[image.name] = (128, 128)
    wide = cv2.resize(cv2.imread(str(images[0])), (160, 96))
    cv2.imwrite(str(folder / 'wide.png'), wide)
    sizes['wide.png'] = (96, 160)
    return sizes


def check_drawings(out_dir: Path, summary: dict, folder: Path, sizes: dict) -> None:
    """One record per image, in order; each drawing decodes at its image's size and is a drawing."""
    assert [Path(r['image']).name for r in summary['images']] == sorted(sizes)
    for record in summary['images']:
        name = Path(record['image']).name
        assert (record['height'], record['width']) == sizes[name]
        assert record['drawing'] == Path(name).with_suffix('.png').name
        drawing = cv2.imread(str(out_dir / record['drawing']))
        assert drawing is not None and drawing.shape == (*sizes[name], 3)
        assert not np.array_equal(drawing, cv2.imread(str(folder / name)))  # something was drawn


@pytest.mark.slow
def test_detector_on_a_folder(detector, workspace):
    folder = workspace / 'det_images'
    sizes = image_folder(sorted((workspace / 'data/synthetic/coco/val2017').glob('*.jpg')), folder)
    out_dir = workspace / 'det_out'
    out = run([TOOLS / 'infer.py', folder, DEMO_CONFIGS['retinanet'], detector, '--out-dir', out_dir,
               '--batch-size', 2, *KEEP_ALL], cwd=workspace)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f'{len(sizes)}/{len(sizes)}' in out.stderr  # the progress bar reached the end
    summary = json.loads((out_dir / 'predictions.json').read_text())
    assert summary['task'] == 'detection' and summary['classes'] == CLASSES and summary['score_thr'] == 0
    check_drawings(out_dir, summary, folder, sizes)
    for record in summary['images']:
        instances = record['instances']
        assert instances, 'a threshold of 0 keeps every box the model returns'
        scores = [inst['score'] for inst in instances]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        for inst in instances:
            assert inst['class_name'] == CLASSES[inst['label']]
            x1, y1, x2, y2 = inst['bbox']
            assert 0 <= x1 <= x2 <= record['width'] + 0.5 and 0 <= y1 <= y2 <= record['height'] + 0.5


@pytest.mark.slow
def test_segmentor_on_a_glob(segmentor, workspace):
    folder = workspace / 'seg_images'
    sizes = image_folder(sorted((workspace / 'data/synthetic/ade/ADEChallengeData2016/images/validation')
                                .glob('*.jpg')), folder)
    out_dir = workspace / 'seg_out'
    out = run([TOOLS / 'infer.py', f'{folder}/*', DEMO_CONFIGS['fpn'], segmentor, '--out-dir', out_dir,
               '--batch-size', 2], cwd=workspace)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((out_dir / 'predictions.json').read_text())
    assert summary['task'] == 'segmentation' and summary['classes'] == CLASSES
    check_drawings(out_dir, summary, folder, sizes)
    for record in summary['images']:
        classes = record['classes']
        assert sum(c['pixels'] for c in classes) == record['height'] * record['width']
        assert abs(sum(c['fraction'] for c in classes) - 1) < 1e-3
        assert all(c['class_name'] == CLASSES[c['label']] for c in classes)


@pytest.mark.slow
def test_a_damaged_image_is_named(detector, workspace, tmp_path):
    good = next((workspace / 'data/synthetic/coco/val2017').glob('*.jpg'))
    (tmp_path / 'a.jpg').write_bytes(good.read_bytes())
    (tmp_path / 'b.jpg').write_bytes(good.read_bytes()[:2000])  # a JPEG header, then nothing
    out = run([TOOLS / 'infer.py', tmp_path, DEMO_CONFIGS['retinanet'], detector, '--out-dir',
               tmp_path / 'out'], cwd=workspace)
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    damaged = tmp_path / 'b.jpg'
    assert f'\nerror: cannot read image {damaged}: not an image file, or a damaged one' in out.stderr


# -- bad input, before any model runs -------------------------------------------------------------
def test_inputs_without_images_are_refused(tmp_path):
    (tmp_path / 'notes.txt').write_text('no image')
    with pytest.raises(LaunchError, match=rf'no images found in {tmp_path}/ \(looked for files ending in'):
        find_images(tmp_path)
    with pytest.raises(LaunchError, match=r'no images match .*\*\.png'):
        find_images(f'{tmp_path}/*.png')
    with pytest.raises(LaunchError, match=r'input not found: .*nope\.jpg \(expected an image, a folder'):
        find_images(tmp_path / 'nope.jpg')


def test_images_and_their_output_names(tmp_path):
    for name in ('b.jpg', 'a.jpg', 'a.png', 'sub/c.JPG', 'notes.txt'):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b'')
    images, root = find_images(tmp_path)
    assert [p.name for p in images] == ['a.jpg', 'a.png', 'b.jpg'] and root == tmp_path  # not subfolders
    assert output_names(images, root) == ['a_jpg.png', 'a_png.png', 'b.png']
    images, root = find_images(f'{tmp_path}/**/*')
    assert output_names(images, root) == ['a_jpg.png', 'a_png.png', 'b.png', 'sub/c.png']
    assert find_images(tmp_path / 'notes.txt') == ([tmp_path / 'notes.txt'], tmp_path)  # named: taken


@pytest.mark.slow
def test_cli_names_a_file_that_is_not_an_image(tmp_path):
    (tmp_path / 'x.jpg').write_bytes(b'not a jpeg' * 20)
    out = run([TOOLS / 'infer.py', tmp_path, DEMO_CONFIGS['retinanet'], tmp_path / 'x.jpg'], cwd=tmp_path)
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == f'error: cannot read image {tmp_path / "x.jpg"}: not an image file'


def test_records_keep_what_is_drawn():
    masks = [{'size': [8, 8], 'counts': c} for c in 'abc']
    pred = dict(labels=[2, 0, 1], scores=[0.2, 0.9, 0.5],
                bboxes=[[0, 0, 1, 1], [1, 2, 3, 4.567], [5, 5, 6, 6]], masks=masks)
    record = detection_record(pred, CLASSES, score_thr=0.3)
    assert record == {'instances': [
        dict(label=0, class_name='circle', score=0.9, bbox=[1.0, 2.0, 3.0, 4.57], mask=masks[1]),
        dict(label=1, class_name='rectangle', score=0.5, bbox=[5.0, 5.0, 6.0, 6.0], mask=masks[2])]}
    seg = np.array([[0, 0, 2], [2, 2, 2]])
    assert segmentation_record(seg, CLASSES) == {'classes': [
        dict(label=2, class_name='triangle', pixels=4, fraction=0.6667),
        dict(label=0, class_name='circle', pixels=2, fraction=0.3333)]}


# -- checkpoints that must not load ---------------------------------------------------------------
@pytest.fixture(scope='module')
def untrained_checkpoint(tmp_path_factory) -> Path:
    """The demo RetinaNet's freshly built weights, saved as mmengine saves a checkpoint."""
    path = tmp_path_factory.mktemp('ckpt') / 'retinanet.pth'
    model = build_model(load_config(DEMO_CONFIGS['retinanet']))
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': {'classes': CLASSES}}}, path)
    return path


def test_checkpoint_of_another_head_is_refused_naming_key_and_shapes(untrained_checkpoint):
    cfg = load_config(DEMO_CONFIGS['retinanet'], {'model.bbox_head.num_classes': 5})
    with pytest.raises(LaunchError) as info:
        ImagePredictor(cfg, untrained_checkpoint)
    width = cfg.model.bbox_head.feat_channels  # the demo's head: 128
    expected = (f'{untrained_checkpoint} does not fit the RetinaNet of this config: '
                f'bbox_head.retina_cls.weight has shape (27, {width}, 3, 3) in the checkpoint and '
                f'(45, {width}, 3, 3) in the model')
    assert expected in str(info.value)


def test_backbone_checkpoint_is_named_as_such_with_the_way_to_use_it(tmp_path):
    """A backbone's weights given where a trained detector's belong: not 'lacks N of N tensors'
    but what the file is, where it goes instead (init_cfg), and what testing needs."""
    model = build_model(load_config(DEMO_CONFIGS['retinanet']))
    path = tmp_path / 'pvt_v2_b0_backbone.pth'
    torch.save(model.backbone.state_dict(), path)
    with pytest.raises(LaunchError) as info:
        check_checkpoint_fits(model, path)
    message = str(info.value)
    assert message.startswith(f'{path} holds no backbone.* tensors: it is a backbone or classification')
    assert f'--cfg-options model.backbone.init_cfg.checkpoint={path}' in message
    assert 'tools/convert_checkpoint.py' in message and 'lacks' not in message


def test_checkpoint_lacking_tensors_is_refused(untrained_checkpoint, tmp_path):
    checkpoint = torch.load(untrained_checkpoint, weights_only=True)
    state = checkpoint['state_dict']
    checkpoint['state_dict'] = {k: v for k, v in state.items() if not k.startswith('neck.')}
    torch.save(checkpoint, tmp_path / 'no_neck.pth')
    with pytest.raises(LaunchError, match=r'no_neck\.pth lacks \d+ of the \d+ tensors .*neck\.'):
        ImagePredictor(load_config(DEMO_CONFIGS['retinanet']), tmp_path / 'no_neck.pth')


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    """The inferencer reads the file through mmengine's loader, which mmpvt makes weights-only."""
    import os
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    torch.save({'state_dict': {}, 'meta': Payload()}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match=r'evil\.pth holds objects that are not plain weights'):
        ImagePredictor(load_config(DEMO_CONFIGS['retinanet']), tmp_path / 'evil.pth')
    assert not marker.exists()


@pytest.mark.slow
def test_cli_mismatch_is_one_error_line(untrained_checkpoint, tmp_path):
    cv2.imwrite(str(tmp_path / 'one.jpg'), np.full((64, 64, 3), 100, np.uint8))
    out = run([TOOLS / 'infer.py', tmp_path / 'one.jpg', DEMO_CONFIGS['fpn'], untrained_checkpoint,
               '--out-dir', tmp_path / 'out'], cwd=tmp_path)
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: {untrained_checkpoint} does not fit the EncoderDecoder of this config: ')
    assert ' has shape (' in last and ' in the checkpoint and (' in last
    assert not (tmp_path / 'out').exists()


# -- an export in place of the PyTorch backbone, neck and head ---------------------------------
def export_tensor_mode(config: Path, checkpoint: Path, out: Path, *options: str) -> None:
    result = run([TOOLS / 'deploy' / 'export.py', config, checkpoint, '--format', out.suffix[1:],
                  '--shape', 128, 128, '--out', out, *options], cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]


def predictions(folder: Path, config: Path, checkpoint: Path, out_dir: Path, *options) -> dict:
    out = run([TOOLS / 'infer.py', folder, config, checkpoint, '--out-dir', out_dir, '--device', 'cpu',
               *options], cwd=out_dir.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((out_dir / 'predictions.json').read_text())


@pytest.mark.slow
@pytest.mark.parametrize('backend, suffix', [('onnxruntime', '.onnx'), ('torch.export', '.pt2')])
def test_detector_export_predicts_what_pytorch_predicts(backend, suffix, detector, workspace):
    """The trained RetinaNet's tensor mode exported (static 128x128: RetinaNet's stride-128 level
    needs 129 pixels for a dynamic export) and run between mmdet's pre- and post-processing on
    the synthetic val images: the same detections, boxes within 1e-3 px, scores within 1e-4."""
    root = workspace / f'det_export_{backend}'
    root.mkdir()
    model = root / f'retinanet{suffix}'
    export_tensor_mode(DEMO_CONFIGS['retinanet'], detector, model)
    folder = workspace / 'data/synthetic/coco/val2017'
    eager = predictions(folder, DEMO_CONFIGS['retinanet'], detector, root / 'eager', *KEEP_ALL)
    exported = predictions(folder, DEMO_CONFIGS['retinanet'], detector, root / 'exported',
                           '--backend', backend, '--model', model, *KEEP_ALL)
    assert len(eager['images']) == len(exported['images']) == 2
    if backend == 'onnxruntime':  # the file is what runs: the backbone's outputs are refused
        backbone = root / 'backbone.onnx'
        export_tensor_mode(DEMO_CONFIGS['retinanet'], detector, backbone, '--backbone-only')
        out = run([TOOLS / 'infer.py', folder, DEMO_CONFIGS['retinanet'], detector, '--out-dir', root / 'bad',
                   '--device', 'cpu', '--backend', backend, '--model', backbone], cwd=root)
        assert out.returncode == 1
        assert f'error: {backbone} is not this detector\'s tensor mode: 4 outputs' in out.stderr, out.stderr
    for a, b in zip(eager['images'], exported['images']):
        assert a['instances']
        matched_instances(a['instances'], b['instances'])


# predictions.json records scores to 4 decimals and boxes to 0.01 px: values within 1e-4 and
# 1e-3 px of each other may be recorded up to one rounding step further apart.
SCORE_TOL, BOX_TOL = 1e-4 + 1e-4 + 1e-9, 1e-3 + 1e-2 + 1e-9


def matched_instances(eager: list[dict], exported: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs each eager detection with an exported one of the same class, score within 1e-4
    and box within 1e-3 px (as recorded: ``SCORE_TOL``, ``BOX_TOL``); both lists must pair up
    whole. (Scores equal to 1e-4 may swap places in a list sorted by score, so pairs are
    found, not read off in order.)"""
    assert len(eager) == len(exported)
    left, pairs = list(exported), []
    for a in eager:
        b = next((b for b in left if b['label'] == a['label'] and abs(b['score'] - a['score']) <= SCORE_TOL
                  and np.abs(np.subtract(a['bbox'], b['bbox'])).max() <= BOX_TOL), None)
        assert b is not None, f'no exported detection matches {a}'
        left.remove(b)
        pairs.append((a, b))
    return pairs


@pytest.mark.slow
def test_two_stage_export_predicts_what_pytorch_predicts(workspace):
    """A trained Mask R-CNN exported up to its first NMS (dynamic, traced at 128x128), with
    mmdet's proposal selection and RoI head run on its outputs, on the val images and one of
    another shape: the same detections (boxes within 1e-3 px, scores within 1e-4) and the
    same masks: IoU >= 0.999 over all of them, >= 0.99 each. A mask head trained two iterations
    puts many pixels near its 0.5 threshold, where a difference of 1e-6 in the features flips
    single pixels (one mask of 300 at 0.9988 in one run, the whole at 0.99999)."""
    from pycocotools import mask as mask_utils
    checkpoint = train('mask_rcnn', workspace)
    root = workspace / 'two_stage_export'
    root.mkdir()
    model = root / 'mask_rcnn.onnx'
    export_tensor_mode(DEMO_CONFIGS['mask_rcnn'], checkpoint, model, '--dynamic')
    folder = root / 'images'
    image_folder(sorted((workspace / 'data/synthetic/coco/val2017').glob('*.jpg')), folder)
    keep_all = ['--score-thr', '0', '--cfg-options', 'model.test_cfg.rcnn.score_thr=0.0']
    eager = predictions(folder, DEMO_CONFIGS['mask_rcnn'], checkpoint, root / 'eager', *keep_all)
    exported = predictions(folder, DEMO_CONFIGS['mask_rcnn'], checkpoint, root / 'exported',
                           '--backend', 'onnxruntime', '--model', model, *keep_all)
    assert len(eager['images']) == len(exported['images']) == 3
    intersection = union = 0
    for a, b in zip(eager['images'], exported['images']):
        assert a['instances']
        for i, j in matched_instances(a['instances'], b['instances']):
            both = int(mask_utils.area(mask_utils.merge([i['mask'], j['mask']], intersect=True)))
            either = int(mask_utils.area(i['mask']) + mask_utils.area(j['mask'])) - both
            # a box under a pixel high (on the wide image's edge) has an empty mask on both sides
            assert either == 0 or both / either >= 0.99, (i['bbox'], both, either)
            intersection, union = intersection + both, union + either
    assert intersection / union >= 0.999


def test_segmentor_export_draws_the_same_maps(segmentor, workspace):
    """The trained Semantic FPN exported with dynamic sizes (traced at 128x128) and run between
    mmseg's pre- and post-processing, on the val images and one of another shape: the same
    classes, and the same maps but for near-ties. The exported logits differ from PyTorch's by
    about 1e-6 of their scale; a model trained two iterations has pixels whose two best classes
    are closer than that, and their argmax may go either way (2 of 16,384 pixels in one image,
    once, after the backbones' maps became contiguous NCHW: the eager rounding moved). At most
    one pixel in 2,000 may differ."""
    root = workspace / 'seg_export'
    root.mkdir()
    model = root / 'fpn.onnx'
    export_tensor_mode(DEMO_CONFIGS['fpn'], segmentor, model, '--dynamic')
    folder = root / 'images'
    val = workspace / 'data/synthetic/ade/ADEChallengeData2016/images/validation'
    image_folder(sorted(val.glob('*.jpg')), folder)
    eager = predictions(folder, DEMO_CONFIGS['fpn'], segmentor, root / 'eager')
    exported = predictions(folder, DEMO_CONFIGS['fpn'], segmentor, root / 'exported',
                           '--backend', 'onnxruntime', '--model', model)
    for a, b in zip(eager['images'], exported['images']):
        assert [c['label'] for c in a['classes']] == [c['label'] for c in b['classes']]
        pixels = sum(c['pixels'] for c in a['classes'])
        moved = sum(abs(c['pixels'] - d['pixels']) for c, d in zip(a['classes'], b['classes']))
        assert moved <= pixels / 2000, (a['classes'], b['classes'])
        drawn = [cv2.imread(str(root / side / a['drawing'])) for side in ('eager', 'exported')]
        assert np.any(drawn[0] != drawn[1], axis=-1).sum() <= pixels / 2000, a['drawing']


@pytest.mark.parametrize('options, message', [
    (['--backend', 'onnxruntime'], '--backend onnxruntime runs an exported .onnx file: pass it as --model'),
    (['--backend', 'torch.export', '--model', 'm.onnx'], '--backend torch.export runs an exported .pt2 file'),
    (['--model', 'm.onnx'], '--model is an exported file for --backend onnxruntime or torch.export'),
])
def test_cli_backend_without_its_file_is_one_error_line(options, message, untrained_checkpoint, tmp_path):
    image = tmp_path / 'a.png'
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    out = run([TOOLS / 'infer.py', image, DEMO_CONFIGS['retinanet'], untrained_checkpoint, '--device', 'cpu',
               *options], cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.strip().startswith(f'error: {message}'), out.stderr


def test_cli_counts_one_drawing_in_the_singular(untrained_checkpoint, tmp_path):
    image = tmp_path / 'a.png'
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    out = run([TOOLS / 'infer.py', image, DEMO_CONFIGS['retinanet'], untrained_checkpoint, '--device', 'cpu',
               '--out-dir', tmp_path / 'out'], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"wrote 1 drawing and {tmp_path / 'out' / 'predictions.json'} (detection)" in out.stdout
