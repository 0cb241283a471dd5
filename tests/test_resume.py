"""A run killed right after a checkpoint and resumed with --resume ends exactly where an
uninterrupted run ends: the same weights, bit for bit, and the same logged losses.

RetinaNet-PVTv2-b0 on a tiny synthetic COCO set, five iterations on the CPU, killed with
SIGKILL after the checkpoint of iteration 3. The backbone keeps its stochastic depth
(drop_path_rate 0.1), so the resumed iterations draw random masks: without
``IterationSeedHook`` (added by tools/train.py) they come out different from the
uninterrupted run's, and so do the losses and weights: the single-process test resumes the
same checkpoint once more without the hook and checks that. Four images in batches of two make
an epoch of two iterations: the resumed run's fast-forward over the three trained
batches starts a new pass over the data, as long runs do.

One process is held to bit equality. Two processes (DDP over gloo) are held to float rounding,
measured in the weights' own terms: how far the resumed run's final weights are from the
uninterrupted run's, relative to how far the uninterrupted run moved them in the resumed
iterations (``||w - w_ref|| / ||w_ref - w_killed||``). Elementwise bounds do not hold here:
AdamW divides each step by the gradient's running RMS, so an element whose gradient is
itself at rounding level (a key bias, which softmax cancels; a few elements of the box
regression head) takes a step of the learning rate's size whichever way its rounding goes.
CI saw that as tensors a few 1e-5 of their largest magnitude apart, one run in four. Measured
with ``RoundingNoiseHook`` (tests/crash_hook.py), which adds 1 or 16 units in the last place
of each tensor's largest gradient to every gradient of the resumed iterations, two
processes: elements up to 0.18 (1 ulp) and 0.49 (16 ulps) of the summed learning rate apart,
tensors up to 0.043 and 0.094 of their movement, all weights 0.0037 and 0.012. Without the
seed hook (the negative control, one process): all weights 0.20 of their movement apart, 171
of 204 tensors over 0.1. The bounds: 0.02 over all weights (the negative control is ten times
over it; the test holds it at least five times over), 0.5 per tensor (a tensor that was not
restored is apart by at least its whole movement), 1e-6 relative on logged scalars.
"""
import json
import random
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmpvt.checkpoint import load_checkpoint_file
from mmpvt.cli import add_resume_hooks, load_config
from mmpvt.datasets.synthetic import generate
from mmpvt.engine import IterationSeedHook

from tooling import DEMO_CONFIGS, TOOLS, free_port
from tooling import run_tool as run

CONFIG = DEMO_CONFIGS['retinanet']
MAX_ITERS = 5
KILLED_AT = 3  # a checkpoint iteration: the checkpoint interval
# No validation (it would only cost time), a log line and a checkpoint where the test needs them,
# fixed seed, deterministic kernels.
RUN = [f'train_cfg.max_iters={MAX_ITERS}', f'default_hooks.checkpoint.interval={KILLED_AT}',
       'default_hooks.logger.interval=1', 'randomness.seed=0', 'randomness.deterministic=True',
       'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']
LOGGED = ('loss', 'loss_cls', 'loss_bbox', 'grad_norm', 'lr')


@pytest.fixture(scope='module')
def workspace(tmp_path_factory) -> Path:
    """data/synthetic where the demo config reads it, and the demo config with the crash hook."""
    root = tmp_path_factory.mktemp('resume')
    generate(root / 'data' / 'synthetic', num_train=4, num_val=2, seed=0, size=128)
    (root / 'crashing.py').write_text(
        f'_base_ = [{str(CONFIG)!r}]\n'
        "custom_imports = dict(imports=['mmpvt', 'crash_hook'], allow_failed_imports=False)\n"
        f"custom_hooks = [dict(type='KillAfterCheckpointHook', iteration={KILLED_AT})]\n")
    return root


def logged_iterations(work_dir: Path) -> dict[int, dict]:
    """The scalars logged per iteration by all runs in ``work_dir``; each iteration must appear once."""
    iterations: dict[int, dict] = {}
    for path in sorted(work_dir.glob('*/vis_data/scalars.json')):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert record['iter'] not in iterations, f'iteration {record["iter"]} logged twice'
            iterations[record['iter']] = {key: record[key] for key in LOGGED}
    return iterations


# Two processes: bounds relative to the resumed iterations' movement (see the module docstring).
SCALAR_RTOL, MOVED_RTOL, TENSOR_MOVED_RTOL = 1e-6, 0.02, 0.5


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    # mmpvt's loader reads with weights_only=True: the checkpoints stay loadable that way.
    return load_checkpoint_file(checkpoint)['state_dict']


