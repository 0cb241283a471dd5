"""The tools print no third-party deprecation notices, and hide nothing else.

mmengine imports (and reloads) pkg_resources whenever a config names a base as
``mmdet::`` or ``mmseg::``, which setuptools >= 80 answers with a warning each time; mmseg
warns about helpers its own heads use. Each tool hides exactly those (mmpvt.cli.quiet), so
its ``--help`` and a failing call print nothing but the tool's own text on stderr. The
failing calls are chosen to read a config (and, for some, build an mmseg model) before they
fail, which is where the notices came from.
"""
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from mmpvt.cli import quiet

from tooling import DEMO_CONFIGS, TOOLS
from tooling import run_tool as run

RETINANET, FPN = DEMO_CONFIGS['retinanet'], DEMO_CONFIGS['fpn']
NOISE = re.compile(r'DeprecationWarning|pkg_resources|deprecat', re.IGNORECASE)
# tool -> (a call that fails after reading a config, a text of its error). Paths are relative to
# an empty directory holding images/one.jpg and empty.pth: no dataset, no real checkpoint.
FAILING_CALLS = {
    'train.py': ([RETINANET], 'dataset directory not found'),
    'test.py': ([FPN, 'missing.pth'], 'checkpoint not found: missing.pth'),
    'infer.py': (['images', FPN, 'missing.pth'], 'checkpoint not found: missing.pth'),
    'convert_checkpoint.py': (['missing.pth', 'out.pth'], 'checkpoint not found'),
    'analysis/benchmark.py': ([FPN, 'missing.pth'], 'checkpoint not found'),  # builds the mmseg model
    'analysis/get_flops.py': ([FPN, '--cfg-options', 'model.backbone.wtih_cp=True'], 'wtih_cp'),
    'analysis/show_predictions.py': ([FPN, 'missing.pth'], 'checkpoint not found'),
    'analysis/benchmark_backbone.py': (['--arch', 'b9'], "invalid choice: 'b9'"),
    'analysis/plot_curves.py': (['.'], 'no logs in'),
    'dist_train.sh': ([FPN, 2], 'dataset directory not found'),
    'dist_test.sh': ([RETINANET, 'empty.pth', 2], 'dataset directory not found'),
    'slurm_train.sh': (['partition', 'job', RETINANET, 'work'], 'dataset directory not found'),
    'slurm_test.sh': (['partition', 'job', FPN, 'empty.pth'], 'dataset directory not found'),
}


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if NOISE.search(line)]


@pytest.fixture
def empty_dir(tmp_path):
    (tmp_path / 'images').mkdir()
    cv2.imwrite(str(tmp_path / 'images' / 'one.jpg'), np.full((64, 64, 3), 127, np.uint8))
    (tmp_path / 'empty.pth').write_bytes(b'')
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize('tool', list(FAILING_CALLS))
def test_help_and_a_failing_call_print_no_deprecation_notices(tool, empty_dir):
    # The shell launchers answer a short command line with their usage.
    help_args = [] if tool.endswith('.sh') else ['--help']
    args, error = FAILING_CALLS[tool]
    with ThreadPoolExecutor(2) as pool:  # both at once: most of each is importing torch and mmengine
        shown, failed = pool.map(lambda call: run([TOOLS / tool, *call], cwd=empty_dir, timeout=180),
                                 [help_args, args])
    assert shown.returncode == (2 if tool.endswith('.sh') else 0), shown.stderr[-2000:]
    assert 'usage' in (shown.stdout + shown.stderr).lower()
    assert not noise(shown.stderr), shown.stderr[-2000:]
    assert failed.returncode != 0 and error in failed.stderr, failed.stderr[-3000:]
    assert not noise(failed.stderr), '\n'.join(noise(failed.stderr))


@pytest.mark.slow
def test_warnings_the_user_asks_for_are_shown(empty_dir):
    """PYTHONWARNINGS (like -W) wins over the tool's filters: the same failing call then shows
    the notices, so the test above sees them when they are printed."""
    out = run([TOOLS / 'train.py', RETINANET], cwd=empty_dir, env={'PYTHONWARNINGS': 'default::UserWarning'})
    assert out.returncode != 0 and 'dataset directory not found' in out.stderr
    assert any('pkg_resources is deprecated' in line for line in noise(out.stderr)), out.stderr[-2000:]


# -- in one process: exactly these notices, nothing else ------------------------------------------
def recorded(action, install: bool, monkeypatch) -> list[str]:
    """The warning texts ``action()`` issues, with or without the tools' filters."""
    monkeypatch.setattr(sys, 'warnoptions', [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        if install:
            assert quiet.quiet_third_party_warnings()
        action()
    return [str(w.message) for w in caught]


def pkg_resources_lookup():
    from mmengine.utils import is_installed
    is_installed('mmengine')  # imports, then reloads pkg_resources: what a 'mmdet::' base does


def mmseg_loss_and_loading():
    from mmseg.datasets.transforms import LoadAnnotations
    from mmseg.models.builder import build_loss
    build_loss(dict(type='CrossEntropyLoss'))
    LoadAnnotations(reduce_zero_label=True)


@pytest.mark.parametrize('action, texts', [
    (pkg_resources_lookup, ['pkg_resources is deprecated']),
    (mmseg_loss_and_loading,
     ['``build_loss`` would be deprecated', '`reduce_zero_label` will be deprecated']),
])
def test_the_filters_hide_the_real_notices(action, texts, monkeypatch):
    before = recorded(action, False, monkeypatch)
    for text in texts:  # the packages still issue them, as the filters expect
        assert any(message.startswith(text) for message in before), before
    after = recorded(action, True, monkeypatch)
    assert not any(message.startswith(text) for message in after for text in texts), after


def test_other_warnings_are_still_shown(monkeypatch):
    def others():
        # Another text from a module whose notices are hidden, and a hidden text from another module.
        warnings.warn_explicit('a real problem', UserWarning, 'builder.py', 1, module='mmseg.models.builder')
        warnings.warn_explicit('pkg_resources is deprecated as an API', UserWarning, 'tool.py', 1,
                               module='mmpvt.something')
        warnings.warn_explicit('``build_loss`` would be deprecated soon', UserWarning, 'x.py', 1,
                               module='mmseg.models.builder_extra')
        warnings.warn('plain', DeprecationWarning, stacklevel=1)
    assert len(recorded(others, True, monkeypatch)) == 4


def test_the_users_own_filters_win(monkeypatch):
    monkeypatch.setattr(sys, 'warnoptions', ['default'])
    with warnings.catch_warnings():
        assert not quiet.quiet_third_party_warnings()
