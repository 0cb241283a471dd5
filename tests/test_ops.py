"""The fused depthwise-conv + GELU kernel (mmpvt/ops): built, exact on every code path, taken
only where it applies, and loud when it is missing.

The reference for values and gradients is the MLP written out from its definition in float64
with PyTorch's functional ops: ``fc2(GELU(conv2d(fc1(x), padding=1, groups=C)))``, fc1's bias
added to the map before the zero padding, the exact (erf) GELU. It does not go through mmpvt's
own layer path, which folds fc1's bias into the convolution (tests/test_performance.py checks
that fold against the same definition). The kernel computes in float32, so tolerances are
float32 rounding relative to each tensor's scale.
"""
import functools
import logging
import subprocess
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger
from torch import nn

from mmpvt import PVTv2
from mmpvt.models.pvt import Mlp
from mmpvt.ops import dwconv_gelu

ROOT_DIR = Path(__file__).resolve().parents[1]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def run_mlp(mlp: Mlp, x: torch.Tensor, hw, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = mlp(x, hw)
    params = dict(mlp.named_parameters())
    grads = torch.autograd.grad(out, [x, *params.values()], grad)
    return out.detach(), dict(zip(['x', *params], grads))


def reference_mlp(mlp: Mlp, x: torch.Tensor, hw, grad: torch.Tensor):
    """Output and gradients of ``mlp``'s function, in float64, from its definition.

    The depthwise convolution is written as its nine shifted, weighted copies of the
    zero-padded map (float64 ``conv2d`` gives the same to 1e-14, several times slower).
    """
    params = {name: p.detach().double().requires_grad_(True) for name, p in mlp.named_parameters()}
    x = x.double().requires_grad_(True)
    h = F.linear(x, params['fc1.weight'], params.get('fc1.bias'))
    B, _, C = h.shape
    H, W = hw
    padded = F.pad(h.transpose(1, 2).reshape(B, C, H, W), (1, 1, 1, 1))
    taps = params['dwconv.weight'][:, 0, :, :, None, None]  # (C, 3, 3, 1, 1)
    y = sum(taps[:, dy, dx] * padded[:, :, dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3))
    if 'dwconv.bias' in params:
        y = y + params['dwconv.bias'][:, None, None]
    out = F.linear(F.gelu(y.flatten(2).transpose(1, 2)), params['fc2.weight'], params['fc2.bias'])
    grads = torch.autograd.grad(out, [x, *params.values()], grad.double())
    return out.detach(), dict(zip(['x', *params], grads))


@functools.cache
def reference_case(shape: tuple[int, ...], biases: tuple[bool, bool] = (True, True)):
    """A seeded MLP, input and output gradient of ``shape`` (B, H, W, C, hidden), with the
    reference's output and gradients: computed once, shared by every code path's test."""
    torch.manual_seed(0)
    B, H, W, C, hidden = shape
    mlp = make_mlp(C, hidden, *biases)
    x, grad = torch.randn(B, H * W, C), torch.randn(B, H * W, C)
    return mlp, x, grad, reference_mlp(mlp, x, (H, W), grad)


def make_mlp(dims: int, hidden: int, fc1_bias: bool = True, conv_bias: bool = True) -> Mlp:
    mlp = Mlp(dims, hidden, dwconv=True)
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.5)  # large enough that GELU's curved part matters
    if not fc1_bias:
        mlp.fc1.bias = None
    if not conv_bias:
        mlp.dwconv.bias = None
    return mlp.to(memory_format=torch.channels_last)


@pytest.fixture(params=dwconv_gelu.ISAS)
def isa(request):
    """Runs the test on one copy of the kernel, forced; skipped where this CPU cannot run it."""
    name = request.param
    if name not in dwconv_gelu.supported_isas():
        pytest.skip(f'this CPU cannot run the {name} kernel '
                    f'(it runs: {", ".join(dwconv_gelu.supported_isas()) or "none, not built"})')
    dwconv_gelu.select_isa(name)
    try:
        assert dwconv_gelu.isa() == name
        yield name
    finally:
        dwconv_gelu.select_isa(None)


def test_the_kernel_is_built_for_this_cpu():
    """`make setup` builds it (setup.py marks it optional, so that an install without a C
    compiler still works); the suite, which needs a compiler for mmcv anyway, requires it."""
    assert dwconv_gelu.isa() in dwconv_gelu.ISAS
    assert dwconv_gelu.isa() == dwconv_gelu.supported_isas()[0]  # the best unless forced
    assert 'base' in dwconv_gelu.supported_isas()


@pytest.mark.parametrize('shape', [(2, 1, 1, 8, 16), (1, 1, 5, 3, 12), (3, 4, 1, 5, 20),
                                   (2, 7, 9, 16, 64), (1, 13, 11, 40, 100), (2, 37, 23, 8, 2048)],
                         ids=lambda s: 'B{}-{}x{}-C{}-hidden{}'.format(*s))
