"""A hook that makes ``--resume`` continue a run exactly as if it had never stopped.

mmengine 0.10 writes weights, optimizer, parameter schedulers and the message hub into a
checkpoint, but none of the random number generators. After a resume, everything a training
step draws (PVT's stochastic depth, dropout, mmdet's proposal sampling, the random batch
resizing of some data preprocessors) comes out differently from the uninterrupted run.

Saving the generators' states in the checkpoint and putting them back on load is not enough
with mmengine's loops:

* ``IterBasedTrainLoop`` resumes by fetching the already-trained batches again
  (``next(dataloader_iterator)`` once per trained iteration, ``mmengine/runner/loops.py``).
  That replays the data pipeline's numpy and ``random`` draws just as the first run made
  them, which is right, but each pass over the data also starts a new DataLoader iterator,
  and every iterator draws its base seed from torch's global generator. A state restored
  before the replay is advanced again by it, once per pass the replay crosses.
* Validation at a checkpoint's iteration runs after the checkpoint is written, so the
  uninterrupted run draws there (the validation iterator's base seed) and a resumed run not.
* In a distributed run only rank 0 writes the checkpoint: the other ranks' generator states
  could only be saved through a collective on every iteration.

So instead every training iteration (from ``before_train_iter`` to ``after_train_iter``:
the model's forward, backward and optimizer step) draws from torch's CPU and CUDA
generators, numpy's and ``random``'s, all freshly seeded from ``(runner.seed, iteration)``;
afterwards the states from before the iteration are put back. The random numbers of
iteration ``i`` are then a function of the seed and ``i`` alone, the same in an
uninterrupted and a resumed run and on every rank (with ``randomness.diff_rank_seed=True``
each rank has its own seed, hence its own numbers). Nothing needs saving: mmengine already
keeps the seed in the checkpoint's meta and sets it again on resume.

The generators outside the training steps (data loading, validation, other hooks) are left
alone, and numpy's and ``random``'s states are deliberately never restored from a
checkpoint: the replay described above advances them exactly as the uninterrupted run did,
so putting back saved states would skip the replayed draws a second time. Validation is
kept from advancing them, so that whether and how often a run validates does not change
the data it trains on.

Exactness covers iteration-based training. An epoch-based loop resumes at an epoch boundary
without replaying the data, so its data augmentation draws differ after a resume.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

RNGStates = tuple[Any, ...]


def iteration_seeds(seed: int, iteration: int) -> tuple[int, int, int]:
    """The seeds of torch, numpy and ``random`` for training iteration ``iteration`` (0-based).

    SeedSequence mixes the two numbers, so neighbouring iterations or seeds give unrelated
    streams, and each library gets its own.
    """
    words = np.random.SeedSequence([seed % 2**64, iteration]).generate_state(4, dtype=np.uint32)
    torch_seed = int(words[0]) << 32 | int(words[1])
    return torch_seed, int(words[2]), int(words[3])


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def get_rng_states() -> RNGStates:
    """The states of torch's CPU generator, the current CUDA device's, numpy's and ``random``'s."""
    cuda = torch.cuda.get_rng_state() if _cuda_in_use() else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def set_rng_states(states: RNGStates) -> None:
    """Puts back states returned by :func:`get_rng_states`."""
    cpu, cuda, numpy_state, python_state = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def seed_rng(seed: int, iteration: int) -> None:
    """Seeds every generator :func:`get_rng_states` covers for one training iteration."""
    torch_seed, numpy_seed, python_seed = iteration_seeds(seed, iteration)
    torch.random.default_generator.manual_seed(torch_seed)
    if _cuda_in_use():
        torch.cuda.manual_seed(torch_seed)
    np.random.seed(numpy_seed)
    random.seed(python_seed)


@HOOKS.register_module()
class IterationSeedHook(Hook):
    """Seeds each training iteration from ``(seed, iteration)``, so that a resumed run is exact.

    See the module's docstring for why this, and not a generator state stored in the
    checkpoint. It runs before the other hooks of an iteration ('VERY_HIGH'), so that what
    they draw before the training step is part of the iteration's numbers, and restores the
    outside states before the logger and checkpoint hooks run.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._outside: RNGStates | None = None
        self._before_val: RNGStates | None = None

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        if runner.seed is None:  # mmengine always sets one; without it there is nothing to derive from
            return
        self._outside = get_rng_states()
        seed_rng(runner.seed, runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if self._outside is not None:
            set_rng_states(self._outside)
            self._outside = None

    def before_val(self, runner) -> None:
        self._before_val = get_rng_states()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            set_rng_states(self._before_val)
            self._before_val = None


class InvalidLossError(FloatingPointError):
    """The training loss became NaN or inf; the message names the iteration and the terms."""


@HOOKS.register_module()
class InvalidLossHook(Hook):
    """Stops training at the iteration whose total loss is NaN or inf, before it is checkpointed.

    Raises :class:`InvalidLossError` naming the iteration (1-based, as the log counts), the
    total loss and every loss term that is not finite, and the last checkpoint saved, which
    still holds the weights from before the loss went bad.

    No extra device synchronisation: mmengine's ``RuntimeInfoHook`` ('VERY_HIGH') already
    copies every value of the model's ``log_vars`` to the CPU on every iteration
    (``MessageHub.update_scalar`` calls ``.item()``) so that the logger can average them. This
    hook runs after it ('ABOVE_NORMAL') and reads those Python floats from the message hub,
    so checking every iteration costs no sync and the run stops exactly at the iteration the
    loss went non-finite. It also runs before ``CheckpointHook`` ('VERY_LOW'): the optimizer
    step of that iteration has already applied the non-finite gradients, and raising here keeps
    those weights from being written over the last good checkpoint.
    """

    priority = 'ABOVE_NORMAL'

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if not outputs:
            return
        values = {key: self._logged_value(runner, key, value) for key, value in outputs.items()}
        losses = {key: value for key, value in values.items() if 'loss' in key and value is not None}
        total = ['loss'] if 'loss' in losses else list(losses)  # mmengine's parse_losses names the sum 'loss'
        if all(np.isfinite(losses[key]) for key in total):
            return
        bad_terms = [key for key in losses if key != 'loss' and not np.isfinite(losses[key])]
        shown = ', '.join(f'{key}={losses[key]}' for key in [*total, *bad_terms] if key in losses)
        terms = (f'non-finite terms: {", ".join(bad_terms)}' if bad_terms
                 else 'every term is finite, their sum overflowed')
        last = runner.message_hub.get_info('last_ckpt')
        kept = (f'the last checkpoint, {last}, holds the weights from before' if last
                else 'no checkpoint was saved yet')
        raise InvalidLossError(
            f'the training loss is not finite at iteration {runner.iter + 1} ({shown}; {terms}); '
            f'training stopped before saving these weights, {kept}. Lower the learning rate, add '
            'gradient clipping (optim_wrapper.clip_grad) or check the data of that iteration')

    @staticmethod
    def _logged_value(runner, key: str, value: Any) -> float | None:
        """The value RuntimeInfoHook already copied to the CPU; None if it is not a scalar."""
        buffer = runner.message_hub.log_scalars.get(f'train/{key}')
        if buffer is not None and len(buffer.data[0]):
            return float(buffer.current())
        try:  # a model whose outputs RuntimeInfoHook did not log: only here is there a sync
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            return None
