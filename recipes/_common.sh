# Shared by the recipes (sourced, not run): the data folder, the Python and the project root.
# DATA: the folder holding BUSI/ and BUSBRA/ (see the README's "Data" section).
DATA=${DATA:-../shared/data}
PY=${PY:-python}
# Released folders are written here, never over the bundled weights/ (compare, then copy).
RELEASE=${RELEASE:-runs/release}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$RELEASE"
