"""Loading checkpoints safely: no code runs on load, nothing loads silently wrong.

Every load goes through ``torch.load(weights_only=True)``. mmengine's own checkpoints (the
ones ``--resume`` reads) hold a few non-tensor objects: message-hub history buffers, which
pickle their statistics methods as ``getattr(HistoryBuffer, 'mean')``, and numpy scalars
and arrays. Exactly those are added to torch's allow-list when mmpvt is imported, so
mmengine's loader works under torch >= 2.6 without turning ``weights_only`` off. Release
files of pre-trained models may carry their training script's arguments (an
``argparse.Namespace``), which is allowed too. detectron2's model-zoo ``.pkl`` files are
plain pickles of numpy arrays; they are read by an unpickler that builds numpy arrays and
nothing else.
"""
from __future__ import annotations

import argparse
import codecs
import logging
import os
import pickle
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, MMLogger, print_log
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or of another model."""


def _numpy_allowed_globals() -> list[Any]:
    """The numpy callables and classes that pickled numpy scalars and arrays refer to."""
    try:  # numpy >= 2 moved the pickling helpers to numpy._core
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in
                     (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                      np.uint32, np.uint64, np.float16, np.float32, np.float64)]
    return [scalar, _reconstruct, np.ndarray, np.dtype, *dtype_classes]


def history_buffer_getattr(obj: Any, name: str) -> Any:
    """The one ``getattr`` a checkpoint may call: a HistoryBuffer statistics method.

    Allowing the builtin itself would let a crafted file walk from any allowed object to
    ``os.system``; this stand-in resolves only ``HistoryBuffer.min/max/current/mean`` and
    the statistics registered on it.
    """
    # The built-in statistics are named explicitly: mmengine fills _statistics_methods only
    # when the first buffer is created, which a fresh process has not done yet.
    if obj is HistoryBuffer and name in {'min', 'max', 'current', 'mean', *HistoryBuffer._statistics_methods}:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f'refused getattr({obj!r}, {name!r}) while loading a checkpoint')


# Exactly the non-tensor globals an mmengine 0.10 checkpoint holds (meta, message hub).
MMENGINE_SAFE_GLOBALS: list[Any] = [
    HistoryBuffer, (history_buffer_getattr, 'builtins.getattr'), *_numpy_allowed_globals()]
# What release files of pre-trained models hold beside their weights: MAE and DeiT save the
# training script's arguments as an argparse.Namespace ('args'). Their optimizer state,
# epoch counters and config strings are plain containers, which weights_only reads as is.
RELEASE_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def install_safe_loading() -> None:
    """Makes every mmengine checkpoint load safe and its failures clear.

    Adds mmengine's checkpoint classes to torch's ``weights_only`` allow-list, and routes
    mmengine's loader for local files (used by ``load_from``, ``--resume`` and testing) through
    :func:`load_checkpoint_file`, which passes ``weights_only=True`` explicitly and names the
    file when it is missing, truncated or unsafe.
    """
    torch.serialization.add_safe_globals(MMENGINE_SAFE_GLOBALS + RELEASE_SAFE_GLOBALS)
    CheckpointLoader.register_scheme(prefixes='', force=True)(_mmengine_local_loader)


def _mmengine_local_loader(filename: str, map_location: Any = None) -> dict[str, Any]:
    return load_checkpoint_file(os.path.expanduser(filename), map_location)


def _is_url(filename: str) -> bool:
    return urllib.parse.urlparse(filename).scheme in ('http', 'https', 'file')


# What a run can do instead when a weights file cannot be downloaded (no network).
RUN_OFFLINE_ADVICE = ('point the config at a local copy, or train from scratch with --cfg-options '
                      'model.backbone.init_cfg=None')


def download(url: str, model_dir: str | os.PathLike | None = None, advice: str = RUN_OFFLINE_ADVICE) -> Path:
    """Downloads ``url`` once into torch's hub cache (with a progress bar) and returns the path.

    A failed download raises CheckpointError saying where to place the file by hand and what
    else to do (``advice``: a run's choices by default; a tool gives its own).
    """
    model_dir = Path(model_dir or Path(torch.hub.get_dir()) / 'checkpoints')
    path = model_dir / Path(urllib.parse.urlparse(url).path).name
    if path.exists():
        return path
    model_dir.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as exc:  # urllib raises several unrelated types
        raise CheckpointError(f'could not download {url} ({exc}). Place the file at {path}, '
                              f'{advice}') from exc
    return path


_UNREADABLE = 'is not a readable checkpoint (truncated or corrupt?)'
# What torch's weights-only unpickler says when a file asks for code, not data.
_UNSAFE_MARKERS = ('Unsupported global', 'unrecognized function', 'is blocked', 'refused getattr',
                   'refused global')


def _unpickler_detail(exc: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's generic advice around it."""
    text = str(exc)
    if 'WeightsUnpickler error:' in text:
        text = text.split('WeightsUnpickler error:', 1)[1]
    return ' '.join(text.split()).split(' Check the documentation')[0].split(' Please use')[0]


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, and refuses every other global.

    A numpy array pickles as ``_reconstruct(ndarray, ...)`` with a ``dtype`` (and, in
    protocol 2, its bytes as ``_codecs.encode(text, 'latin1')``); numpy 1.x files name the
    helper under ``numpy.core``, numpy 2 under ``numpy._core``.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ('numpy.core.multiarray', 'numpy._core.multiarray') and name == '_reconstruct':
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == 'numpy' and name in ('ndarray', 'dtype'):
            return getattr(np, name)
        if module == '_codecs' and name == 'encode':  # array bytes in protocol-2 pickles
            return codecs.encode
        raise pickle.UnpicklingError(f'refused global {module}.{name}: not a numpy array')


def _to_tensors(obj: Any) -> Any:
    """The same nested dicts and lists with numpy arrays as tensors."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, Mapping):
        return {k: _to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_tensors(v) for v in obj]
    return obj


def _load_numpy_pickle(path: Path) -> Any:
    """Reads a pickle of numpy arrays (detectron2's model-zoo ``.pkl``) into tensors.

    ``latin1`` decodes the byte strings of Python 2 pickles as detectron2's own loader does.
    """
    with open(path, 'rb') as f:
        return _to_tensors(_NumpyArrayUnpickler(f, encoding='latin1').load())


def unwrap_checkpoint(checkpoint: Mapping[str, Any], wrappers: Sequence[str],
                      skip_empty: bool = False) -> dict[str, Any]:
    """The flat state dict inside a checkpoint: the first of ``wrappers`` that holds a dict
    (a non-empty one with ``skip_empty``), or the checkpoint itself, without the ``module.``
    prefix of a model saved inside DataParallel."""
    state = checkpoint
    for wrapper in wrappers:
        if isinstance(state.get(wrapper), Mapping) and (state[wrapper] or not skip_empty):
            state = state[wrapper]
            break
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return dict(state)


# The prefix of a backbone's keys inside a detector, segmentor or classifier checkpoint.
BACKBONE_PREFIX = 'backbone.'


class CheckpointFormat:
    """How a backbone family reads checkpoints: every layout it knows, to its own state dict.

    One subclass per family, set as the backbone's ``checkpoint_format``. The steps, and their
    names, are the same for every family; the family states only what is its own:

    - ``wrappers``: the keys a checkpoint may hold its state dict under (the first dict wins;
      ``skip_empty_wrappers`` passes over empty ones);
    - ``_detect(inside, outside)``: the layout's name, judged by the family's own keys only;
      ValueError for a state dict that is not the family's;
    - ``_drops(key, layout)``: a backbone key the family has no use for (a classifier's head);
    - ``_adopts(key, layout)``: a key outside the backbone that belongs to it in that layout
      (mmdet's ViTDet project keeps the pyramid's scale changes in its neck);
    - ``_convert(state, layout)``: the renames to the family's names.

    Here, once for all: unwrapping, DataParallel's ``module.`` and a detector's ``backbone.``
    prefixes, numpy arrays (detectron2's ``.pkl`` files) as tensors, and the list of dropped
    keys. :meth:`convert` is pure and idempotent: its output converts to itself.
    """

    family = ''
    wrappers: tuple[str, ...] = ('state_dict', 'model', 'module')
    skip_empty_wrappers = False

    # -- what every family does the same way ------------------------------------------------
    def unwrap(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """The flat state dict inside a release, training, detector or classifier checkpoint."""
        return unwrap_checkpoint(checkpoint, self.wrappers, skip_empty=self.skip_empty_wrappers)

    def _split(self, checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str, str]:
        """The backbone's keys (its prefix stripped), the keys outside it, the layout, and the
        prefix the backbone's keys had ('' for a backbone's own checkpoint)."""
        state = self.unwrap(checkpoint)
        prefix = BACKBONE_PREFIX if any(k.startswith(BACKBONE_PREFIX) for k in state) else ''
        inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        outside = {k: v for k, v in state.items() if not k.startswith(prefix)}
        return inside, outside, self._detect(inside, outside), prefix

    def layout(self, checkpoint: Mapping[str, Any]) -> str:
        """The name of the checkpoint's layout; ValueError if it is not this family's."""
        return self._split(checkpoint)[2]

    def convert(self, checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The checkpoint as the family's backbone state dict; ValueError if it is not the
        family's. Every key the backbone could use is kept (a foreign tensor then fails the
        load instead of vanishing); :meth:`dropped_keys` lists the others."""
        inside, outside, layout, _ = self._split(checkpoint)
        state = {k: v for k, v in inside.items() if not self._drops(k, layout)}
        state.update({k: v for k, v in outside.items() if self._adopts(k, layout)})
        state = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}
        return self._convert(state, layout)

    def dropped_keys(self, checkpoint: Mapping[str, Any]) -> list[str]:
        """The keys of the checkpoint's state dict that :meth:`convert` leaves out, as named there."""
        inside, outside, layout, prefix = self._split(checkpoint)
        return ([prefix + k for k in inside if self._drops(k, layout)]
                + [k for k in outside if not self._adopts(k, layout)])

    # -- what each family states ------------------------------------------------------------
    def _detect(self, inside: Mapping[str, Any], outside: Mapping[str, Any]) -> str:
        raise NotImplementedError(f'{type(self).__name__} does not say which layouts it reads')

    def _drops(self, key: str, layout: str) -> bool:
        return False

    def _adopts(self, key: str, layout: str) -> bool:
        return False

    def _convert(self, state: dict[str, Any], layout: str) -> dict[str, torch.Tensor]:
        return state


def load_checkpoint_file(filename: str | os.PathLike, map_location: Any = 'cpu',
                         offline_advice: str = RUN_OFFLINE_ADVICE) -> dict[str, Any]:
    """Reads a checkpoint (a path or an http(s)/file URL) with ``weights_only=True``.

    A URL is downloaded once (:func:`download`, with ``offline_advice`` for when it cannot be).

    A ``.pkl`` file is read as a pickle of numpy arrays (detectron2's model zoo), which
    builds numpy arrays and nothing else; its arrays come back as CPU tensors.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is truncated or not a checkpoint, or it holds objects
            outside the allow-list (such a file could run code when unpickled).
    """
    filename = str(filename)
    path = download(filename, advice=offline_advice) if _is_url(filename) else Path(filename)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        if path.suffix == '.pkl':
            checkpoint = _load_numpy_pickle(path)
        else:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if any(marker in detail for marker in _UNSAFE_MARKERS):
            raise CheckpointError(f'{path} holds objects that are not plain weights; it was refused '
                                  f'because loading it could run code ({detail})') from exc
        raise CheckpointError(f'{path} {_UNREADABLE}: {detail}') from exc
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        raise CheckpointError(f'{path} {_UNREADABLE}: {exc}') from exc
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
    return dict(checkpoint)


def shape_mismatch(key: str, loaded: torch.Tensor, own: torch.Tensor) -> CheckpointError:
    """The error for a tensor whose shape differs between a checkpoint and the model."""
    return CheckpointError(
        f'the checkpoint does not fit the model: {key} has shape {tuple(loaded.shape)} in the '
        f'checkpoint and {tuple(own.shape)} in the model (a checkpoint of another variant?)')


def load_backbone_checkpoint(model: nn.Module, filename: str | os.PathLike,
                             convert: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]],
                             map_location: Any = 'cpu',
                             logger: logging.Logger | MMLogger | str | None = None) -> dict[str, list[str]]:
    """Loads a backbone checkpoint in any layout ``convert`` knows, refusing wrong ones.

    Classification-only entries are dropped by ``convert``; what remains must match the model
    exactly. A tensor whose shape differs from the model's, or a key that one side lacks
    (another variant or depth), raises CheckpointError naming the first offending key: a
    partial load never passes silently. Missing and unexpected keys are logged in one line
    each before that. Returns ``{'missing': [], 'unexpected': []}`` on success.
    """
    logger = logger or MMLogger.get_current_instance()
    state = convert(load_checkpoint_file(filename, map_location))
    own = model.state_dict()
    # Shapes first: a differing shape is the clearest sign of another variant. Models that
    # adapt tensors on load (mmpvt's resize position embeddings) check them themselves.
    try:
        if hasattr(model, 'adapt_loaded_state_dict'):
            model.adapt_loaded_state_dict(state)
        else:
            for key, value in state.items():
                if key in own and own[key].shape != value.shape:
                    raise shape_mismatch(key, value, own[key])
    except CheckpointError as exc:
        raise CheckpointError(f'{filename}: {exc}') from exc
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    name = type(model).__name__
    print_log(f'{name}: loaded {len(state) - len(unexpected)} tensors from {filename}', logger)
    print_log(f'{name}: missing keys: {", ".join(missing) if missing else "none"}', logger,
              level=logging.WARNING if missing else logging.INFO)
    print_log(f'{name}: unexpected keys: {", ".join(unexpected) if unexpected else "none"}', logger,
              level=logging.WARNING if unexpected else logging.INFO)
    if missing or unexpected:
        first = (missing + unexpected)[0]
        raise CheckpointError(
            f'{filename} does not fit {name}: {first} is '
            f'{"missing from the checkpoint" if missing else "not in the model"} '
            '(a checkpoint of another variant or depth?)')
    model.load_state_dict(state, strict=False)
    return {'missing': missing, 'unexpected': unexpected}
