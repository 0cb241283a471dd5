"""Compares mmpvt's backbones with their peers (mmdet's built-in PVTs, timm's), in one run.

    python tools/analysis/benchmark_backbone.py --arch b2 --shape 1 3 800 1344 --dtype bf16
    python tools/analysis/benchmark_backbone.py --arch vitdet_base --shape 1 3 1024 1024 --dtype fp32 bf16
    python tools/analysis/benchmark_backbone.py --arch b2 --shape 2 3 512 512 --mode train --memory
    python tools/analysis/benchmark_backbone.py --arch b2 --shape 1 3 800 1333 --detector
    python tools/analysis/benchmark_backbone.py --arch b2 --shape 2 3 512 512 --mode train \
        --keep-freed-memory --op-times

The implementations run interleaved (A B C A B C ...) after warm-up, so that drift of a
shared machine hits all of them alike; the table reports each one's median and spread,
its time relative to mmpvt, its achieved GFLOP/s next to the machine's GEMM throughput
for the same dtype (measured in the same run), and, with ``--memory``, the peak memory of
one step measured in a fresh process per implementation. Weights are random: speed does
not depend on them. ``vitdet_<variant>`` archs time ViTDet's column (the stride-16 map: the
pyramid's deconvolutions are not built) against timm's ``VisionTransformerSAM`` with the same
settings (``samvit_base_patch16`` for base) and its neck left out. ``--detector`` times a
whole RetinaNet (mmdet's PVTv2-b2 config) with mmpvt's backbone against the same detector with
mmdet's built-in one. ``--op-times`` adds
each implementation's time per operator, ``--keep-freed-memory`` runs all of them with glibc
keeping freed memory (no page faults; docs/benchmarks.md says why both are reported).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mmpvt.apis.quiet import quiet_third_party_warnings
from mmpvt.models.pvt import PVT_ARCHS, PVTV2_ARCHS
from mmpvt.models.vitdet import VITDET_ARCHS

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
V1_NAMES = {'tiny': 't', 'small': 's', 'medium': 'm', 'large': 'l'}
VITDET = 'vitdet_'  # --arch vitdet_base: ViTDet's variants, prefixed
ARCHS = [*PVT_ARCHS, *PVTV2_ARCHS, *(VITDET + name for name in VITDET_ARCHS)]


class FirstOutput(torch.nn.Module):
    """A model returning one map, as a one-tuple: every step sums a tuple of outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.forward_features(x),)


# -- the implementations -----------------------------------------------------------------------
def build_mmpvt(arch: str, with_cp: bool) -> torch.nn.Module:
    from mmpvt.models import PVT, PVTv2, ViTDet
    if arch.startswith(VITDET):  # the column only: the map timm's SAM encoder also ends with
        return ViTDet(arch=arch[len(VITDET):], out_indices=(2,), drop_path_rate=0., with_cp=with_cp)
    cls = PVT if arch in PVT_ARCHS else PVTv2
    return cls(arch=arch, drop_path_rate=0., with_cp=with_cp)


def build_mmdet(arch: str, with_cp: bool) -> torch.nn.Module | None:
    if arch.startswith(VITDET):
        return None  # mmdet's ViTDet is a project, not part of the package
    from mmdet.models.backbones.pvt import PyramidVisionTransformer, PyramidVisionTransformerV2
    settings = {**PVT_ARCHS, **PVTV2_ARCHS}[arch]
    if settings.get('linear') or with_cp:
        return None  # mmdet has neither linear attention nor activation checkpointing
    cls = PyramidVisionTransformer if arch in PVT_ARCHS else PyramidVisionTransformerV2
    model = cls(embed_dims=settings['embed_dims'][0], num_layers=list(settings['depths']),
                mlp_ratios=list(settings['mlp_ratios']), drop_path_rate=0.)
    model.init_weights()
    return model


def build_timm(arch: str, with_cp: bool) -> torch.nn.Module | None:
    if arch in PVT_ARCHS:
        return None  # timm has no PVT v1
    if arch.startswith(VITDET):
        from timm.models.vision_transformer_sam import VisionTransformerSAM
        settings = VITDET_ARCHS[arch[len(VITDET):]]
        # samvit_base_patch16's settings for base, the neck (or its stand-in norm) left out.
        model = VisionTransformerSAM(
            img_size=1024, embed_dim=settings['embed_dims'], depth=settings['depth'],
            num_heads=settings['num_heads'], global_attn_indexes=settings['global_attn_indexes'],
            window_size=14, use_rel_pos=True, neck_chans=0, num_classes=0)
        model.neck = torch.nn.Identity()
        model.set_grad_checkpointing(with_cp)
        return FirstOutput(model)
    import timm
    model = timm.create_model(f'pvt_v2_{arch}', features_only=True)
    if with_cp:
        model.set_grad_checkpointing(True)
    return model