def differing_tensors(checkpoint: Path, reference: Path) -> list[str]:
    """The keys whose tensors differ in any bit between two checkpoints of the same model."""
    state, expected = weights(checkpoint), weights(reference)
    assert state.keys() == expected.keys()
    return [key for key in state if not torch.equal(state[key], expected[key])]


def distance_moved(checkpoint: Path, reference: Path, start: Path) -> tuple[float, dict[str, float]]:
    """How far ``checkpoint``'s weights are from ``reference``'s, relative to how far the
    reference moved them from ``start``: over all floating-point tensors together, and per
    tensor (inf for a tensor that differs but did not move; integer tensors must be equal)."""
    state, expected, started = weights(checkpoint), weights(reference), weights(start)
    assert state.keys() == expected.keys() == started.keys()
    apart, moved, per_tensor = 0.0, 0.0, {}
    for key, ref in expected.items():
        if not ref.is_floating_point():
            per_tensor[key] = 0.0 if torch.equal(state[key], ref) else float('inf')
            continue
        tensor_apart = float((state[key].double() - ref.double()).norm())
        tensor_moved = float((ref.double() - started[key].double()).norm())
        apart, moved = apart + tensor_apart ** 2, moved + tensor_moved ** 2
        if tensor_moved:
            per_tensor[key] = tensor_apart / tensor_moved
        else:
            per_tensor[key] = float('inf') if tensor_apart else 0.0
    return (apart / moved) ** 0.5, per_tensor


def same_scalars(logged: dict, expected: dict, rtol: float) -> bool:
    return logged == expected if not rtol else logged == pytest.approx(expected, rel=rtol, abs=1e-12)


