#!/usr/bin/env bash
# The second stage: the lesion model, which reads the lesion and the tissue around its outline
# (`--input-mode lesion-context`), started from the same run's first-stage classifier. Each
# variant of VARIANTS (default "dg plain"; the variants are in common.sh) is trained for every
# run, all at once, and compared on the left-out sources. Writes $RUNS/<run>/lesion-<variant>.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
EPOCHS=${EPOCHS:-20}
SIZE=${SIZE:-160}
check_variants VARIANT ${VARIANTS:-dg plain}
for run in ${RUNS_TO_TRAIN:-$RUN_NAMES}; do
    for variant in ${VARIANTS:-dg plain}; do
        $PY -m bus_core train ${MERGED[$run]} --out "$RUNS/$run/lesion-$variant" \
            --name densenet121-context-v2 --init "$RUNS/$run/classifier" \
            --input-mode lesion-context --fit pad --resize "$SIZE" --crop "$SIZE" \
            --tissue-share 0.1 --monitor auc_malignant --epochs "$EPOCHS" \
            --batch-size 64 --lr 2e-4 --scheduler cosine ${VARIANT[$variant]} \
            --workers "${WORKERS:-2}" --time-limit "${TIME_LIMIT:-0}" --device "$DEVICE" --seed 0 \
            > "$RUNS/$run-lesion-$variant.log" 2>&1 &
    done
done
wait_all
for run in ${RUNS_TO_TRAIN:-$RUN_NAMES}; do
    for variant in ${VARIANTS:-dg plain}; do
        $PY recipes/three-sources/pair.py "$RUNS/$run/lesion-$variant" classifier segmenter
    done
done
