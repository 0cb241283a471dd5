"""Exporting mmpvt's backbones, with proof that the exported graph computes what PyTorch does.

Two formats: ONNX through torch's default (dynamo-based) exporter, run with onnxruntime, and
torch.export's ExportedProgram (``.pt2``). With ``dynamic`` the image's height and width are
symbolic from ``MIN_SIDE`` to ``MAX_SIDE``: the models take their size-independent path when
exported (``mmpvt.models.layers.exporting``), so one graph serves every size. Each artefact is
checked against the eager model at the export size and, when dynamic, at two other sizes (one
non-square, one not a multiple of 32): :func:`parity`.

The TorchScript-based ONNX exporter (``dynamo=False``) is refused by every backbone: it traces
Python size arithmetic as constants.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMATS = ('onnx', 'pt2')
# Symbolic sides span this range. Below 64 pixels the stride-32 level would be one token, a
# size that torch.export treats as a special case; a model with coarser outputs (RetinaNet's
# stride 128) starts where its coarsest output has two (:func:`min_side`).
MIN_SIDE, MAX_SIDE = 64, 4096
ONNX_OPSET = 18
# An exported map may differ from the eager one by this fraction of the map's largest value.
PARITY_TOLERANCE = 1e-4
DEPLOY_PACKAGES = ('onnx', 'onnxruntime', 'onnxscript')


class ExportError(RuntimeError):
    """An export that could not be made or does not compute what the model computes."""


@dataclass
class Artefact:
    """What an export wrote: its file, its input and output names and shapes, and which axes
    are symbolic."""
    path: Path
    format: str
    input_shape: tuple[int, ...]
    output_shapes: list[tuple[int, ...]]
    dynamic: bool
    output_names: list[str] = field(default_factory=list)
    min_side: int = MIN_SIDE

    @property
    def files(self) -> list[Path]:
        """The written files: the artefact, and the weights the ONNX exporter keeps beside the
        graph (``<file>.data``; ONNX's protobuf holds at most 2 GB)."""
        data = self.path.with_name(self.path.name + '.data')
        return [self.path, data] if data.exists() else [self.path]

    def describe(self) -> str:
        """One line: path, size, input, outputs, dynamic axes."""
        size = sum(f.stat().st_size for f in self.files) / 2**20
        where = ' + '.join(str(f) for f in self.files)
        axes = (f'height and width dynamic in [{self.min_side}, {MAX_SIDE}]' if self.dynamic
                else 'static shapes')
        outputs = ', '.join(f'{name} {list(shape)}'
                            for name, shape in zip(self.output_names, self.output_shapes))
        return (f'{where}: {self.format}, {size:.1f} MB; input image {list(self.input_shape)} float32; '
                f'outputs {outputs}; {axes}')


def missing_packages(fmt: str) -> list[str]:
    """The packages an ONNX export and its check need that are not installed (none for pt2)."""
    if fmt != 'onnx':
        return []
    import importlib.util
    return [name for name in DEPLOY_PACKAGES if importlib.util.find_spec(name) is None]


@contextlib.contextmanager
def _size_oblivious():
    """Symbolic sizes reasoned about without a special case for 0 and 1: otherwise a size that
    is 1 at the traced input (one attention window, say) ties the export to it."""
    try:
        from torch.fx.experimental import _config
    except ImportError:  # pragma: no cover - torch without the switch
        yield
        return
    with _config.patch(backed_size_oblivious=True):
        yield


def min_side(input_shape: Sequence[int], output_shapes: Sequence[Sequence[int]]) -> int:
    """The smallest side a dynamic export admits: ``MIN_SIDE``, or more where the coarsest
    map output has a stride ``s`` (input side / output side) that needs ``s + 1`` pixels for
    two positions."""
    strides = [input_shape[2] / shape[2] for shape in output_shapes if len(shape) == 4 and shape[2]]
    return max(MIN_SIDE, int(np.ceil(max(strides, default=1))) + 1)


def _dynamic_shapes(dynamic: bool, smallest: int) -> tuple | None:
    if not dynamic:
        return None
    height = torch.export.Dim('height', min=smallest, max=MAX_SIDE)
    width = torch.export.Dim('width', min=smallest, max=MAX_SIDE)
    return ({2: height, 3: width},)


def _flat(outputs) -> list[torch.Tensor]:
    """The tensors of a nest of tuples and lists, depth first."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in _flat(item)]


def is_two_stage(model: nn.Module) -> bool:
    """Whether ``model`` is an mmdet detector with a region proposal stage and a RoI head."""
    return hasattr(model, 'rpn_head') and hasattr(model, 'roi_head')


def dense_head(model: nn.Module) -> nn.Module | None:
    """The head whose per-level outputs a detector's tensor mode exports: a two-stage
    detector's RPN, a single-stage one's box head; None for a segmentor."""
    return model.rpn_head if is_two_stage(model) else getattr(model, 'bbox_head', None)


def _integral_upsample(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from mmseg.models.utils import resize
    factor = int(module.scale_factor)
    return resize(x, (x.shape[-2] * factor, x.shape[-1] * factor), None, module.mode, module.align_corners)


class TensorMode(nn.Module):
    """A detector's or segmentor's tensor mode (mmdet's and mmseg's ``_forward``: the
    backbone, neck and head outputs before any post-processing) with a flat tuple of outputs,
    depth first (a RetinaNet gives its class scores per level, then its box deltas per level;
    a segmentor its logits at 1/4 of the input).

    mmseg's ``Upsample`` with an integral factor computes its size in integers here: as
    ``int(side * factor)`` a symbolic size becomes a Python float and ties the export to the
    traced size (it exported Semantic FPN 4.7e-2 off at other sizes); the same sizes, the
    same values.

    A two-stage detector (Mask R-CNN, Cascade Mask R-CNN) is exported up to its first NMS: the
    RPN's class scores per level, its box deltas per level, then the neck's maps. mmdet's own
    tensor mode goes on into the RoI head, which needs the proposals that RPN's NMS selects and
    mmcv's RoIAlign; both stay in PyTorch (:func:`predict_with_export`), where they run on the
    exported maps with the checkpoint's RoI-head weights.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if is_two_stage(model) and not hasattr(model.rpn_head, 'prior_generator'):
            proposer = type(model.rpn_head).__name__
            raise ExportError(f'{type(model).__name__}\'s proposals come from its {proposer}, not from a '
                              'region proposal network\'s dense outputs: only the stage before an RPN\'s NMS '
                              'exports; export its backbone with --backbone-only')
        if not hasattr(model, '_forward'):
            raise ExportError(f'{type(model).__name__} has no tensor mode (_forward): not an mmdet or mmseg '
                              'model')
        self.model = model
        self.two_stage = is_two_stage(model)
        try:
            from mmseg.models.utils import Upsample
        except ImportError:  # pragma: no cover - mmseg is part of the stack
            return
        for module in model.modules():
            factor = getattr(module, 'scale_factor', None)
            integral = isinstance(factor, float) and factor.is_integer()
            if isinstance(module, Upsample) and not module.size and integral:
                module.forward = functools.partial(_integral_upsample, module)

    def output_names(self, count: int) -> list[str]:
        """Names of the ``count`` outputs: a detector's by group and stride (``scores_stride8``,
        ``deltas_stride8``; ``rpn_scores_stride4``, ``rpn_deltas_stride4``, ``neck_stride4``),
        a segmentor's ``logits``; by position where the head is not one of these."""
        head = dense_head(self.model)
        strides = [int(s[0]) for s in getattr(getattr(head, 'prior_generator', None), 'strides', ())]
        if strides and count % len(strides) == 0:
            groups = ['rpn_scores', 'rpn_deltas', 'neck'] if self.two_stage else ['scores', 'deltas']
            groups += [f'output{g}' for g in range(len(groups), count // len(strides))]
            return [f'{group}_stride{s}' for group in groups[:count // len(strides)] for s in strides]
        if count == 1 and hasattr(self.model, 'decode_head'):
            return ['logits']
        return [f'output{i}' for i in range(count)]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.two_stage:
            features = self.model.extract_feat(image)
            scores, deltas = self.model.rpn_head(features)
            return (*scores, *deltas, *features)
        return tuple(_flat(self.model._forward(image)))


def export(model: nn.Module, shape: Sequence[int], fmt: str, out: str | os.PathLike,
           dynamic: bool = False, log: Callable[[str], None] = print) -> Artefact:
    """Exports ``model`` (a backbone returning a tuple of maps) traced at ``shape``
    ``(B, C, H, W)`` to ``out`` as ``fmt`` ('onnx' or 'pt2'); returns what was written.

    Raises ExportError with the exporter's first line when the export fails, and for a side
    outside ``[MIN_SIDE, MAX_SIDE]`` when ``dynamic``.
    """
    if fmt not in FORMATS:
        raise ExportError(f'format must be one of {FORMATS}, got {fmt!r}')
    if missing := missing_packages(fmt):
        raise ExportError(f'exporting to ONNX needs {", ".join(missing)}: pip install "mmpvt[deploy]" '
                          '(or make setup, which installs requirements-deploy.txt)')
    shape = tuple(int(s) for s in shape)
    model = model.eval()
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output_shapes = [tuple(o.shape) for o in model(example)]
    smallest = min_side(shape, output_shapes)
    if dynamic and not all(smallest <= side <= MAX_SIDE for side in shape[2:]):
        raise ExportError(f'a dynamic export of {type(model).__name__} is traced at sides in [{smallest}, '
                          f'{MAX_SIDE}]; got {shape[2:]}')
    strides = getattr(model, 'out_strides', None)  # a DenseBackbone's
    names = (model.output_names(len(output_shapes)) if isinstance(model, TensorMode)
             else [f'stride{s}' for s in strides] if strides and len(strides) == len(output_shapes)
             else [f'output{i}' for i in range(len(output_shapes))])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f'exporting {type(model).__name__} to {fmt}, traced at {list(shape)}'
        + (' with dynamic height and width' if dynamic else ''))
    chatter = io.StringIO()  # the exporters' own step lines and notices, not the tool's output
    try:
        with torch.no_grad(), _size_oblivious(), contextlib.redirect_stdout(chatter), \
                contextlib.redirect_stderr(chatter):
            if fmt == 'pt2':
                dynamic_shapes = _dynamic_shapes(dynamic, smallest)
                program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
                with warnings.catch_warnings():
                    # about weights that share storage (views of one tensor): saved whole
                    warnings.filterwarnings('ignore', 'No complete tensor found in the group')
                    torch.export.save(program, out)
            else:
                torch.onnx.export(model, (example,), out, dynamo=True, opset_version=ONNX_OPSET,
                                  input_names=['image'], output_names=names,
                                  dynamic_shapes=_dynamic_shapes(dynamic, smallest), verbose=False)
    except Exception as error:  # the exporters raise many types; the first line says what failed
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f'{fmt} export of {type(model).__name__} failed: {type(error).__name__}: {first}'
                          ) from error
    return Artefact(out, fmt, shape, output_shapes, dynamic, names, smallest)


def load_runner(artefact: Artefact, threads: int | None = None) -> Callable[[torch.Tensor], list[np.ndarray]]:
    """A function running the exported file on an image batch: onnxruntime on the CPU for
    ONNX (``threads`` intra-op threads, torch's count by default), the loaded program for pt2."""
    if artefact.format == 'pt2':
        module = torch.export.load(artefact.path).module()

        def run_program(x: torch.Tensor) -> list[np.ndarray]:
            with torch.no_grad():
                return [o.numpy() for o in module(x)]
        return run_program
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(artefact.path), options, providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x.numpy()})


def check_sizes(shape: Sequence[int], dynamic: bool, smallest: int = MIN_SIDE) -> list[tuple[int, ...]]:
    """The input shapes an export is checked at: its own and, when dynamic, one non-square and
    one with a side that is not a multiple of 32 (both within ``[smallest, MAX_SIDE]``)."""
    b, c, h, w = (int(s) for s in shape)
    if not dynamic:
        return [(b, c, h, w)]
    wide = (h, w + 64 if w + 64 <= MAX_SIDE else w - 64)
    if wide[0] == wide[1]:
        wide = (wide[0], wide[1] + 32 if wide[1] + 32 <= MAX_SIDE else wide[1] - 32)
    odd = (h + 13 if h + 13 <= MAX_SIDE else h - 13, w - 7 if w - 7 >= smallest else w + 7)
    return [(b, c, h, w), (b, c, *wide), (b, c, *odd)]


def parity(model: nn.Module, run: Callable[[torch.Tensor], list[np.ndarray]],
           shapes: Sequence[Sequence[int]]) -> list[tuple[tuple[int, ...], list[float]]]:
    """Per input shape, each output map's largest difference from the eager model's, as a
    fraction of that map's largest magnitude (random normal images, a fixed seed)."""
    results = []
    generator = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.randn(tuple(shape), generator=generator)
        with torch.no_grad():
            expected = [o.numpy() for o in model.eval()(x)]
        got = run(x)
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            shapes = [list(g.shape) for g in got], [list(e.shape) for e in expected]
            raise ExportError(f'at {list(shape)} the exported outputs have shapes {shapes[0]}, the model\'s '
                              f'{shapes[1]}')
        errors = [float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-12)) for g, e in zip(got, expected)]
        results.append((tuple(shape), errors))
    return results


