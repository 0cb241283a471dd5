"""The CUDA path: what runs only where ``torch.cuda.is_available()``.

Every test here is marked ``cuda`` and skipped, with the reason shown (``pytest -rs``), on a
machine without a CUDA device; ``make test`` runs them wherever there is one, and
``tools/device_check.sh`` runs them first (``pytest -m cuda``). On a GPU the code takes
other paths than the CPU suite exercises: PVTv2's MLP runs the PyTorch layers (the
depthwise convolution carrying fc1's bias, then GELU) instead of the fused CPU kernel,
attention runs CUDA's fused kernels, convolutions run cuDNN on channels-last maps, mixed
precision is float16 with loss scaling, mmdet calls mmcv's CUDA ops, and distributed runs
use NCCL.

The backbone families are the registry's, each with its small arch dicts
(tests/test_backbone_contract.py's ``registered_backbones`` and ``SMALL_ARCHS``): a family
that lands is covered here without a change.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_backbone_contract import SMALL_ARCHS, all_levels, case_id, registered_backbones
from test_tools import EXPECTED_METRICS, KEEP_ALL, TINY_RUN

from mmpvt.cli import parse_metrics
from mmpvt.datasets.synthetic import generate

from tooling import DEMO_CONFIGS, TOOLS, free_port
from tooling import run_tool as run

DEVICE = 'cuda'
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason='needs a CUDA device (torch.cuda.is_available() is False here)'),
]

CASES = [(cls, arch) for cls in registered_backbones() for arch in SMALL_ARCHS.get(cls.__name__, [])]
# An awkward size (no multiple of any stride) with a batch of two, as the contract suite uses.
SHAPE = (2, 3, 97, 161)
# fp32 on CUDA against the CPU, relative to each map's (or gradient's) scale: what float32
# rounding in another summation order leaves, with a wide margin (the bound).
FP32_BOUND = 1e-4
# Autocast against fp32 on the same device: the 1% for float16 (11 mantissa bits)
# and 5% for bfloat16 (8 bits); the CPU suite holds PVTv2 and PVT at 1x3x800x1333 to the same.
AUTOCAST_BOUNDS = {torch.float16: 0.01, torch.bfloat16: 0.05}


def scale_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest difference from ``reference``, relative to its largest magnitude."""
    out, reference = out.detach().double().cpu(), reference.detach().double().cpu()
    return float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


@pytest.fixture
def ieee_fp32():
    """float32 arithmetic as on the CPU: cuDNN convolutions use TF32 by default (10-bit
    mantissa), which would swamp a 1e-4 comparison; cuBLAS is kept off it too."""
    # Set and restored by hand: monkeypatch cannot read cuBLAS' flag (a computed attribute).
    cudnn, cublas = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, cublas


# -- every backbone family, small variants ----------------------------------------------------------
@pytest.mark.parametrize('case', CASES, ids=case_id)
def test_forward_and_backward_on_cuda_equal_the_cpu(case, ieee_fp32):
    """Every map and every gradient (parameters and input) on CUDA within 1e-4 of the CPU's.

    In eval mode: stochastic depth draws other numbers on each device, and gradients flow all
    the same. PVTv2 compares the CPU's fused kernel with the layers CUDA runs.
    """
    cls, arch = case
    on_cpu = all_levels(cls, arch).eval()
    on_cuda = copy.deepcopy(on_cpu).to(DEVICE)
    x = torch.randn(SHAPE)
    results = []
    for model, device in ((on_cpu, 'cpu'), (on_cuda, DEVICE)):
        inputs = x.to(device).requires_grad_()
        outs = model(inputs)
        if not results:  # one random weighting of every map, the same on both devices
            weights = [torch.randn(o.shape) for o in outs]
        sum((o * w.to(device)).sum() for o, w in zip(outs, weights)).backward()
        results.append((outs, inputs.grad))
    (outs_cpu, grad_cpu), (outs_cuda, grad_cuda) = results
    for level, (out, reference) in enumerate(zip(outs_cuda, outs_cpu)):
        assert out.device.type == DEVICE and out.shape == reference.shape, level
        assert scale_error(out, reference) < FP32_BOUND, (level, scale_error(out, reference))
    assert scale_error(grad_cuda, grad_cpu) < FP32_BOUND
    for (name, p), q in zip(on_cpu.named_parameters(), on_cuda.parameters()):
        if not p.requires_grad:
            continue
        assert p.grad is not None and q.grad is not None, name
        assert scale_error(q.grad, p.grad) < FP32_BOUND, (name, scale_error(q.grad, p.grad))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('case', CASES, ids=case_id)
