"""mmpvt's backbones build from configs under the mmdet and mmseg scopes, prefixed or not."""
import subprocess
import textwrap
from pathlib import Path

import pytest

import mmpvt
from mmpvt import PVT, PVTv2

ROOT_DIR = Path(__file__).resolve().parents[1]


def registry_of(scope):
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS


def test_names_do_not_shadow_mmdet_or_mmseg_backbones():
    from mmdet.models.backbones import PyramidVisionTransformerV2
    from mmseg.models.backbones import MixVisionTransformer
    assert registry_of('mmdet').get('PyramidVisionTransformerV2') is PyramidVisionTransformerV2
    assert registry_of('mmseg').get('MixVisionTransformer') is MixVisionTransformer
    assert registry_of('mmdet').get('PVTv2') is PVTv2 and registry_of('mmseg').get('PVT') is PVT


def test_custom_imports_in_a_config_is_all_a_user_needs(tmp_path, python):
    """A fresh process: the config's custom_imports registers the backbone."""
    (tmp_path / 'cfg.py').write_text(textwrap.dedent('''
        default_scope = 'mmdet'
        custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)
        model = dict(type='PVTv2', arch='b0')
    '''))
    code = textwrap.dedent(f'''
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmdet.registry import MODELS
        cfg = Config.fromfile({str(tmp_path / 'cfg.py')!r})
        init_default_scope(cfg.default_scope)
        print(type(MODELS.build(cfg.model)).__module__)
    ''')
    out = subprocess.run([python, '-c', code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'mmpvt.models.pvt'


@pytest.mark.parametrize('hidden,present', [('mmseg', 'mmdet'), ('mmdet', 'mmseg')])
def test_import_needs_only_one_of_mmdet_and_mmseg(hidden, present, python):
    code = textwrap.dedent(f'''
        import sys

        class Hide:  # as if {hidden} were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == {hidden!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name={hidden!r})

        sys.meta_path.insert(0, Hide())
        import mmpvt
        from mmpvt.registry import downstream_scopes
        from {present}.registry import MODELS
        from mmengine.registry import DefaultScope
        assert downstream_scopes() == [{present!r}], downstream_scopes()
        with DefaultScope.overwrite_default_scope({present!r}):
            assert type(MODELS.build(dict(type='PVTv2', arch='b0'))) is mmpvt.PVTv2
        print('ok')
    ''')
    out = subprocess.run([python, '-c', code], cwd=ROOT_DIR, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'ok'


def test_version_is_exposed():
    assert mmpvt.__version__.count('.') == 2
