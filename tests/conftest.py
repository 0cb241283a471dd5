import logging
import os
import sys

import pytest
import torch
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
