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
evaluate() {  # evaluate MODEL JSON_NAME ARGS...: one evaluation, its JSON in $OUT
    local model=$1 name=$2
    shift 2
    $PY -m bus_core evaluate --model "$model" "$@" --device "$DEVICE" --json "$OUT/$name.json" \
        > "$OUT/$name.log" 2>&1
}
with_setting() {  # with_setting OUTLINE_FOLDER THRESHOLD MIN_AREA: set its post-processing
    $PY - "$@" <<'PYTHON'
import json, sys
from pathlib import Path
from bus_core.models.card import CARD_FILE, read_card
folder, threshold, min_area = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
card = json.loads((folder / CARD_FILE).read_text())
card["postprocess"] |= {"threshold": threshold, "min_area": min_area}
(folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
read_card(folder)
PYTHON
}
fit() {  # fit LESION_MODEL NAME POOLED_ARGS...: factor, then threshold, on pooled validation
    local model=$1 name=$2
    shift 2
    evaluate "$model" "$name-pooled-val-odds" "$@" --subset val
    $PY recipes/three-sources/card_value.py "$model" normal_odds_with_outline \
        "$OUT/$name-pooled-val-odds.json" fitted_normal_odds
    evaluate "$model" "$name-pooled-val-threshold" "$@" --subset val
    $PY recipes/three-sources/card_value.py "$model" malignant_threshold \
        "$OUT/$name-pooled-val-threshold.json" fitted_threshold
}
pair() {  # pair FOLDER LESION WHOLE OUTLINE THRESHOLD MIN_AREA: the three models side by side
    local c=$1
    rm -rf "$c" && mkdir -p "$c"
    cp -r "weights/$2" "weights/$3" "weights/$4" "$c/"
    with_setting "$c/$4" "$5" "$6"
    $PY recipes/three-sources/pair.py "$c/$2" "$3" "$4"
}
for setting in $SETTINGS; do
    threshold=${setting%:*} min_area=${setting#*:}
    name="held-out-$setting"
    pair "$OUT/$name" densenet121-context-v1 densenet121-multitask-v2 densenet121-unet-lesion-v1 \
        "$threshold" "$min_area"
    fit "$OUT/$name/densenet121-context-v1" "$name" ${MERGED[without-busuclm]}
    evaluate "$OUT/$name/densenet121-context-v1" "$name-busuclm-val" $BUSUCLM --subset val
    name="default-$setting"
    pair "$OUT/$name" densenet121-context-v3 densenet121-multitask-v3 densenet121-unet-shared-v1 \
        "$threshold" "$min_area"
    fit "$OUT/$name/densenet121-context-v3" "$name" ${MERGED[all]}
    evaluate "$OUT/$name/densenet121-context-v3" "$name-pooled-val" ${MERGED[all]} --subset val
done
