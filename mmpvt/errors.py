"""The error the command-line tools report as one ``error: ...`` line, and the file checks behind it."""
from __future__ import annotations

import os
import urllib.parse
from pathlib import Path


class LaunchError(RuntimeError):
    """A problem with the command line or the files it names, explained for the user."""


def is_remote(path: str) -> bool:
    return bool(urllib.parse.urlparse(str(path)).scheme) and '://' in str(path)


def check_file(path: str | os.PathLike, what: str) -> Path:
    """Returns ``path`` if it is a file; raises LaunchError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        hint = ' (it is a directory)' if path.is_dir() else ''
        raise LaunchError(f'{what} not found: {path}{hint}')
    return path
