#!/usr/bin/env bash
# The second stage: the lesion model, which reads the lesion and the tissue around its outline
# (`--input-mode lesion-context`), started from the same run's first-stage classifier. Each
# variant of VARIANTS (default "dg plain") is trained for every run, all at once, and compared on
# the left-out sources:
#   plain     the earlier recipe's light augmentation, class-balanced sampling
#   ema       plain + weight averaging
#   mixstyle  plain + MixStyle (feature statistics mixed between sources) in half the batches
#   balanced  plain, sampling every (source, class) cell alike instead of every class
#   dg        plain + ultrasound and scanner-style augmentation + weight averaging
# Writes $RUNS/<run>/lesion-<variant>.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
EPOCHS=${EPOCHS:-20}
SIZE=${SIZE:-160}
declare -A VARIANT=(
    [plain]="--balance sampler"
    [ema]="--balance sampler --ema 0.995"
    [mixstyle]="--balance sampler --mixstyle 0.5"
    [balanced]="--balance source-class"
    [dg]="--balance sampler --ultrasound-augment 1 --style-augment --ema 0.995"
)
for variant in ${VARIANTS:-dg plain}; do
    if [[ -z ${VARIANT[$variant]+set} ]]; then
        echo "Unknown lesion-model variant '$variant'; choose from: ${!VARIANT[*]}" >&2
        exit 2
    fi
done
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
