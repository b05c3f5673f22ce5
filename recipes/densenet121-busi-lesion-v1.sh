#!/usr/bin/env bash
# densenet121-busi-lesion-v1: lesion-crop model of the first release, leak-free masking
# (weights/densenet121-busi-lesion-v1). The same pretraining and fine-tuning as
# densenet121-busi-v1.sh, with --input-mode mask-leakfree; then its test figures with BUSI's and
# BUS-BRA's expert masks.
set -euo pipefail
DATA=${DATA:-../shared/data}
source "$(dirname "$0")/_common.sh"

busbra_pretrain

$PY -m bus_core train --data "$DATA/BUSI" --split splits/busi.json --init runs/busbra-pretrain \
  --out runs/cmp-mask-leakfree --epochs 15 --batch-size 16 --lr 2e-4 --monitor macro_f1 \
  --input-mode mask-leakfree --name densenet121-busi-lesion-v1

out="$RELEASE/densenet121-busi-lesion-v1"
rm -rf "$out" && mkdir -p "$out"
cp runs/cmp-mask-leakfree/model.safetensors runs/cmp-mask-leakfree/card.json "$out/"
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSI" --split splits/busi.json \
  --subset test --json "$out/test.json"
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSBRA/labels.csv" \
  --split splits/busbra.json --subset test --json "$out/external.json"
