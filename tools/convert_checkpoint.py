"""Converts a PVT/PVTv2 checkpoint in any known layout to an mmpvt backbone state dict.

    python tools/convert_checkpoint.py pvt_v2_b2.pth pvt_v2_b2_mmpvt.pth

Reads the authors' release files, timm's pvt_v2, mmdet 3.x's built-in PVT (backbone or
whole detector checkpoints) and mmpvt's own layout, with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmpvt.checkpoint import CheckpointError, load_checkpoint_file
from mmpvt.models.pvt import CLASSIFICATION_KEYS, convert_pvt_state_dict, detect_layout, unwrap_state_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='checkpoint to convert (path or URL)')
    parser.add_argument('dst', help='where to write the mmpvt-layout state dict')
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint_file(args.src)
        layout = detect_layout(unwrap_state_dict(checkpoint))
        converted = convert_pvt_state_dict(checkpoint)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    source_keys = set(unwrap_state_dict(checkpoint))
    dropped = sorted(k for k in source_keys if CLASSIFICATION_KEYS.match(k))
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, args.dst)
    params = sum(v.numel() for v in converted.values())
    print(f'{args.src}: {layout} layout, {len(source_keys)} tensors')
    print(f'wrote {args.dst}: {len(converted)} tensors, {params / 1e6:.2f}M parameters (mmpvt layout)')
    print(f'dropped (classification only): {", ".join(dropped) if dropped else "none"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