# -- running an export inside mmdet's and mmseg's prediction ----------------------------------
def runner_for_file(path: str | os.PathLike, threads: int | None = None) -> Callable[[torch.Tensor], list]:
    """:func:`load_runner` for a file on disk: ``.onnx`` (onnxruntime) or ``.pt2``."""
    path = Path(path)
    fmt = {'.onnx': 'onnx', '.pt2': 'pt2'}.get(path.suffix)
    if fmt is None:
        raise ExportError(f'{path}: an exported model is a .onnx or a .pt2 file')
    if not path.is_file():
        raise ExportError(f'{path}: no such exported model')
    if missing := missing_packages(fmt):
        raise ExportError(f'running an ONNX model needs {", ".join(missing)}: pip install "mmpvt[deploy]"')
    return load_runner(Artefact(path, fmt, (), [], False), threads)


def predict_with_export(model: nn.Module, path: str | os.PathLike) -> None:
    """Makes ``model.predict`` run its tensor mode from the exported file at ``path`` and the
    rest as mmdet or mmseg would: a single-stage detector's ``bbox_head.predict_by_feat``
    (box decoding, score threshold, NMS, rescaling); a two-stage detector's proposal
    selection (``rpn_head.predict_by_feat``) and RoI head (``roi_head.predict``: RoIAlign,
    box and mask heads, NMS, rescaling) on the exported maps; or a segmentor's
    ``predict_by_feat`` and ``postprocess_result`` (resizing, argmax). The model's own weights
    are not used for the exported part; its configuration drives the post-processing, and a
    two-stage detector's RoI head runs with its weights.
    """
    run = runner_for_file(path)
    two_stage = is_two_stage(model)
    head = dense_head(model)
    if head is not None:
        if not hasattr(head, 'prior_generator'):
            raise ExportError(f'{type(model).__name__}: only detectors with per-level dense outputs (a '
                              'single-stage head or an RPN) run from an export')
        levels = head.prior_generator.num_levels
        scores = head.cls_out_channels * head.num_base_priors  # channels of the first output
        expected = (f'scores and box deltas of {levels} levels, then the neck\'s {levels} maps' if two_stage
                    else f'groups of {levels} levels, class scores first')

        def dense_outputs(inputs: torch.Tensor) -> list[list[torch.Tensor]]:
            outputs = [torch.from_numpy(np.asarray(o)) for o in run(inputs.float().cpu())]
            groups = len(outputs) // levels
            if (len(outputs) % levels or (two_stage and groups != 3) or outputs[0].dim() != 4
                    or outputs[0].shape[1] != scores):
                raise ExportError(f'{path} is not this detector\'s tensor mode: {len(outputs)} outputs, the '
                                  f'first {list(outputs[0].shape)}; expected {expected} ({scores} score '
                                  'channels); export it without --backbone-only')
            return [outputs[i:i + levels] for i in range(0, len(outputs), levels)]

        def predict_detections(inputs: torch.Tensor, data_samples: list, rescale: bool = True) -> list:
            groups = dense_outputs(inputs)
            metas = [sample.metainfo for sample in data_samples]
            if two_stage:
                cls_scores, deltas, features = groups
                proposals = head.predict_by_feat(cls_scores, deltas, batch_img_metas=metas, rescale=False)
                results = model.roi_head.predict(tuple(features), proposals, data_samples, rescale=rescale)
            else:
                results = head.predict_by_feat(*groups, batch_img_metas=metas, rescale=rescale)
            return model.add_pred_to_datasample(data_samples, results)
        model.predict = predict_detections
        return
    if not hasattr(model, 'decode_head'):
        raise ExportError(f'{type(model).__name__}: not an mmdet detector or an mmseg segmentor')
    if model.test_cfg.get('mode', 'whole') != 'whole':
        raise ExportError(f'the exported segmentor runs whole-image inference; the config asks for '
                          f'{model.test_cfg["mode"]!r} (set model.test_cfg.mode=whole)')

    def predict_segmentation(inputs: torch.Tensor, data_samples: list | None = None) -> list:
        outputs = run(inputs.float().cpu())
        logits = torch.from_numpy(np.asarray(outputs[0]))
        if len(outputs) != 1 or logits.dim() != 4 or logits.shape[1] != model.decode_head.out_channels:
            raise ExportError(f'{path} is not this segmentor\'s tensor mode: {len(outputs)} outputs, the '
                              f'first {list(logits.shape)}; expected one map of '
                              f'{model.decode_head.out_channels} class logits; export it without '
                              '--backbone-only')
        metas = [sample.metainfo for sample in data_samples]
        return model.postprocess_result(model.decode_head.predict_by_feat(logits, metas), data_samples)
    model.predict = predict_segmentation
