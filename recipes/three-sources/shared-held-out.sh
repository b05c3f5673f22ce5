#!/usr/bin/env bash
# One network or two for the first stage, chosen on a hospital the reading never saw: the
# two-hospital reading densenet121-context-v1 (lesion, whole-image and outline models trained on
# BUSI and BUS-BRA only) read with its own outline model (two first-stage networks, as released)
# and with an outline decoder trained, as shared-first-stage.sh does for the default, on its
# whole-image model's encoder, frozen, on BUSI and BUS-BRA (one network; the last epoch's
# decoder, as released). Both at the default's outline setting (0.7, 0.003); each reading's
# factor and threshold fitted on BUSI + BUS-BRA validation; both scored on BUS-UCLM's validation
# subset, and each outline model alone there. Last, as a bound rather than a choice, the
# one-network reading with the factor that BUS-UCLM's validation subset itself would give.
#     bash recipes/three-sources/shared-held-out.sh            # training (about 20 min on two
#                                                              # CPU cores), then the scores
#     STEP=score bash recipes/three-sources/shared-held-out.sh # the scores again
# A killed training continues with `python -m bus_core train-seg --resume --out $OUT/run`.
# Writes $OUT/run, $OUT/<reading>/ and $OUT/<reading>-*.json; shared_held_out_table.py prints
# the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
OUT=${OUT:-runs/shared-held-out}
STEP=${STEP:-train}
mkdir -p "$OUT"
if [ "$STEP" = train ]; then
    $PY -m bus_core train-seg ${TRAIN_ON[without-busuclm]} --out "$OUT/run" \
        --init weights/densenet121-multitask-v2 --freeze-encoder --cls-weight 0 --size 224 \
        --cache-size 256 --epochs "${EPOCHS:-12}" --epoch-size 1600 --batch-size 32 --lr 1e-3 \
        --normal-crops 0.2 --style-augment --ema 0.99 --device "$DEVICE" --seed 0 \
        --name densenet121-unet-shared-held-out --export-last > "$OUT/run.log" 2>&1
fi
declare -A OUTLINE=([two-networks]=weights/densenet121-unet-lesion-v1
                    [one-network]="$OUT/run/segmenter-last")
for reading in two-networks one-network; do
    pair_reading "$OUT/$reading" weights/densenet121-context-v1 weights/densenet121-multitask-v2 \
        "${OUTLINE[$reading]}" 0.7 0.003
    fit_pooled "$OUT/$reading/densenet121-context-v1" "$reading" ${MERGED[without-busuclm]}
    evaluate_into "$OUT/$reading/densenet121-context-v1" "$reading-busuclm-val" $BUSUCLM \
        --subset val
    evaluate_into "$OUT/$reading/$(basename "${OUTLINE[$reading]}")" \
        "$reading-outline-busuclm-val" $BUSUCLM --subset val
done
# The bound: the one-network reading, factor fitted on BUS-UCLM val itself (threshold kept)
rm -rf "$OUT/one-network-fitted-there" && cp -r "$OUT/one-network" "$OUT/one-network-fitted-there"
$PY recipes/three-sources/card_value.py "$OUT/one-network-fitted-there/densenet121-context-v1" \
    normal_odds_with_outline "$OUT/one-network-busuclm-val.json" fitted_normal_odds
evaluate_into "$OUT/one-network-fitted-there/densenet121-context-v1" \
    one-network-fitted-there-busuclm-val $BUSUCLM --subset val
