# Shared settings of the three-source recipe (sourced by the other scripts).
# DATA: the folder holding BUSI/, BUSBRA/ and BUSUCLM/ (the data sets, or their compact copy
# made by recipes/compact_copy.py); RUNS: where the runs go; DEVICE: cuda, cpu, ...
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/three-sources}
DEVICE=${DEVICE:-auto}
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the recipes import bus_core
BUSI="--data $DATA/BUSI --split splits/busi.json"
BUSBRA="--data $DATA/BUSBRA/labels.csv --split splits/busbra.json"
BUSUCLM="--data $DATA/BUSUCLM/labels.csv --split splits/busuclm.json"
# Each run by the sources it trains on: all three (the released models) or two, leaving one out.
declare -A TRAIN_ON=(
    [all]="$BUSI $BUSBRA $BUSUCLM"
    [without-busi]="$BUSBRA $BUSUCLM"
    [without-busbra]="$BUSI $BUSUCLM"
    [without-busuclm]="$BUSI $BUSBRA"
)
# train (one merged split for the lesion model): the data and the merged split of each run
declare -A MERGED=(
    [all]="--data $DATA/BUSI --data $DATA/BUSBRA/labels.csv --data $DATA/BUSUCLM/labels.csv --split splits/busi+busbra+busuclm.json"
    [without-busi]="--data $DATA/BUSBRA/labels.csv --data $DATA/BUSUCLM/labels.csv --split splits/busbra+busuclm.json"
    [without-busbra]="--data $DATA/BUSI --data $DATA/BUSUCLM/labels.csv --split splits/busi+busuclm.json"
    [without-busuclm]="--data $DATA/BUSI --data $DATA/BUSBRA/labels.csv --split splits/busi+busbra.json"
)
# The left-out source of each leave-one-source-out run, with its own split file.
declare -A HELD_OUT=(
    [without-busi]="$BUSI"
    [without-busbra]="$BUSBRA"
    [without-busuclm]="$BUSUCLM"
)
RUN_NAMES="all without-busi without-busbra without-busuclm"
# The lesion-model variants (train options beyond the common ones), each one method or all:
#   plain     the earlier recipe's light augmentation, class-balanced sampling
#   ema       plain + weight averaging (warmed up, so that short runs average their own steps)
#   mixstyle  plain + MixStyle (feature statistics mixed between sources) in half the batches
#   style     plain + ultrasound and scanner-style augmentation (gain, speckle, tint,
#             resolution, time-gain bands)
#   balanced  plain, sampling every (source, class) cell alike instead of every class
#   dg        plain + ultrasound and scanner-style augmentation + weight averaging
declare -A VARIANT=(
    [plain]="--balance sampler"
    [ema]="--balance sampler --ema 0.995 --ema-warmup"
    [mixstyle]="--balance sampler --mixstyle 0.5"
    [style]="--balance sampler --ultrasound-augment 1 --style-augment"
    [balanced]="--balance source-class"
    [dg]="--balance sampler --ultrasound-augment 1 --style-augment --ema 0.995 --ema-warmup"
)
# Every lesion-model variant, in the order the tables list them.
ALL_VARIANTS="plain ema mixstyle style balanced dg"
# The first-stage variants of cpu-first-stage.sh (train-seg options beyond the common ones):
#   plain     no scanner-style augmentation, no weight averaging
#   style     plain + scanner-style augmentation (as the released first stage)
#   mixstyle  plain + MixStyle (feature statistics mixed between sources) in half the batches
#   ema       plain + weight averaging at the released first stage's decay, warmed up
declare -A FIRST_STAGE_VARIANT=(
    [plain]=""
    [style]="--style-augment"
    [mixstyle]="--mixstyle 0.5"
    [ema]="--ema 0.998 --ema-warmup"
)
# check_variants TABLE NAME...: refuse a NAME that is not a key of the array TABLE (exit 2).
check_variants() {
    local -n known=$1
    shift
    local variant
    for variant in "$@"; do
        if [[ -z ${known[$variant]+set} ]]; then
            echo "Unknown variant '$variant'; choose from: ${!known[*]}" >&2
            exit 2
        fi
    done
}
mkdir -p "$RUNS"
# Wait for every background job; fail when any of them failed (plain `wait` reports success).
wait_all() {
    local failed=0 pid
    for pid in $(jobs -p); do wait "$pid" || failed=1; done
    return $failed
}
# train_once COMMAND OUT DONE LOG ARGS...: `bus_core COMMAND --out OUT ARGS...` (train or
# train-seg) into LOG, unless the file DONE shows it finished; a killed run (OUT/train) goes on
# with --resume instead, appending to LOG
train_once() {
    local command=$1 out=$2 done=$3 log=$4
    shift 4
    if [[ -f "$done" ]]; then
        return 0
    elif [[ -d "$out/train" ]]; then
        $PY -m bus_core "$command" --out "$out" --resume >> "$log" 2>&1
    else
        $PY -m bus_core "$command" --out "$out" "$@" > "$log" 2>&1
    fi
}
# The reading experiments' steps (outline-setting.sh, shared-held-out.sh); each writes into $OUT.
# evaluate_into MODEL JSON_NAME ARGS...: one evaluation, its JSON and log in $OUT
evaluate_into() {
    local model=$1 name=$2
    shift 2
    $PY -m bus_core evaluate --model "$model" "$@" --device "$DEVICE" --json "$OUT/$name.json" \
        > "$OUT/$name.log" 2>&1
}
# fit_pooled LESION_MODEL NAME POOLED_ARGS...: factor on P(normal)'s odds, then threshold, fitted
# on the pooled validation subsets and written into the card, as for a release
fit_pooled() {
    local model=$1 name=$2
    shift 2
    evaluate_into "$model" "$name-pooled-val-odds" "$@" --subset val
    $PY recipes/three-sources/card_value.py "$model" normal_odds_with_outline \
        "$OUT/$name-pooled-val-odds.json" fitted_normal_odds
    evaluate_into "$model" "$name-pooled-val-threshold" "$@" --subset val
    $PY recipes/three-sources/card_value.py "$model" malignant_threshold \
        "$OUT/$name-pooled-val-threshold.json" fitted_threshold
}
# pair_reading FOLDER LESION_DIR WHOLE_DIR OUTLINE_DIR THRESHOLD MIN_AREA: copies of the three
# models in FOLDER, the outline model's post-processing set, the lesion model paired with both
pair_reading() {
    local c=$1 outline
    outline=$(basename "$4")
    rm -rf "$c" && mkdir -p "$c"
    cp -r "$2" "$3" "$4" "$c/"
    $PY - "$c/$outline" "$5" "$6" <<'PYTHON'
import json, sys
from pathlib import Path
from bus_core.models.card import CARD_FILE, read_card
folder, threshold, min_area = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
card = json.loads((folder / CARD_FILE).read_text())
card["postprocess"] |= {"threshold": threshold, "min_area": min_area}
(folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
read_card(folder)
PYTHON
    $PY recipes/three-sources/pair.py "$c/$(basename "$2")" "$(basename "$3")" "$outline"
}
