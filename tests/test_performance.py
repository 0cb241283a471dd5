"""Correctness of the performance features; speed itself lives in the benchmark harness.

No test here times anything: timings on a shared machine are noise. The harness
(tools/analysis/benchmark_backbone.py) measures ratios in one run; docs/benchmarks.md
holds its results.
"""
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmpvt import PVT, PVTv2
from mmpvt.models.layers import nchw_to_nlc, nlc_to_nchw
from mmpvt.models.pvt import Mlp
from mmpvt.ops import dwconv_gelu

ROOT_DIR = Path(__file__).resolve().parents[1]
TINY = dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4),
            mlp_ratios=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))


@pytest.mark.parametrize('cls,arch', [(PVTv2, TINY), (PVTv2, dict(TINY, linear=True)), (PVT, TINY)],
                         ids=['v2', 'v2-linear', 'v1'])
def test_dynamo_captures_one_graph_without_breaks(cls, arch):
    model = cls(arch=arch).eval()
    # an awkward size: v1 resizes its position embeddings inside the graph
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 96, 136))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_backbone_matches_eager():
    model = PVTv2(arch=TINY).eval()
    x = torch.randn(1, 3, 96, 128)
    compiled = torch.compile(model)
    with torch.no_grad():
        for out, ref in zip(compiled(x), model(x)):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


