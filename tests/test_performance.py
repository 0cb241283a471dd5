"""Correctness of the performance features; speed itself lives in the benchmark harness.

No test here times anything: timings on a shared machine are noise. The harness
(tools/analysis/benchmark_backbone.py) measures ratios in one run; docs/benchmarks.md
holds its results.
"""
import functools
import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmpvt import PVT, PVTv2
from mmpvt.models.layers import nchw_to_nlc, nlc_to_nchw
from mmpvt.models.mvit import MViTv2
from mmpvt.models.pvt import Mlp
from mmpvt.models.t2t_vit import T2T_ARCHS, T2TViT
from mmpvt.ops import dwconv_gelu

ROOT_DIR = Path(__file__).resolve().parents[1]


@functools.cache
def load_harness():
    """The benchmark harness as a module (it is a script, not part of the package)."""
    path = ROOT_DIR / 'tools' / 'analysis' / 'benchmark_backbone.py'
    spec = importlib.util.spec_from_file_location('benchmark_harness', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
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


def test_maps_stay_channels_last_inside_without_layout_copies():
    """Every copy a PVTv2 forward and training step make, counted; none changes a map's layout
    between the input and the outputs.

    The forward copies the input image once (NCHW to channels-last, as ``forward`` says), each
    returned map once (back to contiguous NCHW, what mmcv's ops read: ``nchw_maps``) and, in
    each fused MLP, the (hidden, 1, 3, 3) depthwise weights as the kernel's (9, hidden) tap
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
    assert all(o.is_contiguous() for o in outs)
    blocks = [(block, tuple(out.shape[2:]))
              for stage, out in zip(model.stages, outs) for block in stage.blocks]
    # the image to channels-last, and each output map back to contiguous NCHW
    image = [('clone', tuple(x.shape))] + [('clone', tuple(out.shape)) for out in outs]
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
         '--mode', 'train', '--repeat', '1', '--memory', '--op-times', '100', '--keep-freed-memory'],
        cwd=ROOT_DIR, capture_output=True, text=True, check=True).stdout
    timing, op_times = out.split('| operator |')
    rows = [line for line in timing.splitlines() if line.startswith('| ') and 'implementation' not in line]
    assert [row.split('|')[1].strip() for row in rows] == ['mmpvt', 'mmdet', 'timm']
    assert all(float(row.split('|')[4]) > 0 for row in rows)  # time / mmpvt
    assert 'malloc: freed memory kept' in timing
    # every operator listed (100 > their number): which ones rank in the top 15 varies with load
    ops = {line.split('|')[1].strip(): line for line in op_times.splitlines()[2:]}
    assert float(ops['dwconv_gelu_backward'].split('|')[2]) > 0  # mmpvt's kernel, mmpvt only
    assert float(ops['dwconv_gelu_backward'].split('|')[4]) == 0
    assert all(float(x) > 0 for x in ops['all operators'].split('|')[2:5])


def test_benchmark_harness_times_the_onnxruntime_export_beside_eager(python):
    """The deployment row: PVTv2-b0 exported to ONNX at the input's shape and run by
    onnxruntime, timed interleaved with the eager model, with its peak memory; a training step
    or a second shape is refused."""
    harness = [python, 'tools/analysis/benchmark_backbone.py', '--arch', 'b0', '--impls', 'mmpvt',
               '--backend', 'onnxruntime', '--repeat', '1']
    out = subprocess.run([*harness, '--shape', '1', '3', '96', '128', '--memory'], cwd=ROOT_DIR,
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith('| ') and 'implementation' not in line]
    assert [row.split('|')[1].strip() for row in rows] == ['mmpvt', 'onnxruntime']
    assert all(float(row.split('|')[4]) > 0 and float(row.split('|')[7]) >= 0 for row in rows)
    refused = subprocess.run([*harness, '--shape', '1', '3', '96', '128', '--mode', 'train'], cwd=ROOT_DIR,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and '--backend onnxruntime times fp32 inference' in refused.stderr


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
    with torch.device('meta'):
        ours, peer = load_harness().build_mmpvt(arch, False), load_harness().build_timm(arch, False).model

    def shapes(model: nn.Module) -> dict[str, tuple]:
        return {name: tuple(p.shape) for name, p in model.named_parameters() if name != 'pos_embed'}
    assert sorted(shapes(ours).values()) == sorted(shapes(peer).values())
    assert not any(name.startswith(('scale_x', 'neck', 'head')) for name in [*shapes(ours), *shapes(peer)])


# -- T2T-ViT against the authors' modules (tools/analysis/peers/t2t_official.py) --------------
T2T_SMALL = dict(embed_dims=64, depth=2, num_heads=2, mlp_ratio=2., token_dims=16)



def randomise_t2t_peer(peer: nn.Module, seed: int = 0) -> None:
    """Weights that keep every nonlinearity in its curved range (the authors' initialisation,
    std 0.02, leaves attention near uniform and would hide a wrong scale or split): unit-gain
    linears, the performers' keys and queries at gain 0.3 (squared norms ~6, where the random
    features neither vanish nor explode), LayerNorms and biases off their identity values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in peer.named_modules():
            if isinstance(module, nn.Linear):
                gain = .3 if name.endswith('kqv') else 1.
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                                    * gain / module.in_features ** .5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * .1)
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + torch.randn(module.weight.shape, generator=gen) * .1)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * .1)
        peer.cls_token.copy_(torch.randn(peer.cls_token.shape, generator=gen) * .5)


