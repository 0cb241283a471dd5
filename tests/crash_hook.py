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


@HOOKS.register_module()
class RoundingNoiseHook(Hook):
    """Adds rounding-level noise to every gradient from training iteration ``after`` on (1-based:
    the iterations after it), as another summation order of a gradient's reductions would.

    Each element gets ``+-ulps * 2**-24`` of its tensor's largest gradient magnitude (``ulps``
    units in the last place of the largest summands), signs drawn from a generator of its own so that the
    run's own random streams are untouched. An element whose true gradient is far above that
    level is changed in its last bits; one whose gradient is itself at that level (a key bias,
    whose gradient softmax cancels) changes direction, and AdamW, which divides by the
    gradient's running RMS, turns that into a step of the learning rate's size. Used to measure
    what the two-process resume test's bounds must allow (tests/test_resume.py).
    """

    def __init__(self, after: int, ulps: float = 1.0, seed: int = 0) -> None:
        self.after = after
        self.ulps = ulps
        self.generator = None
        self.seed = seed
        self.active = False

    def before_train(self, runner) -> None:
        import torch
        self.generator = torch.Generator().manual_seed(self.seed + get_rank())
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        for param in model.parameters():
            if param.requires_grad:
                param.register_hook(self._perturb)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self.active = runner.iter + 1 > self.after

    def _perturb(self, grad):
        import torch
        if not self.active or not grad.numel():
            return grad
        signs = torch.randint(0, 2, grad.shape, generator=self.generator).to(grad.dtype) * 2 - 1
        return grad + signs * (grad.abs().max() * self.ulps * 2 ** -24)
