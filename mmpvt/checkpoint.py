"""Loading checkpoints safely: no code runs on load, nothing loads silently wrong.

Every load goes through ``torch.load(weights_only=True)``. mmengine's own checkpoints (the
ones ``--resume`` reads) hold a few non-tensor objects: message-hub history buffers, which
pickle their statistics methods as ``getattr(HistoryBuffer, 'mean')``, and numpy scalars
and arrays. Exactly those are added to torch's allow-list when mmpvt is imported, so
mmengine's loader works under torch >= 2.6 without turning ``weights_only`` off.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, MMLogger, print_log
from torch import nn

from .models.layers import resize_pos_embed


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
    if obj is HistoryBuffer and name in HistoryBuffer._statistics_methods:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f'refused getattr({obj!r}, {name!r}) while loading a checkpoint')


# Exactly the non-tensor globals an mmengine 0.10 checkpoint holds (meta, message hub).
MMENGINE_SAFE_GLOBALS: list[Any] = [
    HistoryBuffer, (history_buffer_getattr, 'builtins.getattr'), *_numpy_allowed_globals()]


def register_safe_globals() -> None:
    """Adds mmengine's checkpoint classes to torch's ``weights_only`` allow-list."""
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals(MMENGINE_SAFE_GLOBALS)


def _is_url(filename: str) -> bool:
    return urllib.parse.urlparse(filename).scheme in ('http', 'https', 'file')


def download(url: str, model_dir: str | os.PathLike | None = None) -> Path:
    """Downloads ``url`` once into torch's hub cache (with a progress bar) and returns the path."""
    model_dir = Path(model_dir or Path(torch.hub.get_dir()) / 'checkpoints')
    path = model_dir / Path(urllib.parse.urlparse(url).path).name
    if path.exists():
        return path
    model_dir.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as exc:  # urllib raises several unrelated types
        raise CheckpointError(
            f'could not download {url} ({exc}). Place the file at {path}, point the config at a '
            "local copy, or train from scratch with --cfg-options model.backbone.init_cfg=None") from exc
    return path


def load_checkpoint_file(filename: str | os.PathLike, map_location: Any = 'cpu') -> dict[str, Any]:
    """Reads a checkpoint (a path or an http(s)/file URL) with ``weights_only=True``.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is truncated or not a checkpoint, or it holds objects
            outside the allow-list (such a file could run code when unpickled).
    """
    filename = str(filename)
    path = download(filename) if _is_url(filename) else Path(filename)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if 'weights_only' in str(exc) or 'Unsupported global' in str(exc):
            raise CheckpointError(
                f'{path} holds objects that are not plain weights; it was refused because loading '
                f'it could run code. Detail: {str(exc).splitlines()[0]}') from exc
        raise CheckpointError(f'{path} is not a readable checkpoint (truncated or corrupt?): {exc}') from exc
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        raise CheckpointError(f'{path} is not a readable checkpoint (truncated or corrupt?): {exc}') from exc
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
    return dict(checkpoint)


def _resize_pos_embeds(model: nn.Module, state: dict[str, torch.Tensor],
                       logger: logging.Logger | MMLogger | str) -> None:
    """Resizes square position embeddings learned at another image size to the model's grid."""
    for key, value in state.items():
        if not key.endswith('pos_embed'):
            continue
        owner = model.get_submodule(key.rpartition('.')[0]) if '.' in key else model
        grid = getattr(owner, 'pos_grid', None)
        side = math.isqrt(value.shape[1])
        if grid is None or value.shape[1] == grid[0] * grid[1] or side * side != value.shape[1]:
            continue
        state[key] = resize_pos_embed(value, (side, side), grid)
        print_log(f'resized {key} from a {side}x{side} to a {grid[0]}x{grid[1]} grid', logger)


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
    _resize_pos_embeds(model, state, logger)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f'{filename} does not fit {type(model).__name__}: {key} has shape '
                f'{tuple(value.shape)} in the checkpoint and {tuple(own[key].shape)} in the model '
                '(a checkpoint of another variant?)')
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
