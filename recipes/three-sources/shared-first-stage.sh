#!/usr/bin/env bash
# The first stage as one network: an outline decoder trained on the three sources on top of the
# released whole-image model's encoder, frozen (`train-seg --freeze-encoder`), so that one
# encoder pass gives the outline and P(normal). Two candidates, the decoder of the epoch with
# the best validation score and that of the last epoch, each paired with the released lesion
# model, its factor on P(normal)'s odds and its sensitivity-first threshold fitted on the pooled
# validation subsets; after the choice on validation, the chosen one's test subsets read once
# and the release.
#     bash recipes/three-sources/shared-first-stage.sh                 # training (about 20 min
#                                                                      # on two CPU cores), pairing
#     STEP=pair bash recipes/three-sources/shared-first-stage.sh       # pairing and fitting again
#     STEP=release CHOSEN=last bash recipes/three-sources/shared-first-stage.sh  # test, release
# A killed training continues with `python -m bus_core train-seg --resume --out $OUT/run`.
# Writes $OUT/run (the training run), $OUT/<candidate>/ (the paired models) and $OUT/*.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
OUT=${OUT:-runs/shared-first-stage}
STEP=${STEP:-train}
WHOLE=densenet121-multitask-v3
OUTLINE=densenet121-unet-shared-v1
LESION=densenet121-context-v3
POOLED=${MERGED[all]}
evaluate() {  # evaluate MODEL JSON_NAME ARGS...: one evaluation, its JSON in $OUT
    local model=$1 name=$2
    shift 2
    $PY -m bus_core evaluate --model "$model" "$@" --device "$DEVICE" --json "$OUT/$name.json"
}
pair_and_fit() {  # pair_and_fit CANDIDATE SEGMENTER_FOLDER
    local c="$OUT/$1"
    rm -rf "$c" && mkdir -p "$c"
    cp -r "weights/$WHOLE" "$c/$WHOLE"
    cp -r "$2" "$c/$OUTLINE"
    cp -r weights/densenet121-context-v2 "$c/$LESION"  # the released lesion model's weights
    $PY recipes/three-sources/pair.py "$c/$LESION" "$WHOLE" "$OUTLINE" --name "$LESION"
    # as for the release: the factor on P(normal)'s odds, then the threshold
    evaluate "$c/$LESION" "$1-pooled-val-odds" $POOLED --subset val
    $PY recipes/three-sources/card_value.py "$c/$LESION" normal_odds_with_outline \
        "$OUT/$1-pooled-val-odds.json" fitted_normal_odds
    evaluate "$c/$LESION" "$1-pooled-val-threshold" $POOLED --subset val
    $PY recipes/three-sources/card_value.py "$c/$LESION" malignant_threshold \
        "$OUT/$1-pooled-val-threshold.json" fitted_threshold
    evaluate "$c/$LESION" "$1-pooled-val" $POOLED --subset val
    for source in BUSI BUSBRA BUSUCLM; do  # the outline model alone
        evaluate "$c/$OUTLINE" "$1-outline-$source-val" ${!source} --subset val
    done
}
if [ "$STEP" = train ]; then
    $PY -m bus_core train-seg $BUSI $BUSBRA $BUSUCLM --out "$OUT/run" --init "weights/$WHOLE" \
        --freeze-encoder --cls-weight 0 --size 224 --cache-size 256 --epochs "${EPOCHS:-12}" \
        --epoch-size 1600 --batch-size 32 --lr 1e-3 --normal-crops 0.2 --style-augment \
        --ema 0.99 --device "$DEVICE" --seed 0 --name "$OUTLINE" --export-last
fi
if [ "$STEP" = train ] || [ "$STEP" = pair ]; then
    pair_and_fit best "$OUT/run/segmenter"
    pair_and_fit last "$OUT/run/segmenter-last"
    # the released default on the same images, and its outline model alone
    evaluate weights/densenet121-context-v2 released-pooled-val $POOLED --subset val
    for source in BUSI BUSBRA BUSUCLM; do
        evaluate weights/densenet121-unet-lesion-v1 "released-outline-$source-val" ${!source} \
            --subset val
    done
fi
if [ "$STEP" = release ]; then
    evaluate "$OUT/$CHOSEN/$LESION" "$CHOSEN-pooled-test" $POOLED --subset test
    cp "$OUT/$CHOSEN-pooled-val.json" "$OUT/pooled-val.json"
    cp "$OUT/$CHOSEN-pooled-test.json" "$OUT/pooled-test.json"
    $PY recipes/three-sources/release_shared.py "$OUT/$CHOSEN" "$OUT" weights
fi
