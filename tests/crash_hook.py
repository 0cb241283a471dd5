"""A hook for the --resume tests: the training process kills itself right after a checkpoint.

Loaded by a training subprocess through its config's ``custom_imports`` (with this
directory on PYTHONPATH). SIGKILL, not an exception: nothing gets to clean up or flush,
as when a machine or a scheduler ends a job.
"""
import os
import signal

from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class KillAfterCheckpointHook(Hook):
    """Sends SIGKILL to its own process after training iteration ``iteration`` (1-based) on ``rank``.

    'LOWEST' priority: the logger and checkpoint hooks of that iteration run first, so the
    log line and the checkpoint of the iteration are written, and nothing after them.
    """

    priority = 'LOWEST'

    def __init__(self, iteration: int, rank: int = 0) -> None:
        self.iteration = iteration
        self.rank = rank

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 == self.iteration and get_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)
