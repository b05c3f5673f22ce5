#!/usr/bin/env bash
# densenet121-multitask-v2: whole-image classifier, the first stage of the two-stage default.
# A continuation of the multi-task run at 224 px with twice the weight on the class head,
# started from the bundled outline model densenet121-unet-lesion-v1 (CPU only, 2 cores, fp32:
# about 54 minutes). Its classifier is released; its segmenter (densenet121-unet-lesion-v2) is
# not (fewer normal images left empty on validation).
set -euo pipefail
DATA=${DATA:-../shared/data}
source "$(dirname "$0")/_common.sh"

run=runs/multitask-v2
$PY -m bus_core train-seg --data "$DATA/BUSI" --split splits/busi.json \
  --data "$DATA/BUSBRA/labels.csv" --split splits/busbra.json \
  --init weights/densenet121-unet-lesion-v1 --out "$run" --epochs 10 --epoch-size 1200 \
  --device cpu-fp32 --size 224 --cls-weight 2 --lr 5e-4 --seed 1 \
  --name densenet121-unet-lesion-v2 --classifier-name densenet121-multitask-v2

out="$RELEASE/densenet121-multitask-v2"
rm -rf "$out" && cp -r "$run/classifier" "$out"
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSI" --split splits/busi.json \
  --subset test --json "$out/test-busi.json"
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSBRA/labels.csv" \
  --split splits/busbra.json --subset test --json "$out/test-busbra.json"
