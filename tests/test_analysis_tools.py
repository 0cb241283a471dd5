"""The analysis tools never run a partly loaded model silently, and test.py never ends without metrics.

mmengine's loader, which the analysis tools called with ``logger='silent'``, only logs a
tensor of another shape or a missing one and keeps the model's random tensor there: a
RetinaNet checkpoint without its neck and with an 80-class head loaded into the 3-class demo
model without a word, and show_predictions.py drew a partly random model. Now a shape
mismatch anywhere is refused naming the key and both shapes; missing keys are an error for
drawing (show_predictions.py) and a warning for timing (benchmark.py).
"""
import copy
import functools
import logging
import re
from pathlib import Path

import pytest
import torch

from mmpvt.apis import build_model, check_checkpoint_fits, load_model_checkpoint
from mmpvt.cli import LaunchError, format_metrics, load_config
from mmpvt.datasets.synthetic import generate

from tooling import DEMO_CONFIGS, TOOLS
from tooling import run_tool as run

CONFIG = DEMO_CONFIGS['retinanet']
WIDE_NECK = [64, 128, 320, 512]  # the FPN inputs of PVTv2-b1 and PVT-tiny (b0: 32, 64, 160, 256)
WIDTH = load_config(CONFIG).model.bbox_head.feat_channels  # the demo's head: 128
HEAD = 'bbox_head.retina_cls.weight'  # (anchors x classes, width, 3, 3): 9 x 3 in the demo, 9 x 80 for COCO


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the demo RetinaNet as mmengine saves them: whole, without the neck, and
    without the neck and with an 80-class head."""
    root = tmp_path_factory.mktemp('analysis_checkpoints')
    torch.manual_seed(1)  # other weights than a freshly built model's
    state = build_model(load_config(CONFIG)).state_dict()
    coco_head = build_model(load_config(CONFIG, {'model.bbox_head.num_classes': 80})).state_dict()
    no_neck = {key: value for key, value in state.items() if not key.startswith('neck.')}
    files = {
        'whole': {'meta': {}, 'state_dict': state},
        'no_neck': {'meta': {}, 'state_dict': no_neck},
        'no_neck_coco_head': {'meta': {}, 'state_dict': {
            key: coco_head[key] if key.startswith('bbox_head.') else value
            for key, value in no_neck.items()}},
        'ddp_bare': {f'module.{key}': value for key, value in state.items()},  # a bare, DDP-saved state dict
    }
    paths = {}
    for name, content in files.items():
        paths[name] = root / f'{name}.pth'
        torch.save(content, paths[name])
    return paths


@pytest.fixture
def log_records():
    """The messages logged through mmengine's current logger during the test."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append((record.levelno, record.getMessage()))
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@functools.cache
def _built_model() -> torch.nn.Module:
    return build_model(load_config(CONFIG))


def fresh_model() -> torch.nn.Module:
    """The demo RetinaNet with its initial weights (a copy: building it again costs more)."""
    return copy.deepcopy(_built_model())


def test_whole_checkpoint_loads_every_tensor_and_says_so(checkpoints, log_records):
    expected = torch.load(checkpoints['whole'], weights_only=True)['state_dict']
    for name in ('whole', 'ddp_bare'):
        model = fresh_model()
        assert not torch.equal(model.state_dict()[HEAD], expected[HEAD])
        assert load_model_checkpoint(model, checkpoints[name]) == {'missing': [], 'unexpected': []}
        state = model.state_dict()
        assert all(torch.equal(state[key], expected[key]) for key in expected)
        assert log_records[-3:] == [
            (logging.INFO, f'RetinaNet: loaded {len(expected)} tensors from {checkpoints[name]}'),
            (logging.INFO, 'RetinaNet: missing keys: none'),
            (logging.INFO, 'RetinaNet: unexpected keys: none')]


