# Shared by the recipes (sourced, not run): the data folder, the Python and the project root.
# DATA: the folder holding BUSI/ and BUSBRA/ (see the README's "Data" section).
DATA=${DATA:-../shared/data}
PY=${PY:-python}
# Released folders are written here, never over the bundled weights/ (compare, then copy).
RELEASE=${RELEASE:-runs/release}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$RELEASE"

# The first release's pretraining on BUS-BRA's training patients (once; both of its models start
# from it).
busbra_pretrain() {
  [ -f runs/busbra-pretrain/model.safetensors ] ||
    $PY -m bus_core train --data "$DATA/BUSBRA/labels.csv" --split splits/busbra.json \
      --out runs/busbra-pretrain --epochs 5 --batch-size 32 --lr 1e-3 --monitor auc_malignant \
      --save-dtype float32
}