class CopyCounter(TorchDispatchMode):
    """Every copying ATen operator a region dispatches, as (name, shape of the copy).

    Counted at the dispatcher, as the harness's ``--op-times`` times operators: a layout change
    anywhere (``.contiguous()``, a ``reshape`` that cannot view, ``.to(memory_format=...)``)
    arrives here as one of these.
    """

    COPIES = frozenset({'copy_', 'clone', '_to_copy', 'contiguous'})

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.COPIES:
            self.copies.append((func.overloadpacket.__name__, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def test_maps_stay_channels_last_without_layout_copies():
    """Every copy a PVTv2 forward and training step make, counted; none changes a map's layout.

    The forward copies the input image once (NCHW to channels-last, as ``forward`` says) and,
    in each fused MLP, the (hidden, 1, 3, 3) depthwise weights as the kernel's (9, hidden) tap
    table (parameter-sized). The backward adds, per attention block, the gradient of the
    stacked keys and values (B, N_kv, 2, heads, head_dim): the forward reads k and v as
    strided views of kv's output, and the backward assembles their gradients into that one
    contiguous tensor for kv's linear layer; and, per fused MLP, the taps' gradient written back
    in the weight's layout. The layer path (kernel off: CUDA, float16) instead writes the
    depthwise conv's border in place (its fc1-bias correction): four edges and four corners
    per block, no whole map. Measured on this model: exactly these, nothing else.
    """
    model = PVTv2(arch=TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    B = x.shape[0]
    with torch.no_grad(), CopyCounter() as counter:
        outs = model(x)
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outs)
    blocks = [(block, tuple(out.shape[2:]))
              for stage, out in zip(model.stages, outs) for block in stage.blocks]
    image = [('clone', tuple(x.shape))]
    taps = [('clone', (9, block.mlp.fc1.out_features)) for block, _ in blocks]
    assert sorted(counter.copies) == sorted(image + taps)

    kv_grads, weight_grads = [], []
    for block, (h, w) in blocks:
        attn, hidden = block.attn, block.mlp.fc1.out_features
        n_kv = (h // attn.sr_ratio) * (w // attn.sr_ratio)
        kv_grads.append(('clone', (B, n_kv, 2, attn.num_heads, attn.q.out_features // attn.num_heads)))
        weight_grads.append(('copy_', (hidden, 1, 3, 3)))
    model.train()
    with CopyCounter() as counter:
        sum(o.sum() for o in model(x)).backward()
    assert sorted(counter.copies) == sorted(image + taps + kv_grads + weight_grads)

    borders = []
    for block, (h, w) in blocks:
        hidden = block.mlp.fc1.out_features
        edges = [('copy_', (B, hidden, w))] * 2 + [('copy_', (B, hidden, h))] * 2  # rows, columns
        borders += edges + [('copy_', (B, hidden))] * 4  # and corners
    with torch.no_grad(), dwconv_gelu.enabled(False), CopyCounter() as counter:
        model.eval()(x)
    assert sorted(counter.copies) == sorted(image + borders)


def test_with_cp_trains_like_without_under_autocast():
    torch.manual_seed(0)
    plain = PVTv2(arch=TINY, drop_path_rate=0.).train()
    checkpointed = PVTv2(arch=TINY, drop_path_rate=0., with_cp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, checkpointed):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = sum(o.float().mean() for o in model(x))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('cls,arch', [(PVTv2, 'b2'), (PVT, 'small')])
def test_autocast_at_detection_size_is_finite_and_close(cls, arch, dtype):
    """fp16 and bf16 autocast at 1x3x800x1333: finite, and within a few percent of fp32
    relative to each map's scale (bf16 keeps 8 mantissa bits, fp16 11)."""
    model = cls(arch=arch).eval()
    x = torch.randn(1, 3, 800, 1333)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast('cpu', dtype=dtype):
            low = model(x)
    for r, o in zip(reference, low):
        assert torch.isfinite(o).all()
        tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
        assert float((o.float() - r).abs().max() / r.abs().max()) < tolerance


def test_benchmark_harness_smoke(python):
    out = subprocess.run(
        [python, 'tools/analysis/benchmark_backbone.py', '--arch', 'b0', '--shape', '1', '3', '64', '64',
         '--mode', 'train', '--repeat', '1', '--memory', '--op-times', '--keep-freed-memory'],
        cwd=ROOT_DIR, capture_output=True, text=True, check=True).stdout
    timing, op_times = out.split('| operator |')
    rows = [line for line in timing.splitlines() if line.startswith('| ') and 'implementation' not in line]
    assert [row.split('|')[1].strip() for row in rows] == ['mmpvt', 'mmdet', 'timm']
    assert all(float(row.split('|')[4]) > 0 for row in rows)  # time / mmpvt
    assert 'malloc: freed memory kept' in timing
    ops = {line.split('|')[1].strip(): line for line in op_times.splitlines()[2:]}
    assert float(ops['dwconv_gelu_backward'].split('|')[2]) > 0  # mmpvt's kernel, mmpvt only
    assert float(ops['dwconv_gelu_backward'].split('|')[4]) == 0
    assert all(float(x) > 0 for x in ops['all operators'].split('|')[2:5])


def test_benchmark_harness_times_vitdet_against_timms_sam_encoder(python):
    out = subprocess.run(
        [python, 'tools/analysis/benchmark_backbone.py', '--arch', 'vitdet_tiny',
         '--shape', '1', '3', '64', '96', '--mode', 'train', '--repeat', '1', '--memory', '--with-cp'],
        cwd=ROOT_DIR, capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith('| ') and 'implementation' not in line]
    assert [row.split('|')[1].strip() for row in rows] == ['mmpvt', 'timm']
    assert all(float(row.split('|')[4]) > 0 and float(row.split('|')[7]) > 0 for row in rows)


@pytest.mark.parametrize('arch', ['vitdet_tiny', 'vitdet_base', 'vitdet_huge'])
def test_benchmark_peer_of_vitdet_has_the_same_blocks(arch):
    """The harness' timm peer runs the same column: equal parameters but for the position
    embedding (timm's SAM keeps a 64x64 grid, ViTDet the 14x14 pre-training one and a class row)
    and no parameter in either outside the column."""
    import importlib.util
    path = ROOT_DIR / 'tools' / 'analysis' / 'benchmark_backbone.py'
    spec = importlib.util.spec_from_file_location('harness', path)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    with torch.device('meta'):
        ours, peer = harness.build_mmpvt(arch, False), harness.build_timm(arch, False).model

    def shapes(model: nn.Module) -> dict[str, tuple]:
        return {name: tuple(p.shape) for name, p in model.named_parameters() if name != 'pos_embed'}
    assert sorted(shapes(ours).values()) == sorted(shapes(peer).values())
    assert not any(name.startswith(('scale_x', 'neck', 'head')) for name in [*shapes(ours), *shapes(peer)])


@pytest.mark.parametrize('hw', [(1, 1), (1, 5), (4, 1), (7, 9), (16, 16)])
def test_fc1_bias_carried_by_the_depthwise_conv_is_exact(hw):
    """The MLP's bias fold (fc1's bias moved into the 3x3 depthwise conv, the border corrected)
    gives the plain fc1 -> dwconv -> GELU -> fc2 result and gradients, on maps down to 1x1."""
    torch.manual_seed(0)
    mlp = Mlp(8, 32, dwconv=True).double().to(memory_format=torch.channels_last)
    nn.init.normal_(mlp.fc1.bias)
    nn.init.normal_(mlp.dwconv.bias)
    x = torch.randn(2, hw[0] * hw[1], 8, dtype=torch.double, requires_grad=True)
    hidden = nchw_to_nlc(mlp.dwconv(nlc_to_nchw(mlp.fc1(x), hw)))
    reference = mlp.fc2(mlp.act(hidden))
    out = mlp(x, hw)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    wrt = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.dwconv.weight, mlp.dwconv.bias]
    for got, want in zip(torch.autograd.grad(out, wrt, grad), torch.autograd.grad(reference, wrt, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
