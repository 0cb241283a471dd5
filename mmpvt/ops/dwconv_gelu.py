"""PVTv2's MLP middle, ``GELU(dwconv3x3(h + fc1_bias) + conv_bias)``, as one CPU kernel.

On a CPU the depthwise convolution and GELU of PVTv2's MLP are bound by memory traffic over
the block's widest tensor (``mlp_ratio`` times the channels), not by arithmetic. Layer by
layer, the forward pass writes the convolution's output, reads it back for GELU and writes
GELU's; the backward pass reads GELU's input and gradient, writes the convolution's
gradient and reads it twice more. The C kernel in ``csrc/dwconv_gelu.c`` reads ``h`` once
and writes the activation once; its backward reads ``h`` and the incoming gradient once,
recomputes the pre-activation row by row in cache instead of storing it, and writes
``h``'s gradient once, with the weight and bias gradients summed on the way.

It covers float32 and bfloat16 (CPU autocast) CPU tensors, channels last (a contiguous
``(B, H*W, C)`` sequence, as fc1 writes it); the arithmetic is float32 either way, and
bfloat16 results are rounded to nearest even. Everything else (CUDA, float16, float64, a
build without the kernel) takes the layer-by-layer path in mmpvt/models/pvt.py, which
computes the same function. The kernel is registered as the custom op
``mmpvt::dwconv_gelu`` with its own backward, so ``torch.compile`` sees one opaque node and
no graph break.

The C library holds one copy of the kernel per instruction set (``ISAS``) and runs the best
the CPU supports; ``MMPVT_DWCONV_GELU_ISA=avx2|base`` (read once, on first use) or
``select_isa`` forces another, so that every copy can be tested on one machine. When the
library is missing or fails to load, a map it would have taken runs the layers, and the
first one logs a warning with the reason. ``python -m mmpvt.ops`` prints which path runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from mmengine.logging import print_log

_HERE = Path(__file__).parent
# The instruction sets the kernel is compiled for on x86-64, best first ('base' everywhere).
ISAS = ('avx512', 'avx2', 'base')
# Forces one of ISAS for the whole process; read by the C dispatcher on first use.
ISA_ENV = 'MMPVT_DWCONV_GELU_ISA'
_REBUILD = 'rebuild it with `pip install -e .` in mmpvt\'s source tree (needs a C compiler with OpenMP)'


def _load_library() -> tuple[ctypes.CDLL | None, str | None]:
    """The compiled kernel that setup.py builds next to this file, or None and why not."""
    paths = sorted(_HERE.glob('_dwconv_gelu*.so'))
    if not paths:
        return None, f'no _dwconv_gelu*.so in {_HERE}: it was not built'
    errors = []
    for path in paths:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            errors.append(str(exc))
            continue
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.mmpvt_dwconv_gelu_forward.argtypes = [ptr] * 5 + [i64] * 6
        lib.mmpvt_dwconv_gelu_forward.restype = ctypes.c_int
        lib.mmpvt_dwconv_gelu_backward.argtypes = [ptr] * 10 + [i64] * 6
        lib.mmpvt_dwconv_gelu_backward.restype = ctypes.c_int
        lib.mmpvt_dwconv_gelu_isa.restype = ctypes.c_char_p
        lib.mmpvt_dwconv_gelu_supports.argtypes = [ctypes.c_char_p]
        lib.mmpvt_dwconv_gelu_supports.restype = ctypes.c_int
        lib.mmpvt_dwconv_gelu_select.argtypes = [ctypes.c_char_p]
        lib.mmpvt_dwconv_gelu_select.restype = ctypes.c_int
        return lib, None
    return None, 'it failed to load: ' + '; '.join(errors)


# The loaded kernel, or None and the reason (also what tests patch to simulate a failed build).
_LIB, _LOAD_ERROR = _load_library()
_enabled = True
_warned = False
# How the running code path was chosen when select_isa forced it (None: the default).
_forced: str | None = None
# The kernel's dtype codes for the maps; parameters and sums are always float32.
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def available() -> bool:
    """Whether the compiled kernel is present (``pip install -e .`` builds it)."""
    return _LIB is not None


def unavailable_reason() -> str | None:
    """Why the kernel is not available (not built, or the loader's error); None when it is."""
    return None if _LIB is not None else _LOAD_ERROR


def supported_isas() -> tuple[str, ...]:
    """The instruction sets of ``ISAS`` this CPU can run the kernel with (none when not built)."""
    if _LIB is None:
        return ()
    return tuple(name for name in ISAS if _LIB.mmpvt_dwconv_gelu_supports(name.encode()) == 1)


def _isa_error(name: str, source: str) -> ValueError:
    """The error for a requested instruction set the kernel cannot run here."""
    if name not in ISAS:
        return ValueError(f'{source}: unknown instruction set {name!r}; expected one of '
                          f'{", ".join(ISAS)} (or auto for the best this CPU runs)')
    return ValueError(f'{source}: this CPU cannot run the {name} kernel; it runs '
                      f'{", ".join(supported_isas())}')


def isa() -> str | None:
    """The instruction set the kernel runs with here: 'avx512', 'avx2', 'base', or None.

    None means the kernel is not built (the PyTorch layers run instead). Raises ValueError
    when ``MMPVT_DWCONV_GELU_ISA`` asks for a set this CPU cannot run.
    """
    if _LIB is None:
        return None
    name = _LIB.mmpvt_dwconv_gelu_isa()
    if name is None:
        raise _isa_error(os.environ.get(ISA_ENV, ''), f'{ISA_ENV}={os.environ.get(ISA_ENV, "")}')
    return name.decode()


def select_isa(name: str | None) -> None:
    """Forces the kernel's code path for this process, to test or compare each one.

    Args:
        name: one of ``ISAS`` that this CPU supports (see ``supported_isas``); None or
            'auto' for the default: ``MMPVT_DWCONV_GELU_ISA`` if set, else the best the
            CPU runs.

    Raises ValueError for an unknown name or one this CPU cannot run, RuntimeError when
    the kernel is not built.
    """
    global _forced
    if _LIB is None:
        raise RuntimeError(f'mmpvt::dwconv_gelu is unavailable ({_LOAD_ERROR}); {_REBUILD}')
    auto = name is None or name == 'auto'
    status = _LIB.mmpvt_dwconv_gelu_select(None if auto else name.encode())
    if status != 0:
        if auto:
            raise _isa_error(os.environ.get(ISA_ENV, ''), f'{ISA_ENV}={os.environ.get(ISA_ENV, "")}')
        raise _isa_error(name, 'select_isa')
    _forced = None if auto else name


def describe() -> str:
    """Which code path PVTv2's MLP middle runs here and why, as ``python -m mmpvt.ops`` prints it."""
    lines = ['mmpvt::dwconv_gelu (PVTv2 MLP: depthwise conv + GELU, fused)']
    if _LIB is None:
        lines += [f'  kernel: unavailable ({_LOAD_ERROR})',
                  '  code path: the PyTorch layers (depthwise conv, then GELU) on every device',
                  f'  to use the kernel: {_REBUILD}']
        return '\n'.join(lines)
    lines.append(f'  kernel: built ({Path(_LIB._name).name})')
    env = os.environ.get(ISA_ENV, '')
    try:
        name = isa()
    except ValueError as exc:
        lines.append(f'  code path: none, the kernel refuses to run: {exc}')
        return '\n'.join(lines)
    if _forced is not None:
        why = f'forced by select_isa({_forced!r})'
    elif env and env != 'auto' and env == name:
        why = f'forced by {ISA_ENV}={env}'
    else:
        why = f'the best this CPU supports; {ISA_ENV}=avx2|base forces another'
    lines += [f'  code path: {name} ({why})',
              f'  this CPU supports: {", ".join(supported_isas())}',
              '  applies to: float32 and bfloat16 (autocast) CPU maps, channels last; CUDA, float16'
              ' and float64 maps take the PyTorch layers']
    if not _enabled:
        lines.append('  disabled here by dwconv_gelu.enabled(False)')
    return '\n'.join(lines)


@contextlib.contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """Turns the fused kernel on or off inside the block (for comparisons and tests)."""
    global _enabled
    previous, _enabled = _enabled, flag
    try:
        yield
    finally:
        _enabled = previous


def _warn_unavailable() -> None:
    """Says once per process that a map the kernel would have taken runs the layers instead."""
    global _warned
    if _warned or torch.compiler.is_compiling():
        return
    _warned = True
    print_log(f'mmpvt::dwconv_gelu: the fused CPU kernel is unavailable ({_LOAD_ERROR}), so '
              f"PVTv2's MLP runs the slower PyTorch layers; {_REBUILD}",
              logger='current', level=logging.WARNING)


def applies(h: torch.Tensor) -> bool:
    """Whether ``h`` (fc1's output without its bias, ``(B, H*W, C)``) can take the kernel.

    A map the kernel covers finds it missing (not built, or failed to load): the layers run,
    and the first such map of the process logs a warning saying why.
    """
    if not (_enabled and h.device.type == 'cpu' and h.dtype in _DTYPES and h.is_contiguous()):
        return False
    if _LIB is None:
        _warn_unavailable()
        return False
    return True


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int) -> None:
    if status == -2:
        raise TypeError('mmpvt::dwconv_gelu: maps must be float32 or bfloat16')
    if status == -3:
        isa()  # raises the error naming the variable, its value and what this CPU runs
        raise RuntimeError(f'mmpvt::dwconv_gelu: no code path selected ({ISA_ENV})')
    if status != 0:
        raise MemoryError('mmpvt::dwconv_gelu: the kernel could not allocate its buffers')


