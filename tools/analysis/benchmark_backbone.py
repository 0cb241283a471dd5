"""Compares mmpvt's backbones with their peers (mmdet's built-in PVTs, timm's), in one run.

    python tools/analysis/benchmark_backbone.py --arch b2 --shape 1 3 800 1344 --dtype bf16
    python tools/analysis/benchmark_backbone.py --arch vitdet_base --shape 1 3 1024 1024 --dtype fp32 bf16
    python tools/analysis/benchmark_backbone.py --arch t2t_14 --shape 1 3 224 224
    python tools/analysis/benchmark_backbone.py --arch mvit_tiny --shape 1 3 800 1344 --dtype fp32 bf16
    python tools/analysis/benchmark_backbone.py --arch mvitv1_b16 --shape 1 3 224 224 --repeat 20
    python tools/analysis/benchmark_backbone.py --arch b2 --shape 2 3 512 512 --mode train --memory
    python tools/analysis/benchmark_backbone.py --arch b2 --shape 1 3 800 1333 --detector
    python tools/analysis/benchmark_backbone.py --arch b2 --shape 1 3 800 1344 --impls mmpvt \
        --backend onnxruntime
    python tools/analysis/benchmark_backbone.py --arch b2 --shape 2 3 512 512 --mode train \
        --keep-freed-memory --op-times

The implementations run interleaved (A B C A B C ...) after warm-up, so that drift of a
shared machine hits all of them alike; the table reports each one's median and spread,
its time relative to mmpvt, its achieved GFLOP/s next to the machine's GEMM throughput
for the same dtype (measured in the same run), and, with ``--memory``, the peak memory of
one step measured in a fresh process per implementation. Weights are random: speed does
not depend on them. ``vitdet_<variant>`` archs time ViTDet's column (the stride-16 map: the
pyramid's deconvolutions are not built) against timm's ``VisionTransformerSAM`` with the same
settings (``samvit_base_patch16`` for base) and its neck left out. ``t2t_<variant>`` archs
time T2T-ViT's column (the stride-16 map, the position table made for 224 and resized to the
input's grid) against ``official``: the authors' modules written plainly in
``peers/t2t_official.py`` (explicit attention matrices; the transformer-token variants' first
token layer forms an (H/4 * W/4)^2 one, 18 GB in fp32 at 800x1344). ``mvit_<variant>`` archs
time MViTv2's four maps against ``detectron2-style``, detectron2's windowed blocks written
plainly in ``peers/mvit_detectron2.py`` (explicit attention matrices, the same block plan),
and, with ``--mvit-layout classification`` (windows off, no doubled kv stride in the global
blocks: the classification model's arithmetic, which all rows then compute), against timm's
``MultiScaleVit`` as ``features_only`` (``mvitv2_tiny``'s settings for tiny). ``mvitv1_<variant>``
archs time MViT v1's four maps against ``torchvision``: torchvision's generic ``MViT``
configured as the 2-D v1 model (its trunk up to the final norm), built for the input's size. timm's model
is built for one input size (its relative-position tables are sized from it and never
resized), so its row is built with ``img_size`` equal to the input's and only for what it can
run: one square size, a multiple of 32, in the classification layout; otherwise, and for
several input sizes in one run, it is left out. ``--backend onnxruntime`` adds a
row: mmpvt's model exported to ONNX at the input's shape (``mmpvt.deploy``) and run by
onnxruntime's CPU provider with the same thread count (fp32 inference). ``--detector`` times a
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
import types
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import mmpvt  # noqa: F401  (registers the backbones)
from mmpvt.cli.quiet import quiet_third_party_warnings
from mmpvt.registry import MODELS

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
V1_NAMES = {'tiny': 't', 'small': 's', 'medium': 'm', 'large': 'l'}
# The variants, from the registered families' tables.
PVT_VARIANTS, PVTV2_VARIANTS = list(MODELS.get('PVT').arch_zoo), list(MODELS.get('PVTv2').arch_zoo)
VITDET = 'vitdet_'  # --arch vitdet_base: ViTDet's variants, prefixed
ARCHS = [*PVT_VARIANTS, *PVTV2_VARIANTS, *(VITDET + name for name in MODELS.get('ViTDet').arch_zoo)]
T2T = 't2t_'  # --arch t2t_14: T2T-ViT's variants, prefixed
ARCHS += [T2T + name for name in MODELS.get('T2TViT').arch_zoo]
T2T_IMG_SIZE = 224  # both T2T rows' position tables: the pre-training grid, resized to the input's
MVIT = 'mvit_'  # --arch mvit_tiny: MViTv2's variants, prefixed
ARCHS += [MVIT + name for name in MODELS.get('MViTv2').arch_zoo]
MVIT_V1 = 'mvitv1_'  # --arch mvitv1_b16: MViT v1's variants, prefixed
ARCHS += [MVIT_V1 + name for name in MODELS.get('MViTv1').arch_zoo]
MVIT_LAYOUTS = ('detection', 'classification')
# The rows that run MViTv2: their builders also take the layout and the input sizes.
MVIT_ROWS = ('mmpvt', 'timm', 'detectron2-style')


class FirstOutput(torch.nn.Module):
    """A model returning one map, as a one-tuple: every step sums a tuple of outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.forward_features(x),)