def test_autocast_on_cuda_is_finite_and_close_to_fp32(case, dtype, ieee_fp32):
    """Autocast maps finite and within 1% (fp16) / 5% (bf16) of fp32, relative to each map's
    scale; a training step under autocast gives finite gradients."""
    cls, arch = case
    model = all_levels(cls, arch).to(DEVICE).eval()
    x = torch.randn(SHAPE, device=DEVICE)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast(DEVICE, dtype=dtype):
            low = model(x)
    for level, (out, ref) in enumerate(zip(low, reference)):
        assert torch.isfinite(out).all(), level
        assert scale_error(out, ref) < AUTOCAST_BOUNDS[dtype], (level, scale_error(out, ref))
    model.train()
    with torch.autocast(DEVICE, dtype=dtype):
        loss = sum(o.float().square().mean() for o in model(x))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [name for name, g in grads.items() if g is None or not torch.isfinite(g).all()]


@pytest.mark.parametrize('case', CASES, ids=case_id)
def test_with_cp_gives_the_same_loss_and_gradients_on_cuda(case, ieee_fp32):
    """Activation checkpointing on CUDA: the recomputed blocks give the plain model's loss and
    gradients (the checkpoint restores the CUDA random state, so stochastic depth draws alike)."""
    cls, arch = case
    plain = cls(arch=arch).to(DEVICE).train()
    checkpointed = cls(arch=arch, with_cp=True).to(DEVICE).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 80, device=DEVICE)
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # seeds the CUDA generator too: the same draws in both
        loss = sum(o.square().mean() for o in model(x))
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        if not p.requires_grad:
            continue
        assert p.grad is not None and q.grad is not None, name
        # atomics in some CUDA backward kernels sum in varying order: float32 rounding only
        assert scale_error(q.grad, p.grad) < 1e-5, (name, scale_error(q.grad, p.grad))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('case', CASES, ids=case_id)
