"""The third-party deprecation notices the tools hide, each one by its text and its module.

They come from the OpenMMLab stack's own code, not from anything a user of mmpvt wrote or
can change, and are printed before the tool's first line of output (on every rank of a
distributed run). Every other warning, of these packages too, is still shown. A user who
asks for warnings explicitly (``python -W ...`` or ``PYTHONWARNINGS``) sees all of them.
"""
from __future__ import annotations

import sys
import warnings

__all__ = ['THIRD_PARTY_DEPRECATIONS', 'quiet_third_party_warnings']

# (message, module): regular expressions, as warnings.filterwarnings matches them (from the
# start of the text; the module names end with $ so that a submodule does not match).
THIRD_PARTY_DEPRECATIONS: tuple[tuple[str, str], ...] = (
    # setuptools >= 80 warns on every `import pkg_resources`. mmengine imports it, then
    # reloads it (the second warning is attributed to importlib), whenever a config names
    # a base from another package ('mmdet::...', 'mmseg::...'): once per such base.
    (r'pkg_resources is deprecated as an API', r'mmengine\.utils\.package_utils$'),
    (r'pkg_resources is deprecated as an API', r'importlib$'),
    # mmseg's own decode heads build their losses through the helpers it deprecates.
    (r'``build_\w+`` would be deprecated soon', r'mmseg\.models\.builder$'),
    # mmseg's ADE20K pipelines (its base configs, and the ones derived from them) pass
    # reduce_zero_label to LoadAnnotations, as mmseg 1.x documents them.
    (r'`reduce_zero_label` will be deprecated', r'mmseg\.datasets\.transforms\.loading$'),
)


def quiet_third_party_warnings() -> bool:
    """Hides the notices of :data:`THIRD_PARTY_DEPRECATIONS` in this process (and its forks).

    Called first thing by each tool. Does nothing when the user chose warning filters on
    the command line or in ``PYTHONWARNINGS`` (their choice wins); returns whether the
    filters were installed.
    """
    if sys.warnoptions:
        return False
    for message, module in THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings('ignore', message=message, module=module)
    return True