@pytest.mark.parametrize('tokens', ['performer', 'transformer'])
def test_t2t_official_peer_computes_the_function_mmpvt_computes(tokens):
    """The harness' peer is the same model: its weights (performer features included), as a
    release file holds them, load into mmpvt's T2TViT with nothing missing or unexpected and
    give the same stride-16 map at a non-square size, where both resize the position table."""
    peer_cls = load_harness().load_peer('t2t_official').T2TViTOfficial
    torch.manual_seed(0)
    peer = peer_cls(img_size=64, tokens_type=tokens, embed_dim=T2T_SMALL['embed_dims'],
                    depth=T2T_SMALL['depth'], num_heads=T2T_SMALL['num_heads'],
                    mlp_ratio=T2T_SMALL['mlp_ratio'], token_dim=T2T_SMALL['token_dims']).eval()
    randomise_t2t_peer(peer)
    ours = T2TViT(arch=dict(T2T_SMALL, tokens_type=tokens), img_size=64, out_indices=(2,),
                  drop_path_rate=0.).eval()
    result = ours.load_state_dict(T2TViT.convert_state_dict({'state_dict_ema': peer.state_dict()}))
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 96, 128)  # a 6x8 grid: the 4x4 table resized
    with torch.no_grad():
        (theirs,), (mine,) = peer(x), ours(x)
    assert theirs.shape == mine.shape == (1, T2T_SMALL['embed_dims'], 6, 8)
    assert float((mine - theirs).abs().max() / theirs.abs().max()) <= 1e-4


