#!/usr/bin/env bash
# The outline model's post-processing for the two-stage reading, chosen for a hospital the
# reading never saw. For each SETTINGS entry "threshold:smallest-component" (share of the image):
#   held-out: the two-hospital reading densenet121-context-v1 (its lesion, whole-image and
#     outline models trained on BUSI and BUS-BRA only) with its outline model at the setting;
#     factor on P(normal)'s odds and threshold fitted on BUSI + BUS-BRA validation as for a
#     release; scored on BUS-UCLM's validation subset, a hospital none of its models saw;
#   default: densenet121-context-v3 with densenet121-unet-shared-v1 at the setting, fitted the
#     same way on the three sources' pooled validation subsets and scored there.
# Writes $OUT/<held-out|default>-<setting>/ (the models) and their JSONs;
# outline_setting_table.py prints the tables.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
OUT=${OUT:-runs/outline-setting}
SETTINGS=${SETTINGS:-0.7:0.003 0.5:0.003 0.3:0}
mkdir -p "$OUT"
for setting in $SETTINGS; do
    threshold=${setting%:*} min_area=${setting#*:}
    name="held-out-$setting"
    pair_reading "$OUT/$name" weights/densenet121-context-v1 weights/densenet121-multitask-v2 \
        weights/densenet121-unet-lesion-v1 "$threshold" "$min_area"
    fit_pooled "$OUT/$name/densenet121-context-v1" "$name" ${MERGED[without-busuclm]}
    evaluate_into "$OUT/$name/densenet121-context-v1" "$name-busuclm-val" $BUSUCLM --subset val
    name="default-$setting"
    pair_reading "$OUT/$name" weights/densenet121-context-v3 weights/densenet121-multitask-v3 \
        weights/densenet121-unet-shared-v1 "$threshold" "$min_area"
    fit_pooled "$OUT/$name/densenet121-context-v3" "$name" ${MERGED[all]}
    evaluate_into "$OUT/$name/densenet121-context-v3" "$name-pooled-val" ${MERGED[all]} \
        --subset val
done
