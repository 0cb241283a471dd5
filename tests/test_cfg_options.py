"""--cfg-options keys that name nothing are refused, with the closest real names.

mmengine merges an unknown key silently, so ``train_cfg.max_iter=5`` (for max_iters) would
train the full schedule. Real overrides, and new keys that the built class takes, pass.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import DictAction

from mmpvt.cli import LaunchError, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / 'configs' / 'demo'
CONFIGS = {
    'retinanet': DEMO / 'retinanet_pvt_v2_b0_synthetic.py',
    'mask_rcnn': DEMO / 'mask_rcnn_pvt_v2_b0_synthetic.py',
    'fpn': DEMO / 'fpn_pvt_v2_b0_synthetic.py',
}
RETINANET = CONFIGS['retinanet']


def parse(*options: str) -> dict:
    """``KEY=VALUE`` strings parsed as tools/train.py parses them."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options', *options]).cfg_options


def refused(config: Path, *options: str) -> str:
    with pytest.raises(LaunchError) as info:
        load_config(config, parse(*options))
    return str(info.value)


def test_misspelt_loop_argument_is_refused_naming_the_right_one():
    message = refused(RETINANET, 'train_cfg.max_iter=5')
    assert message.startswith('unknown --cfg-options key train_cfg.max_iter: train_cfg builds '
                              "IterBasedTrainLoop, which takes no argument 'max_iter'")
    assert 'did you mean max_iters' in message


def test_a_new_loop_type_refuses_the_old_loops_keys_and_says_how_to_replace_them():
    """An epoch config switched to iterations: mmengine would stop with a TypeError about
    max_epochs; one line names the kept key, the way out and the new loop's arguments."""
    epochs = ROOT / 'configs' / 'retinanet_pvt_v2_b0.py'
    message = refused(epochs, 'train_cfg.type=IterBasedTrainLoop', 'train_cfg.max_iters=100')
    assert message == (
        "--cfg-options train_cfg.type=IterBasedTrainLoop: train_cfg keeps 'max_epochs' from the config's "
        'EpochBasedTrainLoop, which IterBasedTrainLoop does not take; replace the whole dict with '
        "train_cfg._delete_=True and IterBasedTrainLoop's own keys (its arguments: max_iters, val_begin, "
        'val_interval, dynamic_intervals)')
    cfg = load_config(epochs, parse('train_cfg._delete_=True', 'train_cfg.type=IterBasedTrainLoop',
                                    'train_cfg.max_iters=100', 'train_cfg.val_interval=50'))
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=100, val_interval=50)


def test_misspelt_part_of_the_model_is_refused():
    message = refused(RETINANET, 'model.bakcbone.x=1')
    assert "model builds RetinaNet, which takes no argument 'bakcbone'" in message
    assert 'did you mean backbone' in message


def test_argument_of_the_built_class_is_accepted_though_not_in_the_config():
    assert 'attn_drop_rate' not in load_config(RETINANET).model.backbone  # a new key, not an override
    cfg = load_config(RETINANET, parse('model.backbone.attn_drop_rate=0.1', 'model.backbone.with_cp=True'))
    assert cfg.model.backbone.attn_drop_rate == 0.1 and cfg.model.backbone.with_cp is True


def test_arguments_that_subclasses_pass_on_through_kwargs_are_checked():
    """PVTv2(arch, **kwargs) hands everything to its base class, whose arguments count."""
    message = refused(RETINANET, 'model.backbone.wtih_cp=True')
    assert "model.backbone builds PVTv2, which takes no argument 'wtih_cp' (did you mean with_cp?)" in message
    message = refused(RETINANET, 'model.bbox_head.num_clases=3')  # RetinaHead -> AnchorHead
    assert 'did you mean num_classes' in message
    # The type an override sets is the one checked.
    message = refused(RETINANET, 'model.backbone.type=PVT', 'model.backbone.foo=1')
    assert "model.backbone builds PVT, which takes no argument 'foo'; its arguments: arch, in_channels" \
        in message


def test_runner_arguments_are_accepted_at_the_top_level():
    cfg = load_config(RETINANET, parse('randomness.seed=1', 'resume=True'))
    assert cfg.randomness.seed == 1 and cfg.resume is True
    message = refused(RETINANET, 'randomnes.seed=1')
    assert message.startswith("unknown --cfg-options key randomnes.seed: 'randomnes' is neither in the "
                              "config nor an argument of mmengine's Runner (did you mean randomness?)")


def test_dataloader_lists_and_none_values():
    assert 'did you mean batch_size' in refused(RETINANET, 'train_dataloader.batch_szie=2')
    assert 'pipeline is a list of 5 items, indexed 0..4' in refused(
        RETINANET, 'train_dataloader.dataset.pipeline.7.scale=(64,64)')
    cfg = load_config(RETINANET, parse('train_dataloader.dataset.pipeline.2.scale=(64,64)'))
    assert cfg.train_dataloader.dataset.pipeline[2].scale == (64, 64)
    # mmengine itself refuses a dict over a None without _delete_; say how to do it.
    message = refused(RETINANET, 'model.backbone.init_cfg.checkpoint=x.pth')
    assert 'model.backbone.init_cfg is None in the config, not a dict' in message
    assert 'add model.backbone.init_cfg._delete_=True' in message
    cfg = load_config(RETINANET, parse('model.backbone.init_cfg._delete_=True',
                                       'model.backbone.init_cfg.type=Pretrained',
                                       'model.backbone.init_cfg.checkpoint=x.pth'))
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint='x.pth')


def test_dicts_without_a_type_take_free_form_keys():
    """A model's test_cfg is read by its heads key by key: nothing to check it against."""
    cfg = load_config(RETINANET, parse('model.test_cfg.new_option=1', 'env_cfg.cudnn_benchmark=True'))
    assert cfg.model.test_cfg.new_option == 1


def test_every_key_the_project_uses_is_accepted():
    """The keys of the tool tests, the resume and data-error tests and tools/demo.sh's example."""
    from test_data_errors import SHORT
    from test_resume import RUN
    from test_tools import KEEP_ALL, TINY_RUN
    for kind, config in CONFIGS.items():
        load_config(config, parse(*TINY_RUN, *KEEP_ALL[kind], 'train_dataloader.batch_size=1'))
        load_config(config, parse(*RUN, *SHORT, 'train_cfg.max_iters=100', 'train_cfg.val_interval=100'))
        load_config(config, parse('train_dataloader.dataset.data_root=x',
                                  'val_dataloader.dataset.data_root=x', 'model.backbone.init_cfg=None'))


def test_custom_imports_given_as_an_option_are_imported(tmp_path, monkeypatch):
    """mmengine imports custom_imports while reading the file, before the options apply."""
    (tmp_path / 'imported_by_option.py').write_text(
        'from pathlib import Path\n'
        f'Path({str(tmp_path / "imported")!r}).touch()\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    load_config(RETINANET, parse("custom_imports.imports=['mmpvt','imported_by_option']"))
    assert (tmp_path / 'imported').exists()


def test_train_tool_refuses_an_unknown_key_without_a_traceback(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    out = subprocess.run([sys.executable, ROOT / 'tools' / 'train.py', RETINANET, '--cfg-options',
                          'train_cfg.max_iter=5'], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 1
    assert 'Traceback' not in out.stderr
    assert 'error: unknown --cfg-options key train_cfg.max_iter:' in out.stderr
    assert 'did you mean max_iters' in out.stderr