# -- the implementations -----------------------------------------------------------------------
def mvit_layout(classification: bool) -> dict[str, Any]:
    """MViTv2's (and the detectron2-style peer's) settings for a layout: detectron2's windows
    and doubled kv strides by default; none of either in the classification model."""
    return dict(window_size=0, global_kv_stride_x2=False) if classification else {}


def variant_settings(family: str, variant: str) -> dict[str, Any]:
    """The resolved arch of a registered family's variant (the family's defaults filled in),
    from a model on the meta device: no memory, no initialisation."""
    with torch.device('meta'):
        return MODELS.get(family)(arch=variant).arch_settings


def mvit_settings(variant: str) -> dict[str, Any]:
    return variant_settings('MViTv2', variant)


def build_mmpvt(arch: str, with_cp: bool, *, classification: bool = False,
                sizes: tuple[tuple[int, int], ...] = ()) -> torch.nn.Module:
    """mmpvt's backbone; for MViTv2 in ``classification`` layout or not (``sizes``, the
    input sizes, only matter to timm's MViTv2)."""
    from mmpvt.models import PVT, MViTv1, MViTv2, PVTv2, ViTDet
    if arch.startswith(MVIT_V1):  # the four maps, class token dropped
        return MViTv1(arch=arch[len(MVIT_V1):], drop_path_rate=0., with_cp=with_cp)
    if arch.startswith(MVIT):  # all four maps, as the detectron2-style peer returns them
        return MViTv2(arch=arch[len(MVIT):], drop_path_rate=0., with_cp=with_cp,
                      **mvit_layout(classification))
    if arch.startswith(VITDET):  # the column only: the map timm's SAM encoder also ends with
        return ViTDet(arch=arch[len(VITDET):], out_indices=(2,), drop_path_rate=0., with_cp=with_cp)
    if arch.startswith(T2T):  # the column only: level 2 is the stride-16 map itself, no layers built
        from mmpvt.models import T2TViT
        return T2TViT(arch=arch[len(T2T):], out_indices=(2,), img_size=T2T_IMG_SIZE, drop_path_rate=0.,
                      with_cp=with_cp)
    cls = PVT if arch in PVT_VARIANTS else PVTv2
    return cls(arch=arch, drop_path_rate=0., with_cp=with_cp)


def build_mmdet(arch: str, with_cp: bool) -> torch.nn.Module | None:
    if arch.startswith(T2T):
        return None  # mmdet has no T2T-ViT
    if arch.startswith((MVIT, MVIT_V1)):
        return None  # mmdet has no MViT
    if arch.startswith(VITDET):
        return None  # mmdet's ViTDet is a project, not part of the package
    from mmdet.models.backbones.pvt import PyramidVisionTransformer, PyramidVisionTransformerV2
    settings = variant_settings('PVT' if arch in PVT_VARIANTS else 'PVTv2', arch)
    if settings.get('linear') or with_cp:
        return None  # mmdet has neither linear attention nor activation checkpointing
    cls = PyramidVisionTransformer if arch in PVT_VARIANTS else PyramidVisionTransformerV2
    model = cls(embed_dims=settings['embed_dims'][0], num_layers=list(settings['depths']),
                mlp_ratios=list(settings['mlp_ratios']), drop_path_rate=0.)
    model.init_weights()
    return model


