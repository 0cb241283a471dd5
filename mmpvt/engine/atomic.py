"""Checkpoints that are never half-written under their final name.

mmengine 0.10 writes a checkpoint straight to its final name (``save_checkpoint`` ->
``LocalBackend.put``, which opens the final path and writes), and ``CheckpointHook`` writes
``last_checkpoint`` with a plain ``open()``. A kill or a full disk during either write leaves
a truncated file under the name ``--resume`` reads next.

:func:`install_atomic_checkpoints` routes both writes through :func:`atomic_write`: the bytes
go to a hidden temporary file in the same directory (so the rename never crosses file
systems), are flushed and fsync'ed, and the file is renamed over the final name with
``os.replace``, which POSIX and Windows make atomic. A reader of the final name then sees
either the previous complete file or the new complete one. Covered are all saves that go
through ``Runner.save_checkpoint`` (iteration, epoch and best checkpoints), the published
checkpoint of ``CheckpointHook(published_keys=...)`` and ``last_checkpoint``. Remote
destinations (``s3://`` and other backends) are left to their backend.
"""
from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

_ORIGINAL_SAVE: Callable[..., None] | None = None


def temporary_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` writes ``path``'s new content before renaming it into place.

    Hidden and ending in ``.tmp``, so that globs for ``*.pth`` never pick up a partial file;
    the same name for every write of ``path``, so that a partial file left by a kill is
    overwritten by the next save instead of accumulating on the disk.
    """
    path = Path(path)
    return path.with_name(f'.{path.name}.tmp')


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb') -> Iterator[IO[Any]]:
    """Opens a temporary file for writing that replaces ``path`` once the block completes.

    If the block raises, ``path`` is left untouched and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(path)
    try:
        with builtins.open(temp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on the disk before the name points at it
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power loss (POSIX only)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _is_local(filename: str) -> bool:
    return '://' not in str(filename)


def save_checkpoint_atomically(checkpoint: dict, filename: str, file_client_args: Any = None,
                               backend_args: Any = None) -> None:
    """mmengine's ``save_checkpoint`` with local files written through :func:`atomic_write`."""
    if not _is_local(filename) or file_client_args is not None or backend_args is not None:
        assert _ORIGINAL_SAVE is not None
        return _ORIGINAL_SAVE(checkpoint, filename, file_client_args=file_client_args,
                              backend_args=backend_args)
    with atomic_write(filename) as f:
        torch.save(checkpoint, f)
    return None


def _checkpoint_hook_open(file: Any, mode: str = 'r', *args: Any, **kwargs: Any) -> Any:
    """``open`` as CheckpointHook's module sees it: writes (``last_checkpoint``) are atomic."""
    if mode in ('w', 'wb') and not args and not kwargs:
        return atomic_write(file, mode)
    return builtins.open(file, mode, *args, **kwargs)


def install_atomic_checkpoints() -> None:
    """Makes every checkpoint mmengine's Runner and CheckpointHook save atomic (idempotent).

    Replaces ``save_checkpoint`` in the modules that call it by name (``mmengine.runner.runner``
    for ``Runner.save_checkpoint``, ``mmengine.runner`` for ``CheckpointHook``'s published
    checkpoints) and gives ``mmengine.hooks.checkpoint_hook`` an ``open`` whose plain writes
    go through :func:`atomic_write`: that module opens a file for writing only for
    ``last_checkpoint``.
    """
    global _ORIGINAL_SAVE
    import mmengine.hooks.checkpoint_hook as checkpoint_hook
    import mmengine.runner
    import mmengine.runner.checkpoint
    import mmengine.runner.runner

    if _ORIGINAL_SAVE is None:
        _ORIGINAL_SAVE = mmengine.runner.checkpoint.save_checkpoint
    mmengine.runner.runner.save_checkpoint = save_checkpoint_atomically
    mmengine.runner.save_checkpoint = save_checkpoint_atomically
    checkpoint_hook.open = _checkpoint_hook_open