@torch.library.custom_op('mmpvt::dwconv_gelu', mutates_args=())
def _dwconv_gelu(h: torch.Tensor, height: int, width: int, taps: torch.Tensor,
                 fc1_bias: torch.Tensor | None, conv_bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty_like(h)
    _check(_LIB.mmpvt_dwconv_gelu_forward(
        _ptr(h), _ptr(fc1_bias), _ptr(taps), _ptr(conv_bias), _ptr(out),
        h.shape[0], height, width, h.shape[2], _DTYPES.get(h.dtype, -1), torch.get_num_threads()))
    return out


@_dwconv_gelu.register_fake
def _(h, height, width, taps, fc1_bias, conv_bias):
    return torch.empty_like(h)


@torch.library.custom_op('mmpvt::dwconv_gelu_backward', mutates_args=())
def _dwconv_gelu_backward(grad: torch.Tensor, h: torch.Tensor, height: int, width: int,
                          taps: torch.Tensor, fc1_bias: torch.Tensor | None,
                          conv_bias: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, _, C = h.shape
    threads = torch.get_num_threads()
    grad = grad.to(h.dtype).contiguous()
    grad_h = torch.empty_like(h)
    grad_taps, grad_b1, grad_bc = taps.new_empty(9, C), taps.new_empty(C), taps.new_empty(C)
    partials = taps.new_empty(threads * 11 * C)  # each thread's sums of the 11 (C,) gradients
    _check(_LIB.mmpvt_dwconv_gelu_backward(
        _ptr(h), _ptr(grad), _ptr(fc1_bias), _ptr(taps), _ptr(conv_bias), _ptr(grad_h),
        _ptr(grad_taps), _ptr(grad_bc), _ptr(grad_b1), _ptr(partials), B, height, width, C,
        _DTYPES.get(h.dtype, -1), threads))
    return grad_h, grad_taps, grad_b1, grad_bc


@_dwconv_gelu_backward.register_fake
def _(grad, h, height, width, taps, fc1_bias, conv_bias):
    C = h.shape[-1]
    return torch.empty_like(h), taps.new_empty(9, C), taps.new_empty(C), taps.new_empty(C)


def _setup_context(ctx, inputs, output) -> None:
    h, height, width, taps, fc1_bias, conv_bias = inputs
    ctx.hw = (height, width)
    ctx.has_bias = (fc1_bias is not None, conv_bias is not None)
    ctx.save_for_backward(h, taps, fc1_bias, conv_bias)


def _backward(ctx, grad: torch.Tensor):
    h, taps, fc1_bias, conv_bias = ctx.saved_tensors
    grad_h, grad_taps, grad_b1, grad_bc = _dwconv_gelu_backward(grad, h, *ctx.hw, taps, fc1_bias,
                                                                conv_bias)
    return (grad_h, None, None, grad_taps, grad_b1 if ctx.has_bias[0] else None,
            grad_bc if ctx.has_bias[1] else None)


_dwconv_gelu.register_autograd(_backward, setup_context=_setup_context)


def dwconv_gelu(h: torch.Tensor, hw: tuple[int, int], weight: torch.Tensor,
                fc1_bias: torch.Tensor | None, conv_bias: torch.Tensor | None) -> torch.Tensor:
    """``GELU(conv2d(h + fc1_bias, weight, conv_bias, padding=1, groups=C))`` in one pass.

    Args:
        h: ``(B, H*W, C)`` float32 or bfloat16 CPU tokens, contiguous: fc1's output without
            its bias.
        hw: the map's ``(H, W)``.
        weight: the depthwise kernel, ``(C, 1, 3, 3)``.
        fc1_bias: added to the map before the convolution (not to its zero padding); or None.
        conv_bias: the convolution's bias; or None.

    Returns:
        ``(B, H*W, C)``: the activation, as the layers applied one by one compute it.
    """
    B, N, C = h.shape
    if N != hw[0] * hw[1] or tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f'dwconv_gelu: tokens {tuple(h.shape)}, map {tuple(hw)} and weight '
                         f'{tuple(weight.shape)} disagree; expected (B, H*W, C) and (C, 1, 3, 3)')
    # (9, C): the channel loops read contiguously. Parameters enter in float32 whatever the
    # maps' dtype (bfloat16 under autocast), as autocast would keep them.
    taps = weight.reshape(C, 9).t().float().contiguous()
    fc1_bias = None if fc1_bias is None else fc1_bias.float()
    conv_bias = None if conv_bias is None else conv_bias.float()
    return _dwconv_gelu(h, int(hw[0]), int(hw[1]), taps, fc1_bias, conv_bias)
