"""The model zoo as data: the index, config lookup, ``mmpvt::`` bases, and the installed wheel."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from mmengine.config import Config

import mmpvt
from mmpvt.model_index import ModelIndexError, load_models, select_models, zoo_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_index_imports_the_metafile_and_lists_every_config():
    index = yaml.safe_load((ROOT / 'model-index.yml').read_text())
    assert index == {'Import': ['configs/metafile.yml']}
    models = load_models(ROOT)
    assert {m.config.name for m in models} == {p.name for p in (ROOT / 'configs').glob('*.py')}
    assert all(m.config.is_file() and m.tasks for m in models)
    assert sum(bool(m.results) for m in models) > len(models) / 2  # "-": not published


def test_selection_by_pattern_collection_and_task():
    models = load_models(ROOT)
    chosen = select_models(models, ['retinanet_pvt_v2_b*'], collection='pvtv2', task='detection')
    archs = ('b0', 'b1', 'b2', 'b2_li', 'b3', 'b4', 'b5')
    assert {m.name for m in chosen} == {f'retinanet_pvt_v2_{arch}' for arch in archs}
    segmentors = select_models(models, task='segmentation')
    assert segmentors and all(m.name.startswith(('fpn_', 'upernet_')) for m in segmentors)
    with pytest.raises(ModelIndexError, match=r"no model of the index matches models=\['nothing\*'\]; "
                                              r'collections: .*PVTv2.*; tasks: '):
        select_models(models, ['nothing*'])


def test_config_path_names_a_zoo_config():
    assert mmpvt.config_path('retinanet_pvt_s') == ROOT / 'configs' / 'retinanet_pvt_s.py'
    assert mmpvt.config_path('mask_rcnn_pvt_v2_b0.py') == ROOT / 'configs' / 'mask_rcnn_pvt_v2_b0.py'
    with pytest.raises(ModelIndexError, match="no config named 'nope' in the model index"):
        mmpvt.config_path('nope')


def test_mmpvt_bases_resolve_unscoped(tmp_path):
    """A config elsewhere inherits a zoo config by ``mmpvt::zoo/<name>.py`` and a base by
    ``mmpvt::_base_/<file>.py``; the objects keep mmdet's scope (not ``mmpvt``, where mmdet's
    detectors are not registered)."""
    mine = tmp_path / 'mine.py'
    mine.write_text("_base_ = 'mmpvt::zoo/retinanet_pvt_v2_b0.py'\n"
                    "model = dict(backbone=dict(init_cfg=None))\n")
    cfg = Config.fromfile(mine)
    assert cfg.model.type == 'RetinaNet' and cfg.model.backbone.arch == 'b0'
    assert cfg.model.backbone.init_cfg is None and cfg.default_scope == 'mmdet'
    assert cfg.model.get('_scope_') in (None, 'mmdet')
    base = ROOT / 'configs' / '_base_' / 'retinanet_pvt.py'
    assert zoo_config('_base_/retinanet_pvt.py') == base.resolve()
    with pytest.raises(FileNotFoundError, match=r'mmpvt::zoo/nope.py: no such config; write mmpvt::zoo/'):
        zoo_config('zoo/nope.py')
    with pytest.raises(FileNotFoundError, match='no such config'):
        zoo_config('../setup.py')  # nothing outside the configs


INSTALLED_CHECK = textwrap.dedent('''
    import sys, tempfile, pathlib
    import mmpvt
    from mmengine.config import Config
    from mmpvt.apis import build_model
    from mmpvt.model_index import load_models
    package = pathlib.Path(mmpvt.__file__).parent
    assert str(package).startswith(sys.prefix), (package, sys.prefix)
    print('config', mmpvt.config_path('retinanet_pvt_s').relative_to(package))
    print('models', len(load_models()))
    mine = pathlib.Path(tempfile.mkdtemp()) / 'mine.py'
    mine.write_text("_base_ = 'mmpvt::zoo/mask_rcnn_pvt_v2_b0.py'\\n"
                    "model = dict(backbone=dict(init_cfg=None))\\n")
    print('built', type(build_model(Config.fromfile(mine))).__name__)
''')


@pytest.mark.slow
def test_the_wheel_carries_the_zoo(tmp_path):
    """The wheel pip builds holds the configs and the index in mmpvt/.mim; installed into a
    fresh venv that reuses this environment's packages, outside the repository, it finds its
    configs, resolves ``mmpvt::`` bases and builds a detector from one."""
    dist = tmp_path / 'dist'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(ROOT), '--no-deps', '--no-build-isolation',
                    '-q', '-w', str(dist)], check=True, capture_output=True, cwd=tmp_path)
    wheel, = dist.glob('mmpvt-*.whl')
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    purelib = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                             check=True, capture_output=True, text=True).stdout.strip()
    # this environment's packages after the venv's own (a .pth line adds a path, not its .pth files,
    # so the checkout's editable mmpvt stays out)
    (Path(purelib) / 'stack.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    subprocess.run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '--ignore-installed', '-q',
                    str(wheel)], check=True, capture_output=True, cwd=tmp_path)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    out = subprocess.run([python, '-c', INSTALLED_CHECK], capture_output=True, text=True, cwd=elsewhere,
                         env={'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(' ', 1) for line in out.stdout.splitlines() if ' ' in line)
    assert lines['config'] == '.mim/configs/retinanet_pvt_s.py'
    assert int(lines['models']) == len(load_models(ROOT))
    assert lines['built'] == 'MaskRCNN'


MMDET_PVT_CONFIGS = Path(importlib.util.find_spec('mmdet').origin).parent / '.mim' / 'configs' / 'pvt'


@pytest.mark.parametrize('theirs, ours', [('retinanet_pvt-t_fpn_1x_coco.py', 'retinanet_pvt_t.py'),
                                          ('retinanet_pvtv2-b0_fpn_1x_coco.py', 'retinanet_pvt_v2_b0.py')])
def test_mmdets_published_detector_layout_loads_into_the_zoo_config(theirs, ours, tmp_path):
    """The index lists mmdet's trained RetinaNet checkpoints as weights of the zoo's configs: a
    checkpoint of mmdet's own model (its PVT's names) loads into the zoo config on every load
    path (the backbone renamed, neck and head as they are) and computes what mmdet's does."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.runner import load_checkpoint

    from mmpvt.apis import build_model
    from mmpvt.apis.model import check_checkpoint_fits
    from mmpvt.cli import load_config
    register_all_modules()
    cfg = Config.fromfile(MMDET_PVT_CONFIGS / theirs)
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    reference = MODELS.build(cfg.model).eval()
    checkpoint = tmp_path / 'mmdet.pth'
    torch.save({'state_dict': reference.state_dict(), 'meta': {}}, checkpoint)
    zoo_cfg = load_config(ROOT / 'configs' / ours, {'model.backbone.init_cfg': None})
    model = build_model(zoo_cfg)
    check_checkpoint_fits(model, checkpoint)  # tools/test.py's check before mmengine's runner loads it
    by_runner = build_model(zoo_cfg)  # the runner's load_from path: mmengine's loader
    load_checkpoint(by_runner, str(checkpoint), strict=True)
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        expected = [t for group in reference._forward(x) for t in group]
        for model in (build_model(zoo_cfg, checkpoint), by_runner):
            outputs = [t for group in model._forward(x) for t in group]
            assert len(outputs) == len(expected) == 10
            for out, ref in zip(outputs, expected):
                assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
