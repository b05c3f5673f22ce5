#!/usr/bin/env bash
# The first stage: one DenseNet121 U-Net with a class head (outline + normal / benign /
# malignant of the whole image), trained from random weights on the three sources (run "all",
# released) and on each pair of them (leave-one-source-out), all four at once.
# Writes $RUNS/<run>/segmenter and $RUNS/<run>/classifier (see `train-seg`).
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
EPOCHS=${EPOCHS:-30}
EPOCH_SIZE=${EPOCH_SIZE:-1600}
SIZE=${SIZE:-224}
for run in ${RUNS_TO_TRAIN:-$RUN_NAMES}; do
    $PY -m bus_core train-seg ${TRAIN_ON[$run]} --out "$RUNS/$run" --init random --train-stem \
        --size "$SIZE" --cache-size $((SIZE * 8 / 7)) --epochs "$EPOCHS" --epoch-size "$EPOCH_SIZE" \
        --batch-size 32 --lr 1e-3 --encoder-lr 1e-3 --cls-weight 2 --normal-crops 0.2 \
        --style-augment --ema 0.998 --time-limit "${TIME_LIMIT:-0}" --device "$DEVICE" --seed 0 \
        --name densenet121-unet-lesion-v2 --classifier-name densenet121-multitask-v3 \
        > "$RUNS/$run-first-stage.log" 2>&1 &
done
wait_all