@pytest.mark.parametrize('biases', [(True, True), (False, True), (True, False), (False, False)],
                         ids=['both-biases', 'no-fc1-bias', 'no-conv-bias', 'no-biases'])
def test_fused_mlp_matches_the_definition_in_float64(shape, biases, isa):
    """Output and every gradient, on maps down to 1x1, odd channel counts (no vector
    multiple), one-row and one-column maps, each bias present or absent, on each code path."""
    B, H, W, C, hidden = shape
    mlp, x, grad, (ref_out, ref_grads) = reference_case(shape, biases)
    out, grads = run_mlp(mlp, x, (H, W), grad)
    assert relative_error(out, ref_out) < 2e-6
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize('shape', [(2, 1, 1, 8, 16), (2, 7, 9, 16, 64), (2, 37, 23, 8, 2048)],
                         ids=lambda s: 'B{}-{}x{}-C{}-hidden{}'.format(*s))
def test_fused_mlp_under_bfloat16_autocast_is_as_close_to_float64_as_the_layers(shape, isa):
    """Under CPU autocast the maps are bfloat16 (the kernel computes in float32 and rounds
    once); its error against float64 stays within the layers' own bfloat16 error."""
    B, H, W, C, hidden = shape
    mlp, x, grad, (ref_out, ref_grads) = reference_case(shape)
    results = {}
    for fused in (True, False):
        with dwconv_gelu.enabled(fused), torch.autocast('cpu', dtype=torch.bfloat16):
            results[fused] = run_mlp(mlp, x, (H, W), grad.bfloat16())
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


def test_the_layer_path_matches_timm_end_to_end(monkeypatch):
    """With the kernel off, PVTv2 runs the layers (the path of every CUDA and float16 user,
    and of an install without the kernel): its features equal timm's pvt_v2 at an awkward
    size, from the same random weights (biases included)."""
    calls = []
    op = dwconv_gelu._dwconv_gelu
    monkeypatch.setattr(dwconv_gelu, '_dwconv_gelu', lambda *args: calls.append(1) or op(*args))
    torch.manual_seed(1)
    reference = timm.create_model('pvt_v2_b0', pretrained=False).eval()
    with torch.no_grad():  # timm initialises biases to zero and norms to one: make every one count
        for p in reference.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    model = PVTv2(arch='b0').eval()
    model.load_state_dict(PVTv2.convert_state_dict(reference.state_dict()), strict=True)
    x = torch.randn(1, 3, 225, 290)
    with torch.no_grad(), dwconv_gelu.enabled(False):
        outs = model(x)
        refs = reference.forward_intermediates(x, intermediates_only=True)
    assert not calls  # the layers ran, not the kernel
    assert len(outs) == len(refs) == 4
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape
        assert float((out - ref).abs().max()) <= 1e-5


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


# -- choosing the code path ------------------------------------------------------------------------
def test_select_isa_refuses_unknown_names_and_keeps_the_path():
    before = dwconv_gelu.isa()
    with pytest.raises(ValueError, match="instruction set 'sse9'; expected one of avx512, avx2, base"):
        dwconv_gelu.select_isa('sse9')
    assert dwconv_gelu.isa() == before


@pytest.mark.parametrize('name', dwconv_gelu.ISAS)
def test_select_isa_refuses_what_this_cpu_cannot_run(name):
    if name in dwconv_gelu.supported_isas():
        pytest.skip(f'this CPU runs the {name} kernel: nothing to refuse')
    before = dwconv_gelu.isa()
    with pytest.raises(ValueError, match=f'this CPU cannot run the {name} kernel; it runs'):
        dwconv_gelu.select_isa(name)
    assert dwconv_gelu.isa() == before


def test_the_environment_variable_forces_the_path(monkeypatch):
    """The C dispatcher reads MMPVT_DWCONV_GELU_ISA for its default choice."""
    forced = dwconv_gelu.supported_isas()[-1]  # 'base', never the default where a vector set runs
    monkeypatch.setenv(dwconv_gelu.ISA_ENV, forced)
    try:
        dwconv_gelu.select_isa(None)
        assert dwconv_gelu.isa() == forced
        assert f'code path: {forced} (forced by {dwconv_gelu.ISA_ENV}={forced})' in dwconv_gelu.describe()
        monkeypatch.setenv(dwconv_gelu.ISA_ENV, 'avx1024')
        with pytest.raises(ValueError, match="MMPVT_DWCONV_GELU_ISA=avx1024: unknown instruction set"):
            dwconv_gelu.select_isa(None)
    finally:
        monkeypatch.delenv(dwconv_gelu.ISA_ENV)
        dwconv_gelu.select_isa(None)
    assert dwconv_gelu.isa() == dwconv_gelu.supported_isas()[0]


