"""FLOP counts (mmpvt.cli.analysis.count_flops and tools/analysis/get_flops.py).

The independent reference is the papers' table: the GFLOPs of the ImageNet models at 224x224
(pvt_facts: v1 tiny 1.9, small 3.8, medium 6.7, large 9.8; v2 b0 0.6, b1 2.1, b2 4.0,
b2_li 3.9, b3 6.9, b4 10.1, b5 11.8). The fused depthwise-conv + GELU kernel must count as the
convolution it replaces: a model's FLOPs are the same with and without it.
"""
import pytest
import torch

from mmpvt import PVT, PVTv2
from mmpvt.apis import build_model
from mmpvt.cli import load_config
from mmpvt.cli.analysis import count_flops
from mmpvt.ops import dwconv_gelu

from tooling import DEMO_CONFIGS, TOOLS
from tooling import run_tool as run

# One variant per design the counter sees (v1 with position embeddings, narrow and wide v2,
# linear attention); the deeper ones repeat the same blocks and take seconds each to trace.
PUBLISHED_GFLOPS = {(PVT, 'tiny'): 1.9, (PVTv2, 'b0'): 0.6, (PVTv2, 'b1'): 2.1, (PVTv2, 'b2_li'): 3.9}


@pytest.mark.parametrize('variant', list(PUBLISHED_GFLOPS), ids=lambda v: f'{v[0].__name__}-{v[1]}')
def test_backbone_flops_match_the_published_gflops(variant):
    """The papers print one decimal: the count must round to it (within 0.05 GFLOPs). Their
    models add a classifier (at most 512 x 1000 multiply-adds), far below that margin.
    Measured: tiny 1.936, b0 0.572, b1 2.120, b2_li 3.909."""
    cls, arch = variant
    flops, _ = count_flops(cls(arch=arch).eval(), (torch.randn(1, 3, 224, 224),))
    assert abs(flops / 1e9 - PUBLISHED_GFLOPS[variant]) < 0.05


def test_the_fused_kernel_counts_as_the_convolution_it_replaces():
    """Kernel on and off, at an awkward size: the same total, to the multiply-add."""
    assert dwconv_gelu.available()
    model = PVTv2(arch='b0').eval()
    x = torch.randn(1, 3, 97, 131)
    fused, fused_skipped = count_flops(model, (x,))
    with dwconv_gelu.enabled(False):
        layers, layers_skipped = count_flops(model, (x,))
    assert 'aten::gelu' in layers_skipped and 'aten::gelu' not in fused_skipped  # the kernel ran
    assert 'mmpvt::dwconv_gelu' not in fused_skipped
    assert fused == layers


@pytest.mark.slow
def test_get_flops_reports_the_model_and_its_backbone(tmp_path):
    """The tool's rows at 224x224: parameters of the built model; the backbone's FLOPs as
    counted on the layer path with the kernel off, and rounding to the paper's 0.6 GFLOPs of
    PVTv2-b0; nothing of mmpvt's kernel left uncounted."""
    out = run([TOOLS / 'analysis' / 'get_flops.py', DEMO_CONFIGS['retinanet'], '--shape', 224, 224],
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in out.stdout.splitlines() if line.startswith(('| model', '| backbone'))}
    assert rows['backbone'][0] == 'PVTv2' and rows['model'][0] == 'RetinaNet'
    model = build_model(load_config(DEMO_CONFIGS['retinanet']))
    assert int(rows['model'][4]) == sum(p.numel() for p in model.parameters())
    assert int(rows['backbone'][4]) == sum(p.numel() for p in model.backbone.parameters())
    assert 'input: 1x3x224x224 (padded from 224x224)' in out.stdout
    with dwconv_gelu.enabled(False):
        backbone_flops, _ = count_flops(model.backbone, (torch.randn(1, 3, 224, 224),))
    assert int(rows['backbone'][2]) == backbone_flops
    assert float(rows['backbone'][1]) == round(backbone_flops / 1e9, 2)
    assert abs(float(rows['backbone'][1]) - PUBLISHED_GFLOPS[PVTv2, 'b0']) < 0.05
    assert backbone_flops < int(rows['model'][2])
    assert 'dwconv_gelu' not in out.stdout