def test_wrong_head_without_neck_is_refused_naming_key_and_shapes(checkpoints):
    model = fresh_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(LaunchError, match=re.escape(
            f'{HEAD} has shape (720, {WIDTH}, 3, 3) in the checkpoint and (27, {WIDTH}, 3, 3) in the model; '
            '1 more differ: bbox_head.retina_cls.bias')):
        load_model_checkpoint(model, checkpoints['no_neck_coco_head'], missing_keys='warn')
    # Refused before anything loaded: not even the backbone, whose tensors fit.
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_backbone_of_another_variant_is_refused_as_a_launch_error(tmp_path):
    b1 = build_model(load_config(CONFIG, {'model.backbone.arch': 'b1', 'model.neck.in_channels': WIDE_NECK}))
    torch.save({'state_dict': b1.state_dict()}, tmp_path / 'b1.pth')
    with pytest.raises(LaunchError, match=r'b1\.pth.*: backbone\.stages\.0\.patch_embed\.proj\.weight has '
                                          r'shape \(64, 3, 7, 7\) in the checkpoint and \(32, 3, 7, 7\) '
                                          r'in the model'):
        load_model_checkpoint(fresh_model(), tmp_path / 'b1.pth', missing_keys='warn')


def test_v1_position_embeddings_of_another_grid_are_resized_not_refused(tmp_path, log_records):
    """The backbone fits its own tensors first, as on every load path; only then are shapes compared."""
    v1 = {'model.backbone.type': 'PVT', 'model.backbone.arch': 'tiny', 'model.neck.in_channels': WIDE_NECK}
    trained_at_448 = build_model(load_config(CONFIG, {**v1, 'model.backbone.pretrain_img_size': 448}))
    torch.save({'state_dict': trained_at_448.state_dict()}, tmp_path / 'pvt448.pth')
    model = build_model(load_config(CONFIG, v1))
    before = model.backbone.stages[0].pos_embed.detach().clone()
    assert load_model_checkpoint(model, tmp_path / 'pvt448.pth') == {'missing': [], 'unexpected': []}
    assert model.backbone.stages[0].pos_embed.shape == (1, 56 * 56, 64)
    assert not torch.equal(model.backbone.stages[0].pos_embed, before)
    # The backbone logs each tensor it fitted under its key in the whole model.
    assert any(message.startswith('backbone.stages.0.pos_embed: ') for _, message in log_records)


def test_missing_neck_is_an_error_for_drawing_and_a_warning_for_timing(checkpoints, log_records):
    neck_keys = [key for key in fresh_model().state_dict() if key.startswith('neck.')]
    assert len(neck_keys) == 16  # FPN: 4 lateral and 4 output convs, weight and bias each
    with pytest.raises(LaunchError, match=re.escape(
            f'lacks 16 of the {len(fresh_model().state_dict())} tensors of the RetinaNet of this config '
            f'({", ".join(neck_keys[:8])} and 8 more); they would stay random')):
        load_model_checkpoint(fresh_model(), checkpoints['no_neck'])
    assert log_records[-2] == (logging.WARNING, f'RetinaNet: missing keys: {", ".join(neck_keys)}')

    model = fresh_model()
    assert load_model_checkpoint(model, checkpoints['no_neck'], missing_keys='warn') == {
        'missing': neck_keys, 'unexpected': []}
    assert log_records[-2] == (logging.WARNING, f'RetinaNet: missing keys: {", ".join(neck_keys)}')
    expected = torch.load(checkpoints['no_neck'], weights_only=True)['state_dict']
    state = model.state_dict()
    assert all(torch.equal(state[key], expected[key]) for key in expected)  # the rest did load


def test_unknown_missing_keys_policy_is_refused(checkpoints):
    with pytest.raises(ValueError, match="missing_keys must be 'error' or 'warn', got 'ignore'"):
        load_model_checkpoint(fresh_model(), checkpoints['whole'], missing_keys='ignore')