def build_timm(arch: str, with_cp: bool, *, classification: bool = False,
               sizes: tuple[tuple[int, int], ...] = ()) -> torch.nn.Module | None:
    """timm's model of the arch, where timm has one that computes the same function.

    MViTv2: only in the ``classification`` layout (timm has no windows) and for one square
    input size in ``sizes`` that is a multiple of 32: timm sizes its relative-position
    tables from ``img_size`` and never resizes them, and its stage grids assume that every
    stride divides the input.
    """
    if arch.startswith((T2T, MVIT_V1)):
        return None  # timm has no T2T-ViT, and its MultiScaleVit pools q in every block (not v1)
    if arch.startswith(MVIT):
        if not classification or len(set(sizes)) != 1:
            return None
        (h, w), = set(sizes)
        if h != w or h % 32:
            return None
        from timm.models._features import FeatureGetterNet
        from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
        settings = mvit_settings(arch[len(MVIT):])
        cfg = MultiScaleVitCfg(depths=settings['depths'], embed_dim=settings['embed_dims'],
                               num_heads=settings['num_heads'], mlp_ratio=settings['mlp_ratio'],
                               expand_attn=settings['dim_mul_in_attention'])
        model = MultiScaleVit(cfg, img_size=(h, w), num_classes=0)
        model.set_grad_checkpointing(with_cp)
        # timm's features_only for MViTv2: the four stage maps; the final norm and head pruned
        return FeatureGetterNet(model, out_indices=4)
    if arch in PVT_VARIANTS:
        return None  # timm has no PVT v1
    if arch.startswith(VITDET):
        from timm.models.vision_transformer_sam import VisionTransformerSAM
        settings = variant_settings('ViTDet', arch[len(VITDET):])
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


