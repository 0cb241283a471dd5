"""Converts a backbone checkpoint in any known layout to an mmpvt backbone state dict.

    python tools/convert_checkpoint.py pvt_v2_b2.pth pvt_v2_b2_mmpvt.pth
    python tools/convert_checkpoint.py mae_pretrain_vit_base.pth vitdet_b.pth --type vitdet

Families (``--type``) and the layouts each reads:

    pvt     PVT and PVTv2: the authors' release files, timm's pvt_v2, mmdet 3.x's built-in
            PVT (backbone or whole detector checkpoints), mmpvt's own
    vitdet  ViTDet: timm vit_* and DeiT releases, MAE pre-training files, detectron2 ViTDet
            detectors (.pth and the model zoo's .pkl), mmdet's ViTDet project, mmpvt's own
    mvit    MViTv2: the official .pyth releases, timm mvitv2_*, detectron2 MViT detectors
            (.pth and the model zoo's .pkl), mmpretrain MViT classifiers, mmpvt's own
    t2t     T2T-ViT: the authors' .pth.tar releases and timm training-script files (their
            EMA weights taken), mmpretrain T2T_ViT classifiers, mmpvt's own

Without ``--type`` the family is detected from the checkpoint's keys. The families are the
registered backbones' (each one's ``checkpoint_format``), so a new family is covered here
without a change. Files are read with
``weights_only=True`` (``.pkl`` files by an unpickler that builds numpy arrays only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import mmpvt  # noqa: F401  (registers the backbones)
from mmpvt.checkpoint import CheckpointError, CheckpointFormat, load_checkpoint_file
from mmpvt.models import DenseBackbone
from mmpvt.registry import MODELS

# Names of dropped keys printed before the rest are counted (detector checkpoints drop hundreds).
MAX_LISTED = 12


def checkpoint_formats() -> dict[str, CheckpointFormat]:
    """Every registered backbone family's checkpoint format, by family name (PVT and PVTv2
    share theirs)."""
    formats = {}
    for cls in MODELS.module_dict.values():
        if isinstance(cls, type) and issubclass(cls, DenseBackbone):
            formats.setdefault(cls.checkpoint_format.family, cls.checkpoint_format)
    return dict(sorted(formats.items()))


def detect_family(checkpoint: dict, formats: dict[str, CheckpointFormat] | None = None) -> str:
    """The one family whose layout test accepts ``checkpoint``; ValueError naming all otherwise.
    Each family judges by its own keys only, so at most one accepts."""
    formats = formats or checkpoint_formats()
    accepted = []
    for name, fmt in formats.items():
        try:
            fmt.layout(checkpoint)
        except ValueError:
            continue
        accepted.append(name)
    if len(accepted) == 1:
        return accepted[0]
    if accepted:
        raise ValueError(f'the checkpoint fits several families ({", ".join(accepted)}): name one with '
                         '--type')
    keys = list(next(iter(formats.values())).unwrap(checkpoint))[:5]
    raise ValueError(f'no backbone family ({", ".join(formats)}) knows this checkpoint\'s layout; '
                     f'first keys: {keys}')


def main(argv: list[str] | None = None) -> int:
    formats = checkpoint_formats()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='checkpoint to convert (path or URL)')
    parser.add_argument('dst', help='where to write the mmpvt-layout state dict')
    parser.add_argument('--type', choices=list(formats), default=None,
                        help='backbone family of the checkpoint (default: detected from its keys)')
    args = parser.parse_args(argv)
    try:
        offline = 'or download it by hand and give this tool the local file'
        checkpoint = load_checkpoint_file(args.src, offline_advice=offline)
        name = args.type or detect_family(checkpoint, formats)
        fmt = formats[name]
        source = fmt.unwrap(checkpoint)
        layout = fmt.layout(checkpoint)
        converted = fmt.convert(checkpoint)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    dropped = sorted(fmt.dropped_keys(checkpoint))
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, args.dst)
    params = sum(v.numel() for v in converted.values())
    print(f'{args.src}: {name} family, {layout} layout, {len(source)} tensors')
    print(f'wrote {args.dst}: {len(converted)} tensors, {params / 1e6:.2f}M parameters (mmpvt layout)')
    listed = ', '.join(dropped[:MAX_LISTED]) + (f' and {len(dropped) - MAX_LISTED} more'
                                               if len(dropped) > MAX_LISTED else '')
    print(f'dropped (not used by the backbone): {listed or "none"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
