#!/usr/bin/env bash
# Score two-stage models as the app reads images (suggested outline, P(normal) from the whole
# image, benign vs malignant from the lesion model) on one subset of each source's own split:
#     SUBSET=val bash recipes/three-sources/score.sh OUT_FOLDER MODEL [MODEL ...]
# writes OUT_FOLDER/<model folder name>-<source>-<subset>.json (and .log), and with
# SUBSET=test also at THRESHOLD (the pooled-validation threshold of the card).
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
SUBSET=${SUBSET:-val}
out=$1
shift
mkdir -p "$out"
declare -A SOURCE=([busi]="$BUSI" [busbra]="$BUSBRA" [busuclm]="$BUSUCLM")
for model in "$@"; do
    name=$(basename "$model")
    for source in busi busbra busuclm; do
        $PY -m bus_core evaluate --model "$model" ${SOURCE[$source]} --subset "$SUBSET" \
            ${THRESHOLD:+--malignant-threshold "$THRESHOLD"} --device "$DEVICE" \
            --json "$out/$name-$source-$SUBSET.json" > "$out/$name-$source-$SUBSET.log" 2>&1
    done
done
