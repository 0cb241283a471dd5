import importlib.metadata
import importlib.util
import logging
import os
import sys

import pytest
import torch
import zoo
from mmengine.logging import MMLogger

# Tests run offline: nothing may reach a model hub.
os.environ.setdefault('HF_HUB_OFFLINE', '1')

# Under `pytest -n N` (make test) N workers share the cores: each takes its share of torch's
# threads, so that two workers on two cores do not spin four threads between them.
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def python() -> str:
    """The interpreter running the tests, for subprocesses."""
    return sys.executable


@pytest.fixture
def log_lines():
    """Messages mmpvt logs through mmengine's current logger during the test."""
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# -- the model zoo's tests (tests/test_*configs.py; helpers in zoo.py) --------------------------------
@pytest.fixture(scope='session', autouse=True)
def _package_bases_without_pkg_resources():
    """Lets mmengine resolve ``mmdet::`` / ``mmseg::`` bases when setuptools lacks pkg_resources.

    mmengine 0.10.7 finds installed packages through ``pkg_resources``, which recent setuptools
    (>= 81) no longer ships. The stand-ins answer the same questions from importlib.metadata,
    as tools/train.py and tools/test.py do; nothing changes where pkg_resources exists.
    """
    if importlib.util.find_spec('pkg_resources') is not None:
        yield
        return
    import mmengine.config.config as config_module

    def is_installed(package: str) -> bool:
        try:
            importlib.metadata.distribution(package)
            return True
        except importlib.metadata.PackageNotFoundError:
            return importlib.util.find_spec(package) is not None

    def get_installed_path(package: str) -> str:
        dist = importlib.metadata.distribution(package)
        module = (dist.read_text('top_level.txt') or package).split()[0]
        return str(dist.locate_file(module))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_module, 'is_installed', is_installed)
        mp.setattr(config_module, 'get_installed_path', get_installed_path)
        yield


@pytest.fixture
def fast_init(monkeypatch):
    """Skips what dominates building and initialising models on a CPU and changes no shape:
    truncated-normal draws, and mmengine's bookkeeping of which initialiser touched what."""
    import mmengine.model.base_module
    import mmengine.model.weight_init

    monkeypatch.setattr(torch.nn.init, 'trunc_normal_', lambda tensor, *args, **kwargs: tensor)
    for module in (mmengine.model.base_module, mmengine.model.weight_init):
        monkeypatch.setattr(module, 'update_init_info', lambda *args, **kwargs: None)


@pytest.fixture(scope='session')
def coco_root(tmp_path_factory):
    """A fake data/coco (zoo.write_fake_coco)."""
    return zoo.write_fake_coco(tmp_path_factory.mktemp('coco'))


@pytest.fixture(scope='session')
def ade_root(tmp_path_factory):
    """A fake ADEChallengeData2016 (zoo.write_fake_ade)."""
    return zoo.write_fake_ade(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016')