@pytest.mark.slow
def test_tools_refuse_or_warn_in_one_line(checkpoints, tmp_path):
    """show_predictions.py: one ``error:`` line; benchmark.py times the model, with the warning."""
    out = run([TOOLS / 'analysis' / 'show_predictions.py', CONFIG, checkpoints['no_neck_coco_head']],
              tmp_path)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'Traceback' not in out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith('error: ') and f'{HEAD} has shape (720, {WIDTH}, 3, 3) in the checkpoint' in error

    out = run([TOOLS / 'analysis' / 'benchmark.py', CONFIG, checkpoints['no_neck'], '--shape', 64, 64,
               '--iters', 1, '--warmup', 0], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'RetinaNet: missing keys: neck.lateral_convs.0.conv.weight, ' in out.stdout + out.stderr
    assert 'images/s:' in out.stdout


# -- tools/test.py with a checkpoint of another model ---------------------------------------------
def test_checkpoint_fit_is_checked_without_loading(checkpoints):
    """What tools/test.py asks before mmengine's runner loads (and only logs) the checkpoint."""
    model = fresh_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(LaunchError, match='lacks 16 of the .* tensors of the RetinaNet of this config'):
        check_checkpoint_fits(model, checkpoints['no_neck'])
    check_checkpoint_fits(model, checkpoints['whole'])
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


@pytest.mark.slow
def test_test_tool_refuses_a_checkpoint_of_another_model(checkpoints, tmp_path):
    """mmengine would log the head's shape mismatch and print the metrics of a random head."""
    generate(tmp_path / 'data' / 'synthetic', num_train=1, num_val=2, seed=0, size=128)
    out = run([TOOLS / 'test.py', CONFIG, checkpoints['no_neck_coco_head'], '--work-dir', tmp_path / 'work'],
              tmp_path)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'Traceback' not in out.stderr and '| metric | value |' not in out.stdout
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith('error: ') and f'{HEAD} has shape (720, {WIDTH}, 3, 3) in the checkpoint' in error


# -- tools/test.py without metrics ----------------------------------------------------------------
def test_no_metrics_is_an_error_naming_the_evaluator(tmp_path):
    from mmdet.evaluation import CocoMetric
    from mmengine.evaluator import DumpResults, Evaluator

    with pytest.raises(LaunchError, match=r'no metrics came back from the test evaluator \(CocoMetric\)'):
        format_metrics({}, evaluator=Evaluator([CocoMetric()]))
    with pytest.raises(LaunchError, match=r'test evaluator \(unknown\)'):
        format_metrics({})
    # Metrics that only write files (results for a test server, --out) return none by design.
    writers = Evaluator([CocoMetric(format_only=True, outfile_prefix=str(tmp_path / 'results')),
                         DumpResults(out_file_path=str(tmp_path / 'preds.pkl'))])
    assert format_metrics({}, evaluator=writers) == (
        'test metrics: none: CocoMetric, DumpResults only wrote the predictions to files '
        '(format_only or a dump), as configured')


@pytest.mark.slow
def test_test_tool_exits_with_an_error_when_no_metrics_came_back(tmp_path):
    """An untrained RetinaNet whose every box falls under the score threshold: COCO returns nothing."""
    generate(tmp_path / 'data' / 'synthetic', num_train=1, num_val=2, seed=0, size=128)
    torch.save({'state_dict': fresh_model().state_dict()}, tmp_path / 'untrained.pth')
    # Sigmoid scores never exceed 1: no box is kept, so the COCO metric has nothing to score.
    out = run([TOOLS / 'test.py', CONFIG, tmp_path / 'untrained.pth', '--work-dir', tmp_path / 'work',
               '--cfg-options', 'model.test_cfg.score_thr=1.01'], tmp_path)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'Traceback' not in out.stderr and '| metric | value |' not in out.stdout
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith('error: no metrics came back from the test evaluator (CocoMetric)'), error