def load_peer(name: str) -> types.ModuleType:
    """The module ``peers/<name>.py`` beside this script: a peer implementation no installed
    package provides. Loaded by path, so that it works however the harness itself was loaded."""
    import importlib.util
    path = Path(__file__).resolve().parent / 'peers' / f'{name}.py'
    if f'peers.{name}' not in sys.modules:
        spec = importlib.util.spec_from_file_location(f'peers.{name}', path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[f'peers.{name}']


def build_official(arch: str, with_cp: bool) -> torch.nn.Module | None:
    """The authors' modules, where mmpvt has a family without a peer in an installed package.

    T2T-ViT: ``peers/t2t_official.py`` with the variant's settings and the same position
    table size as mmpvt's row (mmpretrain's ``T2T_ViT`` would be a second peer for the
    transformer-token variants; it is not a dependency of mmpvt).
    """
    if not arch.startswith(T2T) or with_cp:
        return None  # the authors' code has no activation checkpointing
    settings = variant_settings('T2TViT', arch[len(T2T):])
    return load_peer('t2t_official').T2TViTOfficial(
        img_size=T2T_IMG_SIZE, tokens_type=settings['tokens_type'], embed_dim=settings['embed_dims'],
        depth=settings['depth'], num_heads=settings['num_heads'], mlp_ratio=settings['mlp_ratio'],
        token_dim=settings['token_dims'])


def build_detectron2_style(arch: str, with_cp: bool, *, classification: bool = False,
                           sizes: tuple[tuple[int, int], ...] = ()) -> torch.nn.Module | None:
    """MViTv2's blocks as detectron2 writes them (``peers/mvit_detectron2.py``), in the same
    layout as mmpvt's row; none for the MLP-widening large_in1k, which detectron2 lacks."""
    if not arch.startswith(MVIT) or not mvit_settings(arch[len(MVIT):])['dim_mul_in_attention']:
        return None
    peer = load_peer('mvit_detectron2')
    return peer.MViTDetectron2Style(arch[len(MVIT):], with_cp=with_cp, **mvit_layout(classification))


class TorchvisionMViTTrunk(torch.nn.Module):
    """torchvision's generic video ``MViT`` configured as the 2-D MViT v1 image model of an
    mmpvt arch (one frame; q pooled in the q-stride blocks only; no residual pooling, no
    relative positions; the width growing in the MLP), run up to its final norm: the trunk
    that PySlowFast's own model computes, bit for bit (tests/test_mvit_v1.py checks the
    equality with mmpvt's). Built for one input size: its position table is never resized.
    Returns the last token sequence (the class token and the stride-32 grid)."""

    def __init__(self, variant: str, hw: tuple[int, int]) -> None:
        super().__init__()
        from torchvision.models.video.mvit import MSBlockConfig, MViT
        with torch.device('meta'):
            specs = MODELS.get('MViTv1')(arch=variant).block_specs
        blocks = [MSBlockConfig(num_heads=s.num_heads, input_channels=s.dims, output_channels=s.out_dims,
                                kernel_q=[1, 3, 3] if s.q_stride > 1 else [1, 1, 1], kernel_kv=[1, 3, 3],
                                stride_q=[1, s.q_stride, s.q_stride], stride_kv=[1, s.kv_stride, s.kv_stride])
                  for s in specs]
        self.model = MViT(spatial_size=hw, temporal_size=1, block_setting=blocks, residual_pool=False,
                          residual_with_cls_embed=False, rel_pos_embed=False, proj_after_attn=False,
                          dropout=0.0, num_classes=1, patch_embed_kernel=(1, 7, 7),
                          patch_embed_stride=(1, 4, 4), patch_embed_padding=(0, 3, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        m = self.model
        x = m.conv_proj(x[:, :, None]).flatten(2).transpose(1, 2)
        x = m.pos_encoding(x)
        thw = (1, *m.pos_encoding.spatial_size)
        for block in m.blocks:
            x, thw = block(x, thw)
        return (m.norm(x),)


def build_torchvision(arch: str, with_cp: bool, *,
                      sizes: tuple[tuple[int, int], ...] = ()) -> torch.nn.Module | None:
    """MViT v1's peer (:class:`TorchvisionMViTTrunk`), for one input size whose sides are
    multiples of 4 (torchvision sizes its table as ``H // 4``); no activation checkpointing."""
    if not arch.startswith(MVIT_V1) or with_cp or len(set(sizes)) != 1:
        return None
    (h, w), = set(sizes)
    if h % 4 or w % 4:
        return None
    return TorchvisionMViTTrunk(arch[len(MVIT_V1):], (h, w))


class OnnxRuntimeBackbone(torch.nn.Module):
    """An exported backbone run by onnxruntime (``mmpvt.deploy.load_runner``), as a module."""

    def __init__(self, run: Callable[[torch.Tensor], list]) -> None:
        super().__init__()
        self.run = run

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(out) for out in self.run(x))


def build_onnxruntime(args: argparse.Namespace) -> torch.nn.Module:
    """mmpvt's model of the run exported to ONNX at the run's input shape (``mmpvt.deploy``,
    static shapes, as a deployment at one size runs) and run by onnxruntime's CPU provider
    with torch's thread count. The file is read into the session and then deleted."""
    import shutil
    import tempfile

    from mmpvt import deploy
    model = build('mmpvt', args, with_cp=False).eval()
    workdir = Path(tempfile.mkdtemp(prefix='mmpvt-onnxruntime-'))
    try:
        artefact = deploy.export(model, tuple(args.shape[0]), 'onnx', workdir / 'backbone.onnx',
                                 log=lambda line: None)
        return OnnxRuntimeBackbone(deploy.load_runner(artefact, threads=torch.get_num_threads()))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def build(name: str, args: argparse.Namespace, with_cp: bool | None = None) -> torch.nn.Module | None:
    """Implementation ``name`` for the run's arch (``with_cp`` defaults to the run's); None
    where it has no such model."""
    with_cp = args.with_cp if with_cp is None else with_cp
    if name == 'onnxruntime':
        return build_onnxruntime(args)
    if args.detector:
        return build_retinanet(name)
    if args.arch.startswith(MVIT) and name in MVIT_ROWS:
        sizes = tuple(sorted({(shape[2], shape[3]) for shape in args.shape}))
        return BUILDERS[name](args.arch, with_cp, classification=args.mvit_layout == 'classification',
                              sizes=sizes)
    if name == 'torchvision':
        return build_torchvision(args.arch, with_cp, sizes=tuple((s[2], s[3]) for s in args.shape))
    return BUILDERS[name](args.arch, with_cp)


BUILDERS: dict[str, Callable[..., torch.nn.Module | None]] = {
    'mmpvt': build_mmpvt, 'mmdet': build_mmdet, 'timm': build_timm,
    'official': build_official,  # T2T-ViT's peer
    'detectron2-style': build_detectron2_style,  # MViTv2's peer at detection sizes
    'torchvision': build_torchvision,  # MViT v1's peer
}


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


def attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args,
                    out_shape: Any = None, **kwargs) -> int:
    """FLOPs of one fused attention call from its operand shapes: q @ k^T and attn @ v."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: torch.nn.Module, x: torch.Tensor, mode: str, detector: bool) -> int:
    """FLOPs of one step: the forward's, times 3 in train mode (backward ~ 2x forward).

    The backward is not counted directly: torch's counter prices the backward of a grouped
    (depthwise) convolution as if it were dense, several times PVTv2's real cost.
    """
    step = make_step(model.eval(), x, 'infer', torch.float32, x.device.type, detector)
    # torch's counter prices the fused attention of CUDA but not the CPU's kernel, which
    # would leave every attention product of an eager CPU model out of the total.
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
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
               '--device', args.device, '--mvit-layout', args.mvit_layout] + \
              (['--with-cp'] if args.with_cp else []) + \
              (['--detector'] if args.detector else [])
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(128 * 1024)}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])['peak_mb']


def memory_probe(args: argparse.Namespace) -> None:
    impl = args.memory_probe
    model = build(impl, args)
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
    names += ['onnxruntime'] if args.backend == 'onnxruntime' else []
    shapes = [tuple(shape) for shape in args.shape]
    inputs = {shape: torch.randn(shape, device=args.device) for shape in shapes}
    # One row per implementation x eager/compiled x dtype x shape, all timed interleaved.
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        model = build(name, args)
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
    eager = build('mmpvt', args, with_cp=False)
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
    if args.arch.startswith(MVIT) and not args.detector:
        what += f' ({args.mvit_layout} layout)'
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
        lines += ['', op_times_table(rows, args.repeat, top=args.op_times, device=args.device)]
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
    parser.add_argument('--mvit-layout', choices=MVIT_LAYOUTS, default='detection',
                        help='mvit_* archs: detectron2\'s windowed blocks (default), or the classification '
                             'model\'s global attention, which timm\'s row needs')
    parser.add_argument('--detector', action='store_true', help='whole RetinaNet-PVTv2-b2 instead')
    parser.add_argument('--memory', action='store_true', help='also measure peak memory per implementation')
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--op-times', type=int, nargs='?', const=15, default=0, metavar='N',
                        help='also time every operator at the dispatcher and print a table of the N '
                             '(default 15) largest, per implementation (ms per step)')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help='CPU: glibc keeps freed memory for reuse, as tools/train.py sets it '
                             '(for every implementation alike; not in the --memory probes)')
    parser.add_argument('--backend', choices=['onnxruntime'],
                        help='add a row: mmpvt\'s model exported to ONNX and run by onnxruntime (CPU, '
                             'fp32 inference at one input shape)')
    parser.add_argument('--memory-probe', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    one_shape = len(args.shape or [None]) == 1
    if args.backend and (args.device != 'cpu' or args.mode != 'infer' or args.dtype != ['fp32']
                         or args.detector or args.compile or not one_shape):
        parser.error('--backend onnxruntime times fp32 inference of the backbone on the CPU at one --shape '
                     '(no --mode train, --dtype bf16, --detector or --compile)')
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
        from mmpvt.cli import keep_freed_memory
        allocator = 'freed memory kept' if keep_freed_memory() else 'glibc default (setting refused)'
    gpu = (f', {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})' if args.device == 'cuda' else '')
    print(f'machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, '
          f'torch {torch.__version__}, malloc: {allocator}{gpu}')
    print(run(args))


if __name__ == '__main__':
    quiet_third_party_warnings()  # --detector reads mmdet's config
    main()