def test_python_m_mmpvt_ops_reports_the_forced_path(python, monkeypatch):
    """A fresh process reads the variable on first use."""
    monkeypatch.setenv(dwconv_gelu.ISA_ENV, 'base')
    out = subprocess.run([python, '-m', 'mmpvt.ops'], cwd=ROOT_DIR, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'kernel: built (_dwconv_gelu' in out.stdout
    assert 'code path: base (forced by MMPVT_DWCONV_GELU_ISA=base)' in out.stdout
    assert f'this CPU supports: {", ".join(dwconv_gelu.supported_isas())}' in out.stdout


def test_a_bad_environment_variable_is_an_error_not_another_path(python, monkeypatch):
    """In a fresh process, ``python -m mmpvt.ops`` exits 1 naming the value, and a forward
    the kernel would take raises the same error rather than run some other path."""
    monkeypatch.setenv(dwconv_gelu.ISA_ENV, 'avx1024')
    script = ('import sys, torch\n'
              'from mmpvt.models.pvt import Mlp\n'
              'from mmpvt.ops.__main__ import main\n'
              'rc = main()\n'
              'try:\n'
              '    Mlp(8, 16, dwconv=True)(torch.randn(1, 4, 8), (2, 2))\n'
              'except ValueError as exc:\n'
              '    print(f"forward: {exc}")\n'
              'sys.exit(rc)\n')
    out = subprocess.run([python, '-c', script], cwd=ROOT_DIR, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert "error: MMPVT_DWCONV_GELU_ISA=avx1024: unknown instruction set 'avx1024'" in out.stderr
    assert 'code path: none, the kernel refuses to run' in out.stdout
    assert "forward: MMPVT_DWCONV_GELU_ISA=avx1024: unknown instruction set 'avx1024'" in out.stdout


# -- a kernel that failed to build or load -------------------------------------------------------------
@pytest.fixture
def warnings_logged():
    """The warnings mmengine's current logger emits during the test."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_the_loader_says_why_the_kernel_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(dwconv_gelu, '_HERE', tmp_path)
    lib, reason = dwconv_gelu._load_library()
    assert lib is None and reason == f'no _dwconv_gelu*.so in {tmp_path}: it was not built'
    (tmp_path / '_dwconv_gelu.cpython-311-x86_64-linux-gnu.so').write_bytes(b'not a shared object')
    lib, reason = dwconv_gelu._load_library()
    assert lib is None and reason.startswith('it failed to load: ')
    assert '_dwconv_gelu.cpython-311-x86_64-linux-gnu.so' in reason  # the OSError's own text


def test_a_missing_kernel_warns_once_and_the_layers_run(monkeypatch, warnings_logged):
    reason = 'it failed to load: _dwconv_gelu.so: cannot open shared object file'
    monkeypatch.setattr(dwconv_gelu, '_LIB', None)
    monkeypatch.setattr(dwconv_gelu, '_LOAD_ERROR', reason)
    monkeypatch.setattr(dwconv_gelu, '_warned', False)
    torch.manual_seed(0)
    mlp = make_mlp(8, 32)
    x, grad = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    with dwconv_gelu.enabled(False):  # turned off on purpose: nothing to say
        mlp(x, (3, 4))
    with torch.autocast('cpu', dtype=torch.float16):  # a map the kernel never takes
        mlp(x, (3, 4))
    mlp.double()(x.double(), (3, 4))
    mlp.float()
    assert warnings_logged == []
    out, grads = run_mlp(mlp, x, (3, 4), grad)  # float32 on the CPU: would have taken the kernel
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mlp(x, (3, 4))
    assert len(warnings_logged) == 1
    message = warnings_logged[0]
    assert f'the fused CPU kernel is unavailable ({reason})' in message
    assert 'pip install -e .' in message
    ref_out, ref_grads = reference_mlp(mlp, x, (3, 4), grad)
    assert relative_error(out, ref_out) < 2e-6
    for name in ref_grads:
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name
    assert dwconv_gelu.isa() is None and dwconv_gelu.supported_isas() == ()
    assert dwconv_gelu.unavailable_reason() == reason
    with pytest.raises(RuntimeError, match='unavailable .*pip install -e .'):
        dwconv_gelu.select_isa('base')


def test_python_m_mmpvt_ops_without_the_kernel(monkeypatch, capsys):
    from mmpvt.ops.__main__ import main
    reason = 'no _dwconv_gelu*.so in mmpvt/ops: it was not built'
    monkeypatch.setattr(dwconv_gelu, '_LIB', None)
    monkeypatch.setattr(dwconv_gelu, '_LOAD_ERROR', reason)
    assert main() == 0
    printed = capsys.readouterr().out
    assert f'kernel: unavailable ({reason})' in printed
    assert 'code path: the PyTorch layers' in printed and 'pip install -e .' in printed
