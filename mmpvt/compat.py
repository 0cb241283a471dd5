"""The versions of the OpenMMLab stack mmpvt supports, checked when mmpvt is imported.

An unsupported mmcv/mmdet/mmseg combination otherwise fails far from its cause (an
assertion inside mmdet's import, a missing compiled op at the first NMS); the guard names
the installed version and the supported range instead.
"""
from __future__ import annotations

import importlib.metadata

from mmengine.utils import digit_version

# distribution name -> (lowest supported, first unsupported)
SUPPORTED_VERSIONS: dict[str, tuple[str, str]] = {
    'mmengine': ('0.10.0', '1.0.0'),
    'mmcv': ('2.0.0rc4', '2.2.0'),
    'mmdet': ('3.0.0', '3.4.0'),
    'mmsegmentation': ('1.0.0', '1.3.0'),
}


class IncompatibleVersionError(ImportError):
    """An installed OpenMMLab package outside the range mmpvt supports."""


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(installed: dict[str, str | None] | None = None) -> None:
    """Raises IncompatibleVersionError for any installed package outside its range.

    ``installed`` maps distribution names to versions (None: not installed); by default
    the versions are read from the environment. mmdet and mmsegmentation are optional.
    """
    if installed is None:
        installed = {name: installed_version(name) for name in SUPPORTED_VERSIONS}
    for name, (low, high) in SUPPORTED_VERSIONS.items():
        version = installed.get(name)
        if version is None:
            continue
        if not digit_version(low) <= digit_version(version) < digit_version(high):
            raise IncompatibleVersionError(
                f'mmpvt supports {name}>={low},<{high}, but {name}=={version} is installed. '
                f'Install a supported version (tools/setup_env.sh sets up a tested stack).')