def test_maps_are_contiguous_nchw_on_cuda(case, dtype):
    """The backbones return contiguous NCHW maps (what mmcv's CUDA RoIAlign reads, whatever the
    strides), on CUDA and under autocast too."""
    cls, arch = case
    model = all_levels(cls, arch).to(DEVICE).eval()
    x = torch.randn(1, 3, 128, 192, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        outs = model(x)
    for level, out in enumerate(outs):
        assert out.is_contiguous(), (level, out.shape, out.stride())


# -- the detectors, through the tools ---------------------------------------------------------------
MMCV_WITHOUT_CUDA = (
    "mmcv's compiled ops have no CUDA kernel here (mmcv.ops.get_compiling_cuda_version() says "
    "{version!r}; {error}). mmdet's detectors call them on the GPU (NMS, RoIAlign, RetinaNet's focal "
    'loss): rebuild mmcv with its CUDA ops (MMCV_WITH_OPS=1 FORCE_CUDA=1 and the CUDA toolkit '
    'matching torch)')


def test_mmcv_ops_run_on_cuda():
    """The mmcv ops mmdet runs on the GPU give the CPU's results: NMS (every test, and RPN
    proposals in training), RoIAlign (Mask R-CNN), the sigmoid focal loss (RetinaNet's loss
    on CUDA; mmdet's PyTorch version on the CPU)."""
    from mmcv.ops import RoIAlign, get_compiling_cuda_version, nms
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss, sigmoid_focal_loss

    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.], [0., 0., 9., 10.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    features = torch.randn(2, 4, 16, 16)
    rois = torch.tensor([[0., 1., 1., 9., 12.], [1., 0., 3., 15., 15.]])
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 3, 1, 3])  # 3: background
    roi_align = RoIAlign((4, 4), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    try:
        _, keep = nms(boxes.to(DEVICE), scores.to(DEVICE), 0.5)
        pooled = roi_align(features.to(DEVICE), rois.to(DEVICE))
        focal = sigmoid_focal_loss(logits.to(DEVICE), labels.to(DEVICE), reduction='none')
    except RuntimeError as exc:
        pytest.fail(MMCV_WITHOUT_CUDA.format(version=get_compiling_cuda_version(), error=exc))
    assert keep.cpu().tolist() == nms(boxes, scores, 0.5)[1].tolist() == [0, 2]
    torch.testing.assert_close(pooled.cpu(), roi_align(features, rois), rtol=1e-5, atol=1e-6)
    one_hot = torch.nn.functional.one_hot(labels, 4)[:, :3].float()
    torch.testing.assert_close(focal.cpu(), py_sigmoid_focal_loss(logits, one_hot, reduction='none'),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """data/synthetic in place for the demo configs: enough images for 20 batches to cycle."""
    root = tmp_path_factory.mktemp('cuda_tools')
    generate(root / 'data' / 'synthetic', num_train=32, num_val=8, seed=0, size=128)
    return root


# 20 iterations at the demo's batch sizes, validated at the end, losses logged every 5.
TWENTY_ITERATIONS = ['train_cfg.max_iters=20', 'train_cfg.val_interval=20',
                     'default_hooks.checkpoint.interval=20', 'default_hooks.logger.interval=5']


def logged_losses(work_dir) -> dict[int, dict[str, float]]:
    """The loss terms logged per training iteration (mmengine's scalars.json)."""
    losses = {}
    for path in work_dir.glob('*/vis_data/scalars.json'):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if 'loss' in record:
                losses[record['iter']] = {key: value for key, value in record.items()
                                          if key.startswith('loss') or key == 'memory'}
    return losses


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['retinanet', 'mask_rcnn'])
def test_demo_detector_trains_with_fp16_amp_then_tests_on_cuda(kind, workspace):
    """train.py --amp (float16 with dynamic loss scaling on CUDA) for 20 iterations, then
    test.py: finite losses at every logged iteration, and the metrics table."""
    work_dir = workspace / f'work_{kind}'
    out = run([TOOLS / 'train.py', DEMO_CONFIGS[kind], '--amp', '--work-dir', work_dir,
               '--cfg-options', *TWENTY_ITERATIONS, *KEEP_ALL[kind]], cwd=workspace)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = next(work_dir.glob('*/*.log')).read_text()
    assert "type='AmpOptimWrapper'" in log and "loss_scale='dynamic'" in log
    losses = logged_losses(work_dir)
    assert {5, 10, 15, 20} <= set(losses)  # every 5 (and where an epoch of the small set ends)
    for iteration, terms in losses.items():
        assert len(terms) > 2 and all(math.isfinite(v) for v in terms.values()), (iteration, terms)
        assert terms['memory'] > 0  # the GPU memory mmengine logs on CUDA

    out = run([TOOLS / 'test.py', DEMO_CONFIGS[kind], work_dir / 'iter_20.pth',
               '--work-dir', workspace / f'test_{kind}', '--cfg-options', *KEEP_ALL[kind]], cwd=workspace)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '| metric | value |' in out.stdout
    metrics = parse_metrics(out.stdout)
    assert EXPECTED_METRICS[kind] <= set(metrics)
    assert all(0 <= metrics[k] <= 100 for k in EXPECTED_METRICS[kind])


@pytest.mark.slow
def test_dist_train_with_one_process_runs_on_nccl(workspace):
    """tools/dist_train.sh CONFIG 1 on a GPU: mmengine's own launcher path, NCCL."""
    work_dir = workspace / 'work_dist'
    out = run([TOOLS / 'dist_train.sh', DEMO_CONFIGS['retinanet'], 1, '--work-dir', work_dir,
               '--cfg-options', *TINY_RUN, *KEEP_ALL['retinanet']],
              cwd=workspace, env={'PORT': str(free_port())})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (work_dir / 'iter_2.pth').is_file()
    log = next(work_dir.glob('*/*.log')).read_text()
    assert 'Distributed training: True' in log and 'GPU number: 1' in log
    assert "backend': 'nccl'" in log
