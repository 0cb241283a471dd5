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

Without ``--type`` the family is detected from the checkpoint's keys. Files are read with
``weights_only=True`` (``.pkl`` files by an unpickler that builds numpy arrays only).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mmpvt.checkpoint import CheckpointError, load_checkpoint_file
from mmpvt.models.mvit import (
    convert_mvit_state_dict,
    detect_mvit_layout,
    mvit_dropped_keys,
    unwrap_mvit_checkpoint,
)
from mmpvt.models.pvt import CLASSIFICATION_KEYS, convert_pvt_state_dict, detect_layout, unwrap_state_dict
from mmpvt.models.t2t_vit import (
    convert_t2t_state_dict,
    detect_t2t_layout,
    t2t_dropped_keys,
    unwrap_t2t_checkpoint,
)
from mmpvt.models.vitdet import (
    convert_vitdet_state_dict,
    detect_vitdet_layout,
    unwrap_vitdet_checkpoint,
    vitdet_dropped_keys,
)

# Names of dropped keys printed before the rest are counted (detector checkpoints drop hundreds).
MAX_LISTED = 12


class Family(NamedTuple):
    """How the tool handles one backbone family's checkpoints."""
    unwrap: Callable[[Mapping[str, Any]], dict[str, Any]]  # the source's flat state dict
    detect: Callable[[Mapping[str, Any]], str]  # layout name of the unwrapped state; ValueError if foreign
    convert: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]
    dropped: Callable[[Mapping[str, Any]], list[str]]  # source keys the conversion leaves out


# Tried in this order when --type is not given: ViTDet's layout test is the stricter one (a
# plain ViT's top-level ``patch_embed.`` keys also pass PVT's test for timm's pvt_v2).
FAMILIES: dict[str, Family] = {
    'vitdet': Family(unwrap_vitdet_checkpoint, detect_vitdet_layout, convert_vitdet_state_dict,
                     vitdet_dropped_keys),
    # MViTv2's test (q/k/v pooling weights) is stricter still; ViTDet's and PVT's refuse its files.
    'mvit': Family(unwrap_mvit_checkpoint, detect_mvit_layout, convert_mvit_state_dict, mvit_dropped_keys),
    # T2T-ViT's test needs its tokens-to-token module; ViTDet's and PVT's refuse its files.
    't2t': Family(unwrap_t2t_checkpoint, detect_t2t_layout, convert_t2t_state_dict, t2t_dropped_keys),
    'pvt': Family(unwrap_state_dict, detect_layout, convert_pvt_state_dict,
                  lambda ckpt: [k for k in unwrap_state_dict(ckpt) if CLASSIFICATION_KEYS.match(k)]),
}


def detect_family(checkpoint: Mapping[str, Any]) -> str:
    """The first family whose layout test accepts ``checkpoint``; ValueError naming all otherwise."""
    for name, family in FAMILIES.items():
        try:
            family.detect(family.unwrap(checkpoint))
        except ValueError:
            continue
        return name
    keys = list(unwrap_vitdet_checkpoint(checkpoint))[:5]
    raise ValueError(f'no backbone family ({", ".join(FAMILIES)}) knows this checkpoint\'s layout; '
                     f'first keys: {keys}')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='checkpoint to convert (path or URL)')
    parser.add_argument('dst', help='where to write the mmpvt-layout state dict')
    parser.add_argument('--type', choices=list(FAMILIES), default=None,
                        help='backbone family of the checkpoint (default: detected from its keys)')
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint_file(args.src)
        name = args.type or detect_family(checkpoint)
        family = FAMILIES[name]
        source = family.unwrap(checkpoint)
        layout = family.detect(source)
        converted = family.convert(checkpoint)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    dropped = sorted(family.dropped(checkpoint))
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
