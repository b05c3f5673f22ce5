#!/usr/bin/env bash
# The first stage's ablation at a size two CPU cores can run: the one-network first stage
# (outline + whole-image class, `train-seg`) trained from random weights without BUS-UCLM (on
# BUSI and BUS-BRA), once per variant of VARIANTS (FIRST_STAGE_VARIANT in common.sh), then
# probed on BUS-UCLM's validation subset, a hospital it never saw, for how well it tells lesion
# images from normal ones (first_stage_probe.py). Settings: EPOCHS (default 12), EPOCH_SIZE
# (800), SIZE (128), VARIANTS. Writes $RUNS/cpu-first-stage/<variant>/ (segmenter/ and
# classifier/), <variant>.log and <variant>-probe.md (its table).
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
EPOCHS=${EPOCHS:-12}
EPOCH_SIZE=${EPOCH_SIZE:-800}
SIZE=${SIZE:-128}
OUT="$RUNS/cpu-first-stage"
mkdir -p "$OUT"
VARIANTS=${VARIANTS:-plain style mixstyle ema}
check_variants FIRST_STAGE_VARIANT $VARIANTS
for variant in $VARIANTS; do
    run="$OUT/$variant"
    train_once train-seg "$run" "$run/classifier/card.json" "$run.log" \
        ${TRAIN_ON[without-busuclm]} --init random --train-stem --size "$SIZE" \
        --cache-size $((SIZE * 8 / 7)) --epochs "$EPOCHS" --epoch-size "$EPOCH_SIZE" \
        --batch-size 32 --lr 1e-3 --encoder-lr 1e-3 --cls-weight 2 --normal-crops 0.2 \
        ${FIRST_STAGE_VARIANT[$variant]} --device "$DEVICE" --seed 0
    $PY recipes/three-sources/first_stage_probe.py "$run/classifier" "$run/segmenter" \
        "$DATA/BUSUCLM/labels.csv" splits/busuclm.json --name "$variant" > "$run-probe.md"
done
