#!/usr/bin/env bash
# The domain-generalisation ablation, in one call: the three leave-one-source-out first stages,
# then every lesion-model variant of VARIANTS on each (all from the same first stage, so that
# the variants differ in their own training alone), the left-out sources' scores, and the table
# (also written to $RUNS/loso/table.md). Stage settings: FIRST_EPOCHS, FIRST_TIME_LIMIT,
# EPOCH_SIZE (first stage); EPOCHS, TIME_LIMIT, WORKERS (lesion models); minutes of training
# per run for the limits, 0 for none.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/three-sources/common.sh
export RUNS_TO_TRAIN=${RUNS_TO_TRAIN:-without-busi without-busbra without-busuclm}
export LOSO_RUNS=${LOSO_RUNS:-$RUNS_TO_TRAIN}
export VARIANTS=${VARIANTS:-$ALL_VARIANTS}
EPOCHS=${FIRST_EPOCHS:-30} TIME_LIMIT=${FIRST_TIME_LIMIT:-0} \
    bash recipes/three-sources/first-stage.sh
bash recipes/three-sources/lesion.sh
bash recipes/three-sources/loso.sh
$PY recipes/three-sources/loso_table.py "$RUNS/loso" | tee "$RUNS/loso/table.md"
