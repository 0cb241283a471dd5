"""Writes the key manifests: the tensor names and shapes each PVT implementation's checkpoints hold.

A manifest is what a source's model returns from ``state_dict()``, for every variant of one
family, as names and shapes only. The checkpoint tests build random tensors from it and load
them through mmpvt, so mmpvt's converter is checked against the sources' own models rather
than against the suite's own idea of their layouts.

Usage (from the repository root):

    python tests/manifests/generate.py                 # timm and mmdet, the installed versions
    python tests/manifests/generate.py --pvt-repo DIR  # and the authors' classification models

``DIR`` is a checkout of the authors' repository (github.com/whai362/PVT); its
``classification/pvt.py`` and ``pvt_v2.py`` are imported from there (they need timm).

Format: ``{"source": ..., "layout": ..., "family": ..., "variants": {arch: {name: shape}}}``.
``layout`` names how the source ships checkpoints (see README.md), ``family`` the mmpvt
backbone, and ``arch`` mmpvt's variant name. Inside a ``ModuleList``, a run of indices whose
tensors have the same name after the index and the same shape is written once, with the run
as ``{first-last}``: ``block1.{0-2}.attn.q.weight`` stands for blocks 0, 1 and 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

from torch import nn

HERE = Path(__file__).resolve().parent
RANGE = re.compile(r'\{(\d+)-(\d+)\}')

V1_ARCHS = ('tiny', 'small', 'medium', 'large')
V2_ARCHS = ('b0', 'b1', 'b2', 'b2_li', 'b3', 'b4', 'b5')
# mmdet's configs name the variants by letter (v1) or with "pvtv2-" (v2); mmdet has no b2_li.
MMDET_V1_CONFIGS = {arch: f'retinanet_pvt-{arch[0]}_fpn_1x_coco.py' for arch in V1_ARCHS}
MMDET_V2_CONFIGS = {arch: f'retinanet_pvtv2-{arch}_fpn_1x_coco.py' for arch in V2_ARCHS if arch != 'b2_li'}


def expand(variant: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """The names and shapes a manifest entry stands for, with every ``{first-last}`` run spelled out."""
    out = {}
    for name, shape in variant.items():
        m = RANGE.search(name)
        indices = range(int(m[1]), int(m[2]) + 1) if m else [None]
        for i in indices:
            out[name if i is None else name[:m.start()] + str(i) + name[m.end():]] = tuple(shape)
    return out


def compress(model: nn.Module) -> dict[str, list[int]]:
    """``model``'s state-dict names and shapes, with the runs of blocks written as ranges."""
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name]
    runs: dict[tuple[str, str, tuple[int, ...]], list[int]] = {}
    order: list[tuple[str, object]] = []
    for key, shape in state.items():
        # The innermost ModuleList holding the tensor: its index is the block number.
        container = max((p for p in lists if key.startswith(p + '.')), key=len, default=None)
        index, _, rest = key[len(container) + 1:].partition('.') if container else ('', '', '')
        if not (index.isdigit() and rest):
            order.append(('key', key))
            continue
        group = (container, rest, tuple(shape))
        if group not in runs:
            runs[group] = []
            order.append(('run', group))
        runs[group].append(int(index))
    out: dict[str, list[int]] = {}
    for kind, item in order:
        if kind == 'key':
            out[item] = state[item]
            continue
        container, rest, shape = item
        indices = sorted(runs[item])
        start = indices[0]
        for prev, nxt in zip(indices, indices[1:] + [None]):
            if nxt == prev + 1:
                continue  # the run goes on
            span = str(start) if start == prev else f'{{{start}-{prev}}}'
            out[f'{container}.{span}.{rest}'] = list(shape)
            start = nxt
    if expand(out) != {k: tuple(v) for k, v in state.items()}:
        raise AssertionError(f'{type(model).__name__}: the compressed names do not expand to its state dict')
    return out


