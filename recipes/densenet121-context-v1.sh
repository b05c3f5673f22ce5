#!/usr/bin/env bash
# densenet121-context-v1: the lesion-context model and the default two-stage reading
# (weights/DEFAULT). Training: 3 epochs from the bundled densenet121-multitask-v2 at 128 px on
# BUSI + BUS-BRA (about 25 minutes on 2 CPU cores). Release: the card names its whole-image and
# outline models (two_stage), its threshold is the one the two-stage reading fits on the pooled
# validation subsets (0.2397 for the bundled model), then the test subsets are read once (about
# 10 minutes). The card's metrics hold the figures of these evaluate outputs.
set -euo pipefail
DATA=${DATA:-../shared/data}
source "$(dirname "$0")/_common.sh"

$PY -m bus_core train --data "$DATA/BUSI" --data "$DATA/BUSBRA/labels.csv" \
  --split splits/busi+busbra.json --out runs/context-v1 --input-mode lesion-context --fit pad \
  --resize 128 --crop 128 --tissue-share 0.1 --init weights/densenet121-multitask-v2 \
  --balance sampler --epochs 3 --lr 1e-4 --monitor auc_malignant

out="$RELEASE/densenet121-context-v1"
rm -rf "$out" && mkdir -p "$out"
cp runs/context-v1/model.safetensors runs/context-v1/card.json "$out/"
both=(--data "$DATA/BUSI" --data "$DATA/BUSBRA/labels.csv" --split splits/busi+busbra.json)

# the lesion model alone on expert outlines (the card's metrics.lesion_model_alone)
for subset in val test; do
  $PY -m bus_core evaluate --model "$out" "${both[@]}" --subset "$subset" --masks expert \
    --input-mode lesion-context --json "$out/alone-$subset.json"
done

# does the outline's shape matter? (expert, dilated and box outlines, each data set)
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSI" --split splits/busi.json \
  --subset test --outline-check --json "$out/outline-check-busi.json"
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSBRA/labels.csv" \
  --split splits/busbra.json --subset test --outline-check --json "$out/outline-check-busbra.json"

# name the pair: the whole-image model for P(normal), the outline model for the outline
$PY - "$out/card.json" <<'PYEOF'
import json, sys
card = json.load(open(sys.argv[1]))
card["name"] = "densenet121-context-v1"
card["two_stage"] = {"whole_image_model": "densenet121-multitask-v2",
                     "outline_model": "densenet121-unet-lesion-v1"}
json.dump(card, open(sys.argv[1], "w"), indent=2)
PYEOF

# the two-stage reading on validation: its fitted threshold becomes the card's
$PY -m bus_core evaluate --model "$out" "${both[@]}" --subset val --json "$out/val.json"
$PY - "$out/card.json" "$out/val.json" <<'PYEOF'
import json, sys
card, val = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
card["malignant_threshold"] = val["fitted_threshold"]
json.dump(card, open(sys.argv[1], "w"), indent=2)
PYEOF

# the test subsets, read once: each data set, and both together
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSI" --split splits/busi.json \
  --subset test --json "$out/test-busi.json"
$PY -m bus_core evaluate --model "$out" --data "$DATA/BUSBRA/labels.csv" \
  --split splits/busbra.json --subset test --json "$out/test-busbra.json"
$PY -m bus_core evaluate --model "$out" "${both[@]}" --subset test --json "$out/test.json"