# tools/train.py as it would run if it did not add IterationSeedHook: the negative control.
WITHOUT_THE_HOOK = ('import runpy, sys\n'
                    'from mmpvt import cli\n'
                    'cli.add_resume_hooks = lambda cfg: None\n'
                    'sys.argv = sys.argv[1:]\n'
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def train(config: Path, processes: int, work_dir: Path, options: list, cwd: Path,
          resume: bool | Path = False, seed_hook: bool = True) -> subprocess.CompletedProcess:
    """tools/train.py for one process, tools/dist_train.sh (torchrun, a fresh port) for more.

    ``resume``: True continues from the work dir's last checkpoint, a path from that file.
    ``seed_hook=False`` (one process): train.py without the IterationSeedHook it adds.
    """
    if processes == 1:
        launcher, env = [TOOLS / 'train.py', config], None
        if not seed_hook:
            launcher = ['-c', WITHOUT_THE_HOOK, *launcher]
    else:
        assert seed_hook, 'the hook is removed from single-process runs only'
        launcher, env = [TOOLS / 'dist_train.sh', config, processes], {'PORT': str(free_port())}
    resume_args = ['--resume'] if resume is True else ['--resume', resume] if resume else []
    return run([*launcher, '--work-dir', work_dir, *resume_args, '--cfg-options', *options], cwd, env)


@pytest.mark.slow
@pytest.mark.parametrize('processes', [1, 2])
def test_resumed_run_equals_the_uninterrupted_run(processes, workspace):
    """Two processes: tools/dist_train.sh, CPU processes over gloo, one image each per iteration.

    Only rank 0 is killed; torchrun's agent then stops rank 1 and exits with an error.
    """
    options = [*RUN, f'train_dataloader.batch_size={2 // processes}']
    full_dir, work_dir = workspace / f'full_{processes}', workspace / f'crashed_{processes}'
    full = train(CONFIG, processes, full_dir, options, workspace)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = train(workspace / 'crashing.py', processes, work_dir, options, workspace)
    if processes == 1:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    else:
        assert killed.returncode != 0 and 'Signal 9 (SIGKILL)' in killed.stderr, killed.stderr[-3000:]
    assert f'Iter(train) [{KILLED_AT}/{MAX_ITERS}]' in killed.stdout + killed.stderr
    assert (work_dir / f'iter_{KILLED_AT}.pth').is_file()
    assert not (work_dir / f'iter_{MAX_ITERS}.pth').exists()
    # Kept for the negative control below: the resumed run deletes it (max_keep_ckpts=1).
    killed_checkpoint = shutil.copy(work_dir / f'iter_{KILLED_AT}.pth', workspace / f'killed_{processes}.pth')

    resumed = train(workspace / 'crashing.py', processes, work_dir, options, workspace, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_log = resumed.stdout + resumed.stderr
    assert f'resumed epoch: 0, iter: {KILLED_AT}' in resumed_log
    assert f'Iter(train) [{KILLED_AT + 1}/{MAX_ITERS}]' in resumed_log
    assert f'Iter(train) [{KILLED_AT}/{MAX_ITERS}]' not in resumed_log

    logged = logged_iterations(work_dir)  # the killed and the resumed run's logs together
    assert sorted(logged) == list(range(1, MAX_ITERS + 1))
    expected = logged_iterations(full_dir)
    exact = processes == 1
    for iteration in range(1, MAX_ITERS + 1):
        assert same_scalars(logged[iteration], expected[iteration], 0.0 if exact else SCALAR_RTOL), iteration
    final, reference = work_dir / f'iter_{MAX_ITERS}.pth', full_dir / f'iter_{MAX_ITERS}.pth'
    if exact:
        different = differing_tensors(final, reference)
        assert not different, f'{len(different)} tensors differ from the uninterrupted run: {different[:3]}'
    else:
        overall, per_tensor = distance_moved(final, reference, killed_checkpoint)
        worst = max(per_tensor, key=per_tensor.get)
        assert overall <= MOVED_RTOL and per_tensor[worst] <= TENSOR_MOVED_RTOL, (
            f'weights {overall:.3g} of their movement from the uninterrupted run\'s (bound {MOVED_RTOL}); '
            f'worst tensor {worst}: {per_tensor[worst]:.3g} (bound {TENSOR_MOVED_RTOL})')

    if processes == 1:
        # Negative control: the same resumed run, from the same checkpoint, without the hook
        # draws other stochastic-depth masks; its losses and weights leave the uninterrupted run's.
        unseeded_dir = workspace / 'resumed_without_the_hook'
        unseeded = train(CONFIG, 1, unseeded_dir, options, workspace,
                         resume=Path(killed_checkpoint), seed_hook=False)
        assert unseeded.returncode == 0, unseeded.stderr[-3000:]
        assert 'IterationSeedHook' in (work_dir / 'crashing.py').read_text()
        assert 'IterationSeedHook' not in (unseeded_dir / CONFIG.name).read_text()
        unseeded_logged = logged_iterations(unseeded_dir)
        assert sorted(unseeded_logged) == list(range(KILLED_AT + 1, MAX_ITERS + 1))
        # Checked against the two-process bounds too: they still tell a missing seed apart.
        for iteration in unseeded_logged:
            loss, expected_loss = unseeded_logged[iteration]['loss'], expected[iteration]['loss']
            assert not same_scalars({'loss': loss}, {'loss': expected_loss}, SCALAR_RTOL), iteration
        overall, _ = distance_moved(unseeded_dir / f'iter_{MAX_ITERS}.pth', reference, killed_checkpoint)
        assert overall > 5 * MOVED_RTOL, overall

# -- the hook on its own ----------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def draw() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(), random.random()


def test_iteration_draws_depend_on_seed_and_iteration_only():
    hook = IterationSeedHook()

    def train_iteration(outside_seed: int, seed: int, iteration: int) -> tuple[tuple, tuple]:
        """What an iteration draws, and what is drawn right after it."""
        seed_everything(outside_seed)
        runner = SimpleNamespace(seed=seed, iter=iteration)
        hook.before_train_iter(runner, iteration)
        inside = draw()
        hook.after_train_iter(runner, iteration)
        return inside, draw()

    inside, after = train_iteration(outside_seed=1, seed=0, iteration=4)
    assert train_iteration(outside_seed=2, seed=0, iteration=4)[0] == inside  # whatever came before
    assert train_iteration(outside_seed=1, seed=0, iteration=5)[0] != inside
    assert train_iteration(outside_seed=1, seed=1, iteration=4)[0] != inside
    # Outside the iteration the generators go on as if it had drawn nothing (data loading replays).
    seed_everything(1)
    assert draw() == after


def test_validation_does_not_advance_the_generators():
    hook = IterationSeedHook()
    seed_everything(3)
    hook.before_val(None)
    draw()
    hook.after_val(None)
    after = draw()
    seed_everything(3)
    assert draw() == after


def test_train_tool_adds_the_hook_once():
    from mmdet.registry import HOOKS
    cfg = load_config(CONFIG)
    add_resume_hooks(cfg)
    add_resume_hooks(cfg)
    assert [hook['type'] for hook in cfg.custom_hooks] == ['IterationSeedHook']
    assert cfg.custom_imports.imports.count('mmpvt.engine') == 1  # the work dir's config builds it too
    assert isinstance(HOOKS.build(cfg.custom_hooks[0]), IterationSeedHook)  # found from mmdet's scope