def write(path: Path, source: str, layout: str, family: str,
          variants: dict[str, dict[str, list[int]]]) -> None:
    """One manifest file, one tensor per line, so that a diff shows which names changed."""
    lines = ['{', f'  "source": {json.dumps(source)},', f'  "layout": {json.dumps(layout)},',
             f'  "family": {json.dumps(family)},', '  "variants": {']
    for v, (arch, keys) in enumerate(variants.items()):
        lines.append(f'    {json.dumps(arch)}: {{')
        items = [f'      {json.dumps(k)}: {json.dumps(s)}' for k, s in keys.items()]
        lines.append(',\n'.join(items))
        lines.append('    }' + (',' if v < len(variants) - 1 else ''))
    lines += ['  }', '}']
    path.write_text('\n'.join(lines) + '\n')
    json.loads(path.read_text())  # what was written is valid JSON
    print(f'{path.name}: {", ".join(f"{a} {len(expand(k))} tensors" for a, k in variants.items())}')


def timm_manifest() -> None:
    import timm
    variants = {arch: compress(timm.create_model(f'pvt_v2_{arch}', pretrained=False)) for arch in V2_ARCHS}
    write(HERE / 'timm_pvt_v2.json', f'timm {timm.__version__}, timm.models.pvt_v2 (pvt_v2_<arch>)',
          'timm', 'PVTv2', variants)


def mmdet_manifests() -> None:
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    config_dir = Path(mmdet.__file__).parent / '.mim' / 'configs' / 'pvt'
    for name, family, configs in (('mmdet_pvt.json', 'PVT', MMDET_V1_CONFIGS),
                                  ('mmdet_pvt_v2.json', 'PVTv2', MMDET_V2_CONFIGS)):
        variants = {}
        for arch, config in configs.items():
            backbone = Config.fromfile(config_dir / config).model.backbone
            backbone.pop('init_cfg', None)  # the configs point at the authors' release files
            variants[arch] = compress(MODELS.build(backbone))
        write(HERE / name, f'mmdet {mmdet.__version__}, mmdet.models.backbones.pvt '
                           f'({family_class(family)}, backbones of configs/pvt)', 'mmdet', family, variants)


def family_class(family: str) -> str:
    return 'PyramidVisionTransformer' if family == 'PVT' else 'PyramidVisionTransformerV2'


def _import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # timm's register_model looks the module up there
    with warnings.catch_warnings():
        # Their timm imports are deprecated aliases, and their pvt_v2_* names shadow timm's own.
        warnings.simplefilter('ignore')
        spec.loader.exec_module(module)
    return module


def official_manifests(repo: Path) -> None:
    """The authors' classification models: the layout of their release files."""
    files = {'pvt': repo / 'classification' / 'pvt.py', 'pvt_v2': repo / 'classification' / 'pvt_v2.py'}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit('--pvt-repo must be a checkout of github.com/whai362/PVT; '
                         f'missing: {", ".join(missing)}')
    timm_version = importlib.metadata.version('timm')
    families = (('pvt', 'PVT', V1_ARCHS, 'pvt_'), ('pvt_v2', 'PVTv2', V2_ARCHS, 'pvt_v2_'))
    for stem, family, archs, prefix in families:
        module = _import_file(files[stem], f'authors_{stem}')
        variants = {arch: compress(getattr(module, prefix + arch)()) for arch in archs}
        write(HERE / f'official_{stem}.json',
              f'github.com/whai362/PVT commit {_git(repo, "HEAD")}, classification/{stem}.py '
              f'(blob {_git(repo, f"HEAD:classification/{stem}.py")}), {prefix}<arch>() '
              f'built with timm {timm_version}', 'official', family, variants)


def _git(repo: Path, rev: str) -> str:
    """The object id of ``rev`` in ``repo``, pinning exactly which file the manifest came from."""
    result = subprocess.run(['git', '-C', str(repo), 'rev-parse', rev], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f'--pvt-repo must be a git checkout (git rev-parse {rev}: {result.stderr.strip()})')
    return result.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pvt-repo', type=Path, help='a checkout of github.com/whai362/PVT')
    args = parser.parse_args(argv)
    timm_manifest()
    mmdet_manifests()
    if args.pvt_repo:
        official_manifests(args.pvt_repo)


if __name__ == '__main__':
    sys.exit(main())
