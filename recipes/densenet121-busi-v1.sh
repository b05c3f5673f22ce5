#!/usr/bin/env bash
# densenet121-busi-v1: whole-image classifier of the first release (weights/densenet121-busi-v1).
# 1. pretraining on BUS-BRA's training patients (about 47 min on 2 CPU cores),
# 2. fine-tuning on BUSI's training subset (15 epochs, about 1 min each),
# 3. release: the model folder and its test figures (BUSI test; BUS-BRA test patients, the
#    card's 'external' figures).
set -euo pipefail
DATA=${DATA:-../shared/data}
source "$(dirname "$0")/_common.sh"

busbra_pretrain

$PY -m bus_core train --data "$DATA/BUSI" --split splits/busi.json --init runs/busbra-pretrain \
  --out runs/densenet121-busi --epochs 15 --batch-size 16 --lr 2e-4 --monitor macro_f1 \
  --name densenet121-busi-v1

out="$RELEASE/densenet121-busi-v1"
rm -rf "$out" && mkdir -p "$out"
cp runs/densenet121-busi/model.safetensors runs/densenet121-busi/card.json "$out/"
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSI" --split splits/busi.json \
  --subset test --json "$out/test.json"
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSBRA/labels.csv" \
  --split splits/busbra.json --subset test --json "$out/external.json"
