"""Deployment: every backbone exports to ONNX (run with onnxruntime) and to torch.export's
ExportedProgram with a symbolic height and width, and the export equals the eager model at
the traced size and at two others, one non-square and one not a multiple of 32; the
TorchScript-based ONNX exporter is refused. The families come from the contract suite's small
archs (every registered family, each arch class); tools/deploy/export.py runs a real variant.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from test_backbone_contract import SMALL, case_id

from mmpvt import deploy
from mmpvt.models import attention, layers

ROOT = Path(__file__).resolve().parents[1]
TRACED = (1, 3, 128, 160)


@pytest.mark.parametrize('fmt', deploy.FORMATS)
@pytest.mark.parametrize('case', SMALL, ids=case_id)
def test_dynamic_export_equals_the_model_at_three_sizes(case, fmt, tmp_path):
    cls, arch = case
    torch.manual_seed(0)
    model = cls(arch=arch).eval()
    artefact = deploy.export(model, TRACED, fmt, tmp_path / f'model.{fmt}', dynamic=True,
                             log=lambda line: None)
    shapes = deploy.check_sizes(TRACED, dynamic=True)
    assert shapes[1][2] != shapes[1][3] and (shapes[2][2] % 32 or shapes[2][3] % 32)
    results = deploy.parity(model, deploy.load_runner(artefact), shapes)
    assert [shape for shape, _ in results] == shapes
    for shape, errors in results:
        assert max(errors) <= deploy.PARITY_TOLERANCE, (shape, errors)


FIRST_OF_EACH_FAMILY = list({cls: (cls, arch) for cls, arch in reversed(SMALL)}.values())


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch's, about the exporter refused here
@pytest.mark.parametrize('case', FIRST_OF_EACH_FAMILY, ids=case_id)
def test_torchscript_onnx_exporter_is_refused(case, tmp_path):
    """Its traces keep the Python size arithmetic as constants: refused, pointing to the
    default exporter, rather than exported wrong (MViTv2's windows were off by up to 50%)."""
    cls, arch = case
    with pytest.raises(RuntimeError, match=r'dynamo=True'):
        torch.onnx.export(cls(arch=arch).eval(), (torch.randn(TRACED),), str(tmp_path / 'm.onnx'),
                          dynamo=False)


def test_static_export_checks_the_traced_size_only(tmp_path):
    cls, arch = SMALL[0]
    model = cls(arch=arch).eval()
    artefact = deploy.export(model, TRACED, 'pt2', tmp_path / 'm.pt2', log=lambda line: None)
    assert not artefact.dynamic and deploy.check_sizes(TRACED, dynamic=False) == [TRACED]
    assert 'static shapes' in artefact.describe()


def test_a_dynamic_export_outside_the_range_and_a_missing_package_are_named(tmp_path):
    cls, arch = SMALL[0]
    with pytest.raises(deploy.ExportError, match=r'sides in \[64, 4096\]'):
        deploy.export(cls(arch=arch), (1, 3, 48, 160), 'pt2', tmp_path / 'm.pt2', dynamic=True)
    with mock.patch('importlib.util.find_spec', return_value=None):
        missing = r'needs onnx, onnxruntime, onnxscript: pip install "mmpvt\[deploy\]"'
        with pytest.raises(deploy.ExportError, match=missing):
            deploy.export(cls(arch=arch), TRACED, 'onnx', tmp_path / 'm.onnx')


# -- the export paths, against the eager operations -------------------------------------------
@pytest.mark.parametrize('hw', [(56, 56), (40, 64), (50, 74), (7, 7), (9, 13), (100, 3)])
def test_exported_adaptive_pooling_equals_pytorchs(hw):
    """PVTv2-Li's pooling to 7x7, written as averaging matrices for export: PyTorch's bins."""
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    with mock.patch.object(layers, 'exporting', return_value=True):
        pooled = layers.adaptive_avg_pool2d(x, 7)
    assert torch.allclose(pooled, F.adaptive_avg_pool2d(x, 7), rtol=0, atol=1e-12)


def test_exported_rel_pos_lookup_equals_the_eager_one():
    """The same rows for every pair of query and key lengths up to 64 (MViTv2's pooled keys
    stretch the shorter axis by the length ratio, then truncate)."""
    table = torch.randn(27, 4)
    for q in range(1, 65):
        for k in range(1, 65):
            eager = attention.rel_pos_lookup(q, k, table)
            with mock.patch.object(attention, 'exporting', return_value=True):
                exported = attention.rel_pos_lookup(q, k, table)
            assert torch.equal(eager, exported), (q, k)


# -- the tool ---------------------------------------------------------------------------------
def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, 'tools/deploy/export.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize('fmt', deploy.FORMATS)
def test_tool_exports_a_zoo_backbone_and_proves_it_equal(fmt, tmp_path):
    """PVTv2-b0 from the RetinaNet config (its backbone as the config builds it: levels 1-3)."""
    out = tmp_path / f'b0.{fmt}'
    result = run_tool('configs/retinanet_pvt_v2_b0.py', '--format', fmt, '--shape', '160', '224', '--dynamic',
                      '--backbone-only', '--out', str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert out.exists() and any(line.startswith(str(out)) and 'height and width dynamic in [64, 4096]' in line
                                and 'stride32 [1, 256, 5, 7]' in line for line in lines), lines
    parity = [line for line in lines if line.startswith('parity at ')]
    assert [line.split(':')[0] for line in parity] == ['parity at 1x3x160x224', 'parity at 1x3x160x288',
                                                      'parity at 1x3x173x217']
    assert lines[-1] == 'equal to the PyTorch model within 1e-04 of every map\'s scale'


def test_tool_refuses_proposals_without_an_rpn_in_one_line(tmp_path):
    """Sparse R-CNN's proposals are learned embeddings: no dense stage before an NMS to export."""
    result = run_tool('configs/sparse_rcnn_pvt_v2_b2_3x.py', '--format', 'onnx', '--shape', '128', '128',
                      '--out', str(tmp_path / 'm.onnx'))
    assert result.returncode == 1 and not (tmp_path / 'm.onnx').exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "error: SparseRCNN's proposals come from its EmbeddingRPNHead, not from a region proposal network's "
        "dense outputs: only the stage before an RPN's NMS exports; export its backbone with --backbone-only")


@pytest.mark.parametrize('config, fmt, outputs', [
    # class scores, then box deltas, at strides 8-128; RetinaNet's dynamic range starts at 129
    ('retinanet_pvt_v2_b0.py', 'onnx', ['scores_stride8 [1, 720, 32, 40]', 'deltas_stride128 [1, 36, 2, 3]',
                                        '[129, 4096]']),
    # up to the first NMS: the RPN's scores and deltas, then the neck's maps, at strides 4-64
    ('mask_rcnn_pvt_v2_b0.py', 'pt2', ['rpn_scores_stride4 [1, 3, 64, 80]',
                                       'rpn_deltas_stride64 [1, 12, 4, 5]', 'neck_stride4 [1, 256, 64, 80]',
                                       'neck_stride64 [1, 256, 4, 5]', '[65, 4096]']),
    # the logits at 1/4 of the input, through mmseg's Upsample x2 in the FPN head
    ('fpn_pvt_v2_b0_ade20k.py', 'pt2', ['logits [1, 150, 64, 80]', '[64, 4096]']),
])
def test_tool_exports_a_detectors_and_a_segmentors_tensor_mode(config, fmt, outputs, tmp_path):
    """Backbone, neck and head outputs before post-processing, equal to PyTorch's at 256x320,
    256x384 and 269x313 (mmseg's Upsample took the traced size's factor: 4.7e-2 off at 256x384
    before its size was computed in integers)."""
    out = tmp_path / f'model.{fmt}'
    result = run_tool(f'configs/{config}', '--format', fmt, '--shape', '256', '320', '--dynamic',
                      '--out', str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    described = next(line for line in result.stdout.splitlines() if line.startswith(str(out)))
    assert all(part in described for part in outputs), described
    assert result.stdout.splitlines()[-1] == 'equal to the PyTorch model within 1e-04 of every map\'s scale'


