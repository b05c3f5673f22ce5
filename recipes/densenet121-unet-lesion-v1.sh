#!/usr/bin/env bash
# densenet121-unet-lesion-v1 (outline model) and densenet121-multitask-v1 (whole-image
# classifier): one multi-task run on BUSI + BUS-BRA, started from the bundled
# densenet121-busi-v1 (CPU only, 2 cores, fp32: about 40 minutes). It writes RUN/segmenter
# (weights/densenet121-unet-lesion-v1) and RUN/classifier (weights/densenet121-multitask-v1);
# then both are scored on the test subsets.
set -euo pipefail
DATA=${DATA:-../shared/data}
source "$(dirname "$0")/_common.sh"

run=runs/multitask-v1
$PY -m bus_core train-seg --data "$DATA/BUSI" --split splits/busi.json \
  --data "$DATA/BUSBRA/labels.csv" --split splits/busbra.json \
  --init weights/densenet121-busi-v1 --out "$run" --epochs 16 --epoch-size 1200 \
  --device cpu-fp32 --size 192

for pair in segmenter:densenet121-unet-lesion-v1 classifier:densenet121-multitask-v1; do
  out="$RELEASE/${pair#*:}"
  rm -rf "$out" && cp -r "$run/${pair%%:*}" "$out"
  $PY -m bus_core evaluate --model "$out" --data "$DATA/BUSI" --split splits/busi.json \
    --subset test --json "$out/test-busi.json"
  $PY -m bus_core evaluate --model "$out" --data "$DATA/BUSBRA/labels.csv" \
    --split splits/busbra.json --subset test --json "$out/test-busbra.json"
done
