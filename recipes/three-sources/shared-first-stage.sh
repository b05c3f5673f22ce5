#!/usr/bin/env bash
# The first stage as one network: an outline decoder trained on the three sources on top of the
# released whole-image model's encoder, frozen (`train-seg --freeze-encoder`), so that one
# encoder pass gives the outline and P(normal); then the released lesion model paired with it,
# its factor on P(normal)'s odds and its sensitivity-first threshold fitted on the pooled
# validation subsets; after the choice on validation, its test subsets read once and the release.
#     bash recipes/three-sources/shared-first-stage.sh               # training (about 20 min on
#                                                                    # two CPU cores), pairing
#     STEP=pair bash recipes/three-sources/shared-first-stage.sh     # pairing and fitting again
#     STEP=release bash recipes/three-sources/shared-first-stage.sh  # test subsets, release
# A killed training continues with `python -m bus_core train-seg --resume --out $OUT/run`.
# Writes $OUT/run (the training run), $OUT/candidate (the paired models) and $OUT/*.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
OUT=${OUT:-runs/shared-first-stage}
STEP=${STEP:-train}
WHOLE=densenet121-multitask-v3
OUTLINE=densenet121-unet-shared-v1
LESION=densenet121-context-v3
POOLED=${MERGED[all]}
C="$OUT/candidate"
evaluate() {  # evaluate MODEL JSON_NAME ARGS...: one evaluation, its JSON in $OUT
    local model=$1 name=$2
    shift 2
    $PY -m bus_core evaluate --model "$model" "$@" --device "$DEVICE" --json "$OUT/$name.json"
}
if [ "$STEP" = train ]; then
    $PY -m bus_core train-seg $BUSI $BUSBRA $BUSUCLM --out "$OUT/run" --init "weights/$WHOLE" \
        --freeze-encoder --cls-weight 0 --size 224 --cache-size 256 --epochs "${EPOCHS:-12}" \
        --epoch-size 1600 --batch-size 32 --lr 1e-3 --normal-crops 0.2 --style-augment \
        --ema 0.99 --device "$DEVICE" --seed 0 --name "$OUTLINE"
fi
if [ "$STEP" = train ] || [ "$STEP" = pair ]; then
    # the candidate: the released lesion model (same weights) read with the new outline model
    rm -rf "$C" && mkdir -p "$C"
    cp -r "weights/$WHOLE" "$C/$WHOLE"
    cp -r "$OUT/run/segmenter" "$C/$OUTLINE"
    cp -r weights/densenet121-context-v2 "$C/$LESION"
    $PY recipes/three-sources/pair.py "$C/$LESION" "$WHOLE" "$OUTLINE" --name "$LESION"
    # as for the release: the factor on P(normal)'s odds, then the threshold, pooled validation
    evaluate "$C/$LESION" pooled-val-odds $POOLED --subset val
    $PY recipes/three-sources/card_value.py "$C/$LESION" normal_odds_with_outline \
        "$OUT/pooled-val-odds.json" fitted_normal_odds
    evaluate "$C/$LESION" pooled-val-threshold $POOLED --subset val
    $PY recipes/three-sources/card_value.py "$C/$LESION" malignant_threshold \
        "$OUT/pooled-val-threshold.json" fitted_threshold
    evaluate "$C/$LESION" pooled-val $POOLED --subset val
    # the outline models, new and released, alone on each source's validation subset
    for source in BUSI BUSBRA BUSUCLM; do
        for model in "$C/$OUTLINE" weights/densenet121-unet-lesion-v1; do
            evaluate "$model" "outline-$(basename "$model")-$source-val" ${!source} --subset val
        done
    done
fi
if [ "$STEP" = release ]; then
    evaluate "$C/$LESION" pooled-test $POOLED --subset test
    $PY recipes/three-sources/release_shared.py "$C" "$OUT" weights
fi