BUILDERS: dict[str, Callable[[str, bool], torch.nn.Module | None]] = {
    'mmpvt': build_mmpvt, 'mmdet': build_mmdet, 'timm': build_timm}


def build_retinanet(backbone: str) -> torch.nn.Module:
    """mmdet's RetinaNet-PVTv2-b2 config, with mmdet's or mmpvt's backbone."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromstring("_base_ = 'mmdet::pvt/retinanet_pvtv2-b2_fpn_1x_coco.py'", '.py')
    cfg.model.backbone.init_cfg = None
    if backbone == 'mmpvt':
        import mmpvt  # noqa: F401  (registers PVTv2)
        cfg.model.backbone = dict(type='PVTv2', arch='b2', drop_path_rate=0.)
    return MODELS.build(cfg.model)


# -- measuring ------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    """Waits until the device has run all the work queued on it.

    CUDA runs kernels asynchronously: a clock read without this times their launch, not
    their work.
    """
    if device == 'cuda':
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds ``fn`` takes on ``device``: nothing earlier is still running when the clock
    starts, and everything ``fn`` queued has finished when it stops."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def make_step(model: torch.nn.Module, x: torch.Tensor, mode: str, dtype: torch.dtype, device: str,
              detector: bool = False) -> Callable[[], None]:
    """One inference forward, or forward + backward of a scalar from all outputs."""
    if detector:
        from mmdet.structures import DetDataSample
        samples = [DetDataSample(metainfo=dict(img_shape=x.shape[-2:], ori_shape=x.shape[-2:],
                                               scale_factor=(1., 1.), pad_shape=x.shape[-2:]))
                   for _ in range(x.shape[0])]

    def step() -> None:
        ctx = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else nullcontext()
        if mode == 'infer':
            with torch.no_grad(), ctx:
                model(x, samples, mode='predict') if detector else model(x)
        else:
            with ctx:
                outs = model(x)
                loss = sum(o.float().mean() for o in outs)
            loss.backward()
            model.zero_grad(set_to_none=True)
        synchronize(device)
    return step


def count_flops(model: torch.nn.Module, x: torch.Tensor, mode: str, detector: bool) -> int:
    """FLOPs of one step: the forward's, times 3 in train mode (backward ~ 2x forward).

    The backward is not counted directly: torch's counter prices the backward of a grouped
    (depthwise) convolution as if it were dense, several times PVTv2's real cost.
    """
    step = make_step(model.eval(), x, 'infer', torch.float32, x.device.type, detector)
    with FlopCounterMode(display=False) as counter:
        step()
    model.train(mode == 'train')
    return counter.get_total_flops() * (3 if mode == 'train' else 1)


def gemm_gflops(dtype: torch.dtype, device: str, size: int | None = None, repeat: int = 5) -> float:
    """The machine's dense matmul throughput for ``dtype``: the ceiling for this model.

    ``size`` defaults to 2048 on the CPU and 8192 on CUDA, where a smaller product is too
    short to keep a GPU busy and would time its launch overhead.
    """
    size = size or (8192 if device == 'cuda' else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = [timed(lambda: a @ b, device) for _ in range(repeat + 1)]
    return 2 * size ** 3 / statistics.median(times[1:]) / 1e9


def peak_memory_mb(args: argparse.Namespace, impl: str, dtype: str, shape: tuple[int, ...]) -> float:
    """Peak memory growth of one step, measured in a fresh process.

    CPU: resident memory sampled every half millisecond during the step, over its level
    just before; glibc is told to map every large block separately
    (MALLOC_MMAP_THRESHOLD_) so that freed activations leave the resident set at once.
    CUDA: the allocator's peak over its level before the step.
    """
    command = [sys.executable, __file__, '--memory-probe', impl, '--arch', args.arch,
               '--shape', *map(str, shape), '--dtype', dtype, '--mode', args.mode,
               '--device', args.device] + (['--with-cp'] if args.with_cp else []) + \
              (['--detector'] if args.detector else [])
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(128 * 1024)}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])['peak_mb']


def memory_probe(args: argparse.Namespace) -> None:
    impl = args.memory_probe
    model = (build_retinanet(impl) if args.detector else BUILDERS[impl](args.arch, args.with_cp))
    model = model.to(args.device).train(args.mode == 'train')
    x = torch.randn(args.shape[0], device=args.device)
    step = make_step(model, x, args.mode, DTYPES[args.dtype[0]], args.device, args.detector)
    step()  # warm-up: one-time allocations (optimiser-free, so only caches) happen here
    if args.device == 'cuda':
        # The caching allocator's own count of the bytes tensors hold: its peak during the
        # step over its level before (the step synchronises, so all its work has run).
        synchronize(args.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        page = os.sysconf('SC_PAGE_SIZE')

        def rss() -> int:
            with open('/proc/self/statm') as f:
                return int(f.read().split()[1]) * page

        base, samples, done = rss(), [], threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(rss())
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        step()
        done.set()
        sampler.join()
        peak = max(samples + [rss()]) - base
    print(json.dumps({'peak_mb': peak / 2 ** 20}))


class OpTimer(TorchDispatchMode):
    """Wall time of every ATen operator a step dispatches, summed by operator name.

    Timed at the dispatcher, around each call: torch.profiler's self times were unreliable
    on this kind of machine (a GEMM's time attributed several times over). On CUDA each
    operator is synchronised before and after (``timed``), so that its kernels' run is
    counted, not their launch; the step then runs slower than untimed.
    """

    def __init__(self, totals: collections.Counter, device: str = 'cpu') -> None:
        super().__init__()
        self.totals = totals
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = []
        seconds = timed(lambda: out.append(func(*args, **(kwargs or {}))), self.device)
        self.totals[func.overloadpacket.__name__] += seconds
        return out[0]


def op_times_table(rows: dict[str, dict[str, Any]], repeat: int, top: int = 15, device: str = 'cpu') -> str:
    """Per-operator milliseconds per step of each eager row, timed interleaved."""
    eager = {label: row for label, row in rows.items() if row['eager']}
    totals = {label: collections.Counter() for label in eager}
    for _ in range(repeat):
        for label, row in eager.items():
            with OpTimer(totals[label], device):
                row['step']()
    names = sorted(set().union(*totals.values()), key=lambda n: -max(t[n] for t in totals.values()))
    lines = ['| operator | ' + ' | '.join(eager) + ' |', '|---|' + '---|' * len(eager)]
    for name in names[:top]:
        lines.append(f'| {name} | ' + ' | '.join(f'{1e3 * totals[label][name] / repeat:.1f}'
                                                 for label in eager) + ' |')
    lines.append('| all operators | ' + ' | '.join(f'{1e3 * sum(t.values()) / repeat:.1f}'
                                                   for t in totals.values()) + ' |')
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    names = [n for n in (['mmpvt', 'mmdet'] if args.detector else list(BUILDERS)) if n in args.impls]
    shapes = [tuple(shape) for shape in args.shape]
    inputs = {shape: torch.randn(shape, device=args.device) for shape in shapes}
    # One row per implementation x eager/compiled x dtype x shape, all timed interleaved.
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        model = build_retinanet(name) if args.detector else BUILDERS[name](args.arch, args.with_cp)
        if model is None:
            continue
        model = model.to(args.device).train(args.mode == 'train')
        variants = [('', model)] + ([(' compiled', torch.compile(model))] if args.compile else [])
        for suffix, variant in variants:
            for dtype in args.dtype:
                for shape in shapes:
                    label = (f'{name}{suffix}' + (f' {dtype}' if len(args.dtype) > 1 else '')
                             + (f' {"x".join(map(str, shape))}' if len(shapes) > 1 else ''))
                    rows[label] = dict(
                        step=make_step(variant, inputs[shape], args.mode, DTYPES[dtype], args.device,
                                       args.detector),
                        impl=name, eager=not suffix, dtype=dtype, shape=shape, times=[])
    for _ in range(args.warmup):
        for row in rows.values():
            row['step']()
    for _ in range(args.repeat):
        for row in rows.values():  # interleaved: A B C A B C ...
            row['times'].append(timed(row['step'], args.device))
    # FLOPs are counted on an eager model: the compiled graph hides its operations.
    eager = build_retinanet('mmpvt') if args.detector else build_mmpvt(args.arch, False)
    eager = eager.to(args.device).train(args.mode == 'train')
    flops = {shape: count_flops(eager, inputs[shape], args.mode, args.detector) for shape in shapes}
    ceilings = {dtype: gemm_gflops(DTYPES[dtype], args.device) for dtype in args.dtype}
    if args.memory:
        for row in rows.values():
            if row['eager']:
                row['memory'] = peak_memory_mb(args, row['impl'], row['dtype'], row['shape'])

    first = next(iter(rows))
    base = statistics.median(rows[first]['times'])
    what = 'RetinaNet-PVTv2-b2' if args.detector else args.arch
    lines = [
        f'{what}, input {", ".join("x".join(map(str, s)) for s in shapes)}, {args.mode}, {args.device}'
        f'{", with_cp" if args.with_cp else ""}; {args.repeat} interleaved runs after {args.warmup} '
        'warm-up; GFLOP per step ' + ', '.join(f'{f / 1e9:.1f}' for f in flops.values())
        + '; GEMM ceiling ' + ', '.join(f'{d} {c:.0f} GFLOP/s' for d, c in ceilings.items()),
        '',
        f'| implementation | median (s) | min - max (s) | time / {first} | GFLOP/s | % of GEMM ceiling |'
        + (' peak memory (MB) |' if args.memory else ''),
        '|---|---|---|---|---|---|' + ('---|' if args.memory else ''),
    ]
    for label, row in rows.items():
        ts = row['times']
        median = statistics.median(ts)
        achieved = flops[row['shape']] / median / 1e9
        line = (f'| {label} | {median:.3f} | {min(ts):.3f} - {max(ts):.3f} | {median / base:.2f} | '
                f'{achieved:.0f} | {100 * achieved / ceilings[row["dtype"]]:.0f}% |')
        if args.memory:
            line += f' {row["memory"]:.0f} |' if 'memory' in row else ' - |'
        lines.append(line)
    if args.op_times:
        lines += ['', op_times_table(rows, args.repeat, device=args.device)]
    return '\n'.join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='b2', choices=ARCHS)
    parser.add_argument('--shape', type=int, nargs=4, action='append', metavar=('B', 'C', 'H', 'W'),
                        help='input shape (default 1 3 800 1344); repeat to time several side by side')
    parser.add_argument('--dtype', choices=list(DTYPES), nargs='+', default=['fp32'],
                        help='autocast dtypes; several are timed side by side (ratios to the first)')
    parser.add_argument('--impls', nargs='+', choices=list(BUILDERS), default=list(BUILDERS),
                        help='implementations to compare (mmpvt first)')
    parser.add_argument('--mode', choices=['infer', 'train'], default='infer')
    parser.add_argument('--device', choices=['cpu', 'cuda'],
                        default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--compile', action='store_true',
                        help='also time every implementation under torch.compile')
    parser.add_argument('--with-cp', action='store_true', help='activation checkpointing (mmpvt, timm)')
    parser.add_argument('--detector', action='store_true', help='whole RetinaNet-PVTv2-b2 instead')
    parser.add_argument('--memory', action='store_true', help='also measure peak memory per implementation')
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--op-times', action='store_true',
                        help='also time every operator at the dispatcher and print a table of the '
                             'largest, per implementation (ms per step)')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help='CPU: glibc keeps freed memory for reuse, as tools/train.py sets it '
                             '(for every implementation alike; not in the --memory probes)')
    parser.add_argument('--memory-probe', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device cuda: no CUDA device is available here (torch.cuda.is_available() is '
                     f'False; torch {torch.__version__}, built for CUDA {torch.version.cuda or "none"}); '
                     'run with --device cpu, or on a machine with a GPU')
    args.shape = args.shape or [[1, 3, 800, 1344]]
    if args.detector:
        args.arch = 'b2'
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return
    allocator = 'glibc default'
    if args.keep_freed_memory:
        from mmpvt.apis import keep_freed_memory
        allocator = 'freed memory kept' if keep_freed_memory() else 'glibc default (setting refused)'
    gpu = (f', {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})' if args.device == 'cuda' else '')
    print(f'machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, '
          f'torch {torch.__version__}, malloc: {allocator}{gpu}')
    print(run(args))


if __name__ == '__main__':
    quiet_third_party_warnings()  # --detector reads mmdet's config
    main()
