"""The fused depthwise-conv + GELU kernel (mmpvt/ops): built, exact, taken only where it applies.

References are the layer-by-layer PyTorch modules in float64; the kernel runs in float32,
so tolerances are float32 rounding relative to each tensor's scale.
"""
import pytest
import torch
from torch import nn

from mmpvt import PVTv2
from mmpvt.models.pvt import Mlp
from mmpvt.ops import dwconv_gelu


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def run_mlp(mlp: Mlp, x: torch.Tensor, hw, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = mlp(x, hw)
    params = dict(mlp.named_parameters())
    grads = torch.autograd.grad(out, [x, *params.values()], grad)
    return out.detach(), dict(zip(['x', *params], grads))


def make_mlp(dims: int, hidden: int, fc1_bias: bool = True, conv_bias: bool = True) -> Mlp:
    mlp = Mlp(dims, hidden, dwconv=True)
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.5)  # large enough that GELU's curved part matters
    if not fc1_bias:
        mlp.fc1.bias = None
    if not conv_bias:
        mlp.dwconv.bias = None
    return mlp.to(memory_format=torch.channels_last)


def test_the_kernel_is_built_for_this_cpu():
    """`make setup` builds it (setup.py marks it optional, so that an install without a C
    compiler still works); the suite, which needs a compiler for mmcv anyway, requires it."""
    assert dwconv_gelu.isa() in ('avx512', 'avx2', 'base')


@pytest.mark.parametrize('shape', [(2, 1, 1, 8, 16), (1, 1, 5, 3, 12), (3, 4, 1, 5, 20),
                                   (2, 7, 9, 16, 64), (1, 13, 11, 40, 100), (2, 37, 23, 8, 2048)],
                         ids=lambda s: 'B{}-{}x{}-C{}-hidden{}'.format(*s))
@pytest.mark.parametrize('biases', [(True, True), (False, True), (True, False), (False, False)],
                         ids=['both-biases', 'no-fc1-bias', 'no-conv-bias', 'no-biases'])
def test_fused_mlp_matches_the_layers_in_float64(shape, biases):
    """Output and every gradient, on maps down to 1x1, odd channel counts (no vector
    multiple), one-row and one-column maps, and each bias present or absent."""
    torch.manual_seed(0)
    B, H, W, C, hidden = shape
    mlp = make_mlp(C, hidden, *biases)
    reference = make_mlp(C, hidden, *biases).double()
    reference.load_state_dict(mlp.state_dict())
    x, grad = torch.randn(B, H * W, C), torch.randn(B, H * W, C)
    out, grads = run_mlp(mlp, x, (H, W), grad)
    with dwconv_gelu.enabled(False):
        ref_out, ref_grads = run_mlp(reference, x.double(), (H, W), grad.double())
    assert relative_error(out, ref_out) < 2e-6
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize('shape', [(2, 1, 1, 8, 16), (2, 7, 9, 16, 64), (2, 37, 23, 8, 2048)],
                         ids=lambda s: 'B{}-{}x{}-C{}-hidden{}'.format(*s))
def test_fused_mlp_under_bfloat16_autocast_is_as_close_to_float64_as_the_layers(shape):
    """Under CPU autocast the maps are bfloat16 (the kernel computes in float32 and rounds
    once); its error against float64 stays within the layers' own bfloat16 error."""
    torch.manual_seed(0)
    B, H, W, C, hidden = shape
    mlp = make_mlp(C, hidden)
    reference = make_mlp(C, hidden).double()
    reference.load_state_dict(mlp.state_dict())
    x, grad = torch.randn(B, H * W, C), torch.randn(B, H * W, C)
    results = {}
    for fused in (True, False):
        with dwconv_gelu.enabled(fused), torch.autocast('cpu', dtype=torch.bfloat16):
            results[fused] = run_mlp(mlp, x, (H, W), grad.bfloat16())
    with dwconv_gelu.enabled(False):
        ref_out, ref_grads = run_mlp(reference, x.double(), (H, W), grad.double())
    (out, grads), (layers_out, layers_grads) = results[True], results[False]
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref_out) < max(1.5 * relative_error(layers_out, ref_out), 8e-3)
    for name in ref_grads:
        bound = max(1.5 * relative_error(layers_grads[name], ref_grads[name]), 1e-2)
        assert relative_error(grads[name], ref_grads[name]) < bound, name


def test_the_mlp_takes_the_kernel_exactly_where_it_applies(monkeypatch):
    calls = []
    op = dwconv_gelu._dwconv_gelu
    monkeypatch.setattr(dwconv_gelu, '_dwconv_gelu', lambda *args: calls.append(1) or op(*args))
    mlp = make_mlp(8, 32)
    x = torch.randn(2, 12, 8)
    mlp(x, (3, 4))
    with torch.autocast('cpu', dtype=torch.bfloat16):  # bfloat16 maps: the kernel
        assert mlp(x, (3, 4)).dtype == torch.bfloat16
    assert len(calls) == 2
    with dwconv_gelu.enabled(False):
        mlp(x, (3, 4))
    with torch.autocast('cpu', dtype=torch.float16):  # float16 maps: the layers
        assert mlp(x, (3, 4)).dtype == torch.float16
    mlp.double()(x.double(), (3, 4))  # float64: the layers
    assert len(calls) == 2
    assert not dwconv_gelu.applies(torch.randn(2, 8, 12).transpose(1, 2))  # not contiguous


def test_gradients_are_deterministic_and_agree_across_thread_counts():
    torch.manual_seed(0)
    mlp = make_mlp(16, 64)
    x, grad = torch.randn(2, 20 * 18, 16), torch.randn(2, 20 * 18, 16)
    threads = torch.get_num_threads()
    try:
        first, second = run_mlp(mlp, x, (20, 18), grad)[1], run_mlp(mlp, x, (20, 18), grad)[1]
        torch.set_num_threads(1)
        single = run_mlp(mlp, x, (20, 18), grad)[1]
    finally:
        torch.set_num_threads(threads)
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert relative_error(single[name], first[name].double()) < 1e-5, name  # summation order


def test_a_compiled_training_step_matches_eager():
    """torch.compile traces the op as one node, forward and backward."""
    torch.manual_seed(0)
    model = PVTv2(arch=dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                            mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1)), drop_path_rate=0.)
    x = torch.randn(1, 3, 64, 96)
    grads = []
    for step in (model, torch.compile(model)):
        model.zero_grad()
        sum(o.square().mean() for o in step(x)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r'tokens \(2, 12, 8\), map \(3, 5\)'):
        dwconv_gelu.dwconv_gelu(torch.randn(2, 12, 8), (3, 5), torch.randn(8, 1, 3, 3), None, None)
    with pytest.raises(ValueError, match=r'expected \(B, H\*W, C\) and \(C, 1, 3, 3\)'):
        dwconv_gelu.dwconv_gelu(torch.randn(2, 12, 8), (3, 4), torch.randn(8, 1, 5, 5), None, None)
