#!/usr/bin/env bash
# The main job (`make demo`): RetinaNet-PVTv2-b0 learns to find shapes, from scratch, offline.
#
#   1. generate the synthetic shapes dataset (COCO layout, 128x128 images) into data/synthetic
#   2. train configs/demo/retinanet_pvt_v2_b0_synthetic.py (CPU, or the GPU when present), in
#      mixed precision where the hardware has it (CUDA, or a CPU with bfloat16 units)
#   3. evaluate the last checkpoint: COCO's AP table and a | metric | value | table
#   4. draw predictions on val images and the loss / mAP curves, as two PNGs
#
# Everything lands in work_dirs/demo (DEMO_WORK_DIR). Extra arguments go to tools/train.py,
# e.g. `bash tools/demo.sh --cfg-options train_cfg.max_iters=100` for a shorter run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CONFIG=configs/demo/retinanet_pvt_v2_b0_synthetic.py
DATA=data/synthetic
WORK=${DEMO_WORK_DIR:-work_dirs/demo}
START=$(date +%s)

step() { printf '\n==> [demo %ds] %s\n' "$(($(date +%s) - START))" "$*"; }

step "1/4 generating the synthetic shapes dataset in $DATA"
"$PYTHON" -m mmpvt.datasets.synthetic "$DATA" --num-train 1000 --num-val 100 --seed 0 --size 128

# bfloat16 on a CPU without bfloat16 units would be slower than float32: ask the hardware.
AMP=()
if "$PYTHON" -c "import sys, torch; sys.exit(not (torch.cuda.is_available() or any(
    getattr(torch.cpu, f, lambda: False)() for f in ('_is_amx_tile_supported', '_is_avx512_bf16_supported'))))"
then
  AMP=(--amp)
fi

step "2/4 training RetinaNet-PVTv2-b0 from scratch ${AMP[*]} (a progress line with the ETA every 20 iterations)"
rm -rf "$WORK"  # a fresh run: the curves read every run in the work dir
"$PYTHON" tools/train.py "$CONFIG" --work-dir "$WORK" "${AMP[@]}" "$@"
CHECKPOINT=$(cat "$WORK/last_checkpoint")

step "3/4 evaluating $CHECKPOINT on the 100 val images"
"$PYTHON" tools/test.py "$CONFIG" "$CHECKPOINT" --work-dir "$WORK/test" | tee "$WORK/test_output.txt"

step "4/4 drawing predictions and training curves"
"$PYTHON" tools/analysis/show_predictions.py "$CONFIG" "$CHECKPOINT" --num 8 --out "$WORK/predictions.png"
"$PYTHON" tools/analysis/plot_curves.py "$WORK" --keys loss loss_cls loss_bbox coco/bbox_mAP \
  --out "$WORK/curves.png"

MAP=$(grep -E '^\| coco/bbox_mAP \|' "$WORK/test_output.txt" | awk -F'|' '{gsub(/ /, "", $3); print $3}')
printf '\n==> [demo] done in %d s: bbox mAP %s on the synthetic val set\n' "$(($(date +%s) - START))" "${MAP:-?}"
printf '    predictions: %s\n    curves:      %s\n    checkpoint:  %s\n' \
  "$WORK/predictions.png" "$WORK/curves.png" "$CHECKPOINT"
