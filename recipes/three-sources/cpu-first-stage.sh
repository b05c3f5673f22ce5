#!/usr/bin/env bash
# The first stage's ablation at a size two CPU cores can run: the one-network first stage
# (outline + whole-image class, `train-seg`) trained from random weights without BUS-UCLM (on
# BUSI and BUS-BRA), once per variant of FIRST_STAGE_VARIANTS, then probed on BUS-UCLM's
# validation subset, a hospital it never saw, for how well it tells lesion images from normal
# ones (first_stage_probe.py). Settings: EPOCHS (default 12), EPOCH_SIZE (800), SIZE (128),
# VARIANTS. Writes $RUNS/cpu-first-stage/<variant>/ (segmenter/ and classifier/),
# <variant>.log and <variant>-probe.md (the table rows).
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
EPOCHS=${EPOCHS:-12}
EPOCH_SIZE=${EPOCH_SIZE:-800}
SIZE=${SIZE:-128}
OUT="$RUNS/cpu-first-stage"
# The variants (train-seg options beyond the common ones):
#   plain  no scanner-style augmentation, no weight averaging
#   style     plain + scanner-style augmentation (as the released first stage)
#   mixstyle  plain + MixStyle (feature statistics mixed between sources) in half the batches
#   ema       plain + weight averaging at the released first stage's decay, warmed up
declare -A FIRST_STAGE_VARIANTS=(
    [plain]=""
    [style]="--style-augment"
    [mixstyle]="--mixstyle 0.5"
    [ema]="--ema 0.998 --ema-warmup"
)
mkdir -p "$OUT"
for variant in ${VARIANTS:-plain style mixstyle ema}; do
    if [[ -z ${FIRST_STAGE_VARIANTS[$variant]+set} ]]; then
        echo "Unknown first-stage variant '$variant'; choose from: ${!FIRST_STAGE_VARIANTS[*]}" >&2
        exit 2
    fi
    run="$OUT/$variant"
    if [[ -d "$run" && ! -f "$run/classifier/card.json" ]]; then  # a killed run goes on
        $PY -m bus_core train-seg --out "$run" --resume >> "$run.log" 2>&1
    elif [[ ! -f "$run/classifier/card.json" ]]; then
        $PY -m bus_core train-seg ${TRAIN_ON[without-busuclm]} --out "$run" --init random \
            --train-stem --size "$SIZE" --cache-size $((SIZE * 8 / 7)) --epochs "$EPOCHS" \
            --epoch-size "$EPOCH_SIZE" --batch-size 32 --lr 1e-3 --encoder-lr 1e-3 \
            --cls-weight 2 --normal-crops 0.2 ${FIRST_STAGE_VARIANTS[$variant]} \
            --device "$DEVICE" --seed 0 > "$run.log" 2>&1
    fi
    $PY recipes/three-sources/first_stage_probe.py "$run/classifier" "$run/segmenter" \
        "$DATA/BUSUCLM/labels.csv" splits/busuclm.json --name "$variant" > "$run-probe.md"
done