@pytest.mark.parametrize('arch', list(T2T_ARCHS))
def test_t2t_benchmark_rows_have_the_same_tensors(arch):
    """The harness' two T2T rows of every variant: the peer's state dict, converted, is exactly
    mmpvt's (names and shapes; no pyramid layers in mmpvt's row)."""
    harness = load_harness()
    with torch.device('meta'):
        ours, peer = harness.build_mmpvt(f't2t_{arch}', False), harness.build_official(f't2t_{arch}', False)
    converted = T2TViT.convert_state_dict(peer.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert harness.build_official(f't2t_{arch}', True) is None  # the authors have no checkpointing


@pytest.mark.parametrize('argv,title,names', [
    (['--arch', 't2t_7'], 't2t_7,', ['mmpvt', 'official']),
    (['--arch', 'mvit_tiny', '--mvit-layout', 'classification'], 'mvit_tiny (classification layout)',
     ['mmpvt', 'timm', 'detectron2-style']),
    (['--arch', 'mvitv1_b16'], 'mvitv1_b16,', ['mmpvt', 'torchvision']),
], ids=['t2t', 'mvit', 'mvitv1'])
def test_benchmark_harness_times_the_families_against_their_peers(argv, title, names):
    """In-process, as the script's main() runs it: the table has a row per peer, each timed."""
    harness = load_harness()
    table = harness.run(harness.parse_args([*argv, '--shape', '1', '3', '64', '64', '--repeat', '1',
                                            '--warmup', '0']))
    assert table.startswith(title)
    rows = [line for line in table.splitlines() if line.startswith('| ') and 'implementation' not in line]
    assert [row.split('|')[1].strip() for row in rows] == names
    assert all(float(row.split('|')[2]) > 0 and float(row.split('|')[4]) > 0 for row in rows)


def test_flop_count_prices_the_cpu_attention_kernel():
    """The harness' GFLOP/s: torch's counter knows CUDA's fused attention only; the CPU kernel's
    products must count as the unfused path's do (q @ k^T and attn @ v)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mmpvt.models import ViTDet
    harness = load_harness()
    model = ViTDet(arch=dict(embed_dims=32, depth=2, num_heads=2), out_indices=(2,), window_size=0)
    x = torch.randn(1, 3, 64, 64)
    fused = harness.count_flops(model, x, 'infer', False)
    with sdpa_kernel(SDPBackend.MATH):
        unfused = harness.count_flops(model, x, 'infer', False)
    with FlopCounterMode(display=False) as plain, torch.no_grad():  # without the harness' formula
        model.eval()(x)
    assert fused == unfused > plain.get_total_flops()


# -- MViTv2 against detectron2-style blocks (tools/analysis/peers/mvit_detectron2.py) and timm --
# Every stage rule applies (q strides, kv strides 4/2/1/1, window halving, global blocks with
# doubled kv stride) on 16-channel heads.
MVIT_SMALL = dict(embed_dims=(16, 32, 64, 128), depths=(1, 2, 3, 2), num_heads=(1, 2, 4, 8))



@pytest.mark.parametrize('window_size,kv_x2', [(16, True), (0, False)], ids=['detection', 'classification'])
def test_mvit_detectron2_style_peer_computes_the_function_mmpvt_computes(window_size, kv_x2):
    """The harness' detectron2-style peer is the same model, in both layouts the harness runs:
    its state dict, as a detectron2 detector holds it (``backbone.bottom_up.``), loads into
    mmpvt's MViTv2 with nothing missing or unexpected, and the four maps agree at a non-square
    size where every window grid is zero-padded (stage 1: 25x34 tokens in 16-token windows)."""
    peer_cls = load_harness().load_peer('mvit_detectron2').MViTDetectron2Style
    torch.manual_seed(0)
    peer = peer_cls(dict(MVIT_SMALL), window_size=window_size, global_kv_stride_x2=kv_x2).eval()
    with torch.no_grad():  # far from uniform attention, so that relative positions matter
        for name, p in peer.named_parameters():
            is_norm_weight = p.dim() == 1 and 'norm' in name and name.endswith('weight')
            p.normal_(1. if is_norm_weight else 0., .2)
    detector = {'model': {f'backbone.bottom_up.{k}': v for k, v in peer.state_dict().items()}}
    assert MViTv2.checkpoint_format.layout(detector['model']) == 'detectron2'
    ours = MViTv2(arch=dict(MVIT_SMALL), window_size=window_size, global_kv_stride_x2=kv_x2,
                  drop_path_rate=0.).eval()
    result = ours.load_state_dict(MViTv2.convert_state_dict(detector))
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 100, 136)
    with torch.no_grad():
        theirs, mine = peer(x), ours(x)
    sides = [(25, 34), (13, 17), (7, 9), (4, 5)]
    assert [tuple(t.shape) for t in theirs] == [tuple(m.shape) for m in mine] == \
        [(1, c, *s) for c, s in zip(MVIT_SMALL['embed_dims'], sides)]
    for level, (t, m) in enumerate(zip(theirs, mine)):
        assert float((m - t).abs().max() / t.abs().max()) <= 1e-4, level


@pytest.mark.parametrize('variant,timm_name', [('tiny', 'mvitv2_tiny'), ('large_in1k', 'mvitv2_large')])
def test_mvit_benchmark_rows_hold_the_same_tensors_and_only_where_they_can_run(variant, timm_name):
    """timm's row is timm's registered model with features_only and has mmpvt's tensors but for
    mmpvt's four output norms (detectron2's, absent from classification models); the
    detectron2-style row's tensors are mmpvt's, names included. timm's row exists only in the
    classification layout at one square size that is a multiple of 32, the detectron2-style row
    only for designs detectron2 has (not large_in1k's widening MLPs)."""
    import timm
    harness, arch = load_harness(), f'mvit_{variant}'
    with torch.device('meta'):
        ours = harness.build_mmpvt(arch, False, classification=True)
        peer = harness.build_timm(arch, True, classification=True, sizes=((224, 224),))
        registered = timm.create_model(timm_name, features_only=True)
        d2_style = harness.build_detectron2_style(arch, False)

    def shapes(model: nn.Module) -> list[tuple[int, ...]]:
        return sorted(tuple(p.shape) for p in model.parameters())
    out_norms = {n for n, _ in ours.named_parameters() if n.startswith('scale') and '_norm.' in n}
    assert len(out_norms) == 8
    assert shapes(peer) == shapes(registered)
    assert shapes(peer) == sorted(tuple(p.shape) for n, p in ours.named_parameters() if n not in out_norms)
    assert all(stage.grad_checkpointing for stage in peer.model.stages)  # with_cp reaches timm's stages
    if variant == 'large_in1k':
        assert d2_style is None
    else:
        with torch.device('meta'):
            detection = harness.build_mmpvt(arch, False)
        assert {k: tuple(v.shape) for k, v in d2_style.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in detection.state_dict().items()}
    for layout, sizes in ((False, ((224, 224),)), (True, ((800, 1344),)), (True, ((200, 200),)),
                          (True, ((224, 224), (256, 256)))):
        assert harness.build_timm(arch, False, classification=layout, sizes=sizes) is None, (layout, sizes)


class OpNames(TorchDispatchMode):
    """The names of the ATen operators a region dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('q_shape,kv_shape,mask_shape', [
    ((2, 3, 50, 16), (2, 3, 12, 16), (2, 3, 50, 12)),  # pooled keys (MViTv2), a mask per head
    ((4, 49, 8), (4, 49, 8), (49, 49)),  # a mask broadcast over the batch
], ids=['pooled', 'broadcast'])
def test_masked_attention_trains_as_the_fused_kernel_does(q_shape, kv_shape, mask_shape):
    """The written-out CPU training path gives the fused kernel's values and gradients; only
    a step that needs gradients takes it."""
    from torch.nn import functional as F

    from mmpvt.models.attention import masked_attention
    tensors = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
               for shape in (q_shape, kv_shape, kv_shape, mask_shape)]
    ops = OpNames()
    with ops:
        out = masked_attention(*tensors)
    assert 'baddbmm' in ops.names and not any('scaled_dot_product' in name for name in ops.names)
    grads = torch.autograd.grad((out * out).sum(), tensors)
    ref = F.scaled_dot_product_attention(*tensors[:3], attn_mask=tensors[3])
    ref_grads = torch.autograd.grad((ref * ref).sum(), tensors)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)

    ops = OpNames()
    with ops, torch.no_grad():
        torch.testing.assert_close(masked_attention(*tensors), ref.detach(), rtol=1e-10, atol=1e-12)
    assert 'baddbmm' not in ops.names


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


@pytest.mark.parametrize('chunk_masks', [1000, 2, 1, 0], ids=['whole', 'two-entries', 'one-entry', 'one-row'])
def test_rel_pos_attention_in_mask_slices_equals_the_whole_mask(monkeypatch, chunk_masks):
    """Inference builds the relative-position mask a slice at a time: whole batch entries,
    or runs of query rows of one entry when an entry's mask is over the budget. Every way of
    slicing gives the attention with the whole mask, in the layout that flattens into tokens."""
    from torch.nn import functional as F

    from mmpvt.models import attention
    n, heads, q_hw, k_hw, c = 3, 2, (5, 7), (3, 4), 8
    entry_bytes = heads * q_hw[0] * q_hw[1] * k_hw[0] * k_hw[1] * 8  # float64
    # 0: the budget of one query row and a half, so the rows go two at a time
    budget = chunk_masks * entry_bytes if chunk_masks else entry_bytes * 3 // (2 * q_hw[0])
    monkeypatch.setattr(attention, 'REL_POS_CHUNK_BYTES', budget)
    q = torch.randn(n, heads, q_hw[0] * q_hw[1], c, dtype=torch.float64)
    k, v = (torch.randn(n, heads, k_hw[0] * k_hw[1], c, dtype=torch.float64) for _ in range(2))
    rel_h, rel_w = (torch.randn(9, c, dtype=torch.float64) for _ in range(2))
    def reference():
        mask = attention.decomposed_rel_pos(q, rel_h, rel_w, q_hw, k_hw)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    ref = reference()
    ops = OpNames()
    def tables():
        return (attention.rel_pos_lookup(q_hw[0], k_hw[0], rel_h),
                attention.rel_pos_lookup(q_hw[1], k_hw[1], rel_w))

    with ops, torch.no_grad():
        out = attention.rel_pos_attention(q, k, v, *tables())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert out.transpose(1, 2).is_contiguous()
    assert 'baddbmm' not in ops.names

    # with gradients: the whole mask, the written-out product, the same values
    params = [t.requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    ops = OpNames()
    with ops:
        out = attention.rel_pos_attention(*params[:3], *tables())
    assert 'baddbmm' in ops.names
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    ref = reference()
    for grad, ref_grad in zip(torch.autograd.grad(out.square().sum(), params),
                              torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
def test_rel_pos_mask_is_the_outer_sum_rounded_once(dtype):
    """In reduced precision the mask is a matrix product with a 0/1 matrix (faster on the
    CPU than the broadcast add); each entry is still the sum of its two terms, rounded once."""
    from mmpvt.models.attention import _rel_pos_mask, _rel_pos_spread
    rel_h, rel_w = torch.randn(2, 3, 5, 7, 4).to(dtype), torch.randn(2, 3, 5, 7, 6).to(dtype)
    exact = rel_h.double()[..., :, None] + rel_w.double()[..., None, :]
    ref = exact.to(dtype).flatten(-4, -3).flatten(-2, -1)
    spread = _rel_pos_spread(rel_h, rel_w)
    assert (spread is None) == (dtype == torch.float32)  # the product path in reduced precision
    torch.testing.assert_close(_rel_pos_mask(rel_h, rel_w, spread), ref, rtol=0, atol=0)


def test_mvit_v1_peer_is_torchvisions_model_with_mmpvts_tensors():
    """The torchvision row is the same network: its parameters are mmpvt's but for mmpvt's three
    detection output norms, plus torchvision's (zero) temporal table and its one-class head;
    it exists for one input size with sides that are multiples of 4, without checkpointing."""
    harness = load_harness()
    with torch.device('meta'):
        ours = harness.build_mmpvt('mvitv1_b16', False)
        peer = harness.build_torchvision('mvitv1_b16', False, sizes=((224, 224),))
    out_norms = sum(p.numel() for n, p in ours.named_parameters() if n.startswith('scale'))
    extra = 96 + 768 + 1  # temporal_pos (1, 96); head.1 (1, 768) and its bias
    ours_count = sum(p.numel() for p in ours.parameters())
    assert sum(p.numel() for p in peer.parameters()) == ours_count - out_norms + extra
    for sizes, with_cp in ((((224, 224),), True), (((226, 224),), False), (((224, 224), (256, 256)), False)):
        assert harness.build_torchvision('mvitv1_b16', with_cp, sizes=sizes) is None
