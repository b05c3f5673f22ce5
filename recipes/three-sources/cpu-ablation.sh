#!/usr/bin/env bash
# The domain-generalisation ablation at a size two CPU cores can run: the lesion model alone,
# each variant of VARIANTS (see common.sh) trained from random weights on the sources of one
# leave-one-source-out run (FOLD, default without-busbra: trained on BUSI and BUS-UCLM), then
# scored on the left-out source's validation subset with the experts' outlines, which no
# variant saw. No first stage is trained, so the variants differ by their own training alone;
# the figures are of this smaller recipe, not of the released one (which starts the lesion
# model from a first stage trained on its sources). Settings: EPOCHS (default 12), SIZE,
# WORKERS, VARIANTS, FOLD, RUNS. Writes $RUNS/cpu-ablation/<fold>-<variant>/ (the model) and
# <fold>-<variant>-val.json; cpu_ablation_table.py prints the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
FOLD=${FOLD:-without-busbra}
EPOCHS=${EPOCHS:-12}
SIZE=${SIZE:-160}
OUT="$RUNS/cpu-ablation"
mkdir -p "$OUT"
VARIANTS=${VARIANTS:-$ALL_VARIANTS}
check_variants VARIANT $VARIANTS
for variant in $VARIANTS; do
    model="$OUT/$FOLD-$variant"
    train_once train "$model" "$model/card.json" "$model.log" ${MERGED[$FOLD]} --init random \
        --input-mode lesion-context --fit pad --resize "$SIZE" --crop "$SIZE" \
        --tissue-share 0.1 --monitor auc_malignant --epochs "$EPOCHS" \
        --batch-size 64 --lr 2e-4 --scheduler cosine ${VARIANT[$variant]} \
        --workers "${WORKERS:-1}" --device "$DEVICE" --seed 0
    $PY -m bus_core evaluate --model "$model" ${HELD_OUT[$FOLD]} --subset val \
        --input-mode lesion-context --device "$DEVICE" --json "$model-val.json" \
        > "$model-val.log" 2>&1
done
