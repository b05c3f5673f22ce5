#!/usr/bin/env bash
# Leave-one-source-out scores: each run trained without one source is scored on that source's
# val and test images (which no model of the run has seen), as the app reads them (suggested
# outline, P(normal) from the whole image, benign vs malignant from the lesion model), at the
# factor on P(normal)'s odds and sensitivity-first threshold fitted on the pooled validation
# subsets of its training sources (both written into the lesion model's card, as for the release);
# also the lesion model alone on the experts' outlines and the outline model alone.
# Writes $RUNS/loso/<run>-<variant>-*.json; recipes/three-sources/loso_table.py tabulates them.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
mkdir -p "$RUNS/loso"
fold() {
    local run=$1 variant=$2 model="$RUNS/$1/lesion-$2" out="$RUNS/loso/$1-$2"
    # As for the release: the factor on P(normal)'s odds, then the threshold, each fitted on the
    # pooled validation subsets of the run's own sources.
    $PY -m bus_core evaluate --model "$model" ${MERGED[$run]} --subset val \
        --device "$DEVICE" --json "$out-pooled-val-odds.json" > "$out-pooled-val-odds.log" 2>&1
    $PY recipes/three-sources/card_value.py "$model" normal_odds_with_outline \
        "$out-pooled-val-odds.json" fitted_normal_odds
    $PY -m bus_core evaluate --model "$model" ${MERGED[$run]} --subset val \
        --device "$DEVICE" --json "$out-pooled-val.json" > "$out-pooled-val.log" 2>&1
    $PY recipes/three-sources/card_value.py "$model" malignant_threshold \
        "$out-pooled-val.json" fitted_threshold
    $PY -m bus_core evaluate --model "$model" ${HELD_OUT[$run]} --subset val+test \
        --device "$DEVICE" --json "$out-held-out.json" > "$out-held-out.log" 2>&1
    $PY -m bus_core evaluate --model "$model" ${HELD_OUT[$run]} --subset val+test \
        --input-mode lesion-context --device "$DEVICE" --json "$out-lesion-alone.json" \
        > "$out-lesion-alone.log" 2>&1
}
for run in ${LOSO_RUNS:-without-busi without-busbra without-busuclm}; do
    $PY -m bus_core evaluate --model "$RUNS/$run/segmenter" ${HELD_OUT[$run]} --subset val+test \
        --device "$DEVICE" --json "$RUNS/loso/$run-outline.json" > "$RUNS/loso/$run-outline.log" 2>&1 &
    for variant in ${VARIANTS:-dg plain}; do
        fold "$run" "$variant" &
    done
done
wait_all
