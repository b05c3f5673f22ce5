"""Release the three-source run as bundled models: copy the first stage and the chosen lesion
model into weights/ under their names, pair them, and write into the lesion model's card the
threshold and figures of the two-stage reading on the full-size data sets (score.sh's JSON).

    python recipes/three-sources/release.py RUN LESION_VARIANT SCORES WEIGHTS
    e.g. python recipes/three-sources/release.py runs/three-sources/all plain runs/release weights
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bus_core.models import CARD_FILE, read_card

SOURCES = {"busi": ("BUSI", "$DATA/BUSI"), "busbra": ("BUSBRA", "$DATA/BUSBRA/labels.csv"),
           "busuclm": ("BUSUCLM", "$DATA/BUSUCLM/labels.csv")}
TRAINING_DATA = {
    "sources": [place for _, place in SOURCES.values()],
    "subset": "train",
    "copy": "trained on the compact copy of recipes/compact_copy.py (longest side 320 px, "
            "JPEG quality 80); every figure in this card's 'val', 'test' and 'by_source' is "
            "on the full-size images",
    "licences": "BUSI: see its Kaggle page; BUS-BRA: see its LICENSE.txt; BUS-UCLM: CC BY-NC "
                "4.0 (non-commercial research use; cite Vallez et al., Scientific Data 2025)",
}
RECIPE = ("Recipe: recipes/three-sources/ (compact copy, first-stage.sh, lesion.sh, score.sh, "
          "release.py). Trained on BUSI, BUS-BRA and BUS-UCLM; BUS-UCLM is licensed CC BY-NC "
          "4.0, so this model is for non-commercial research use.")
NAMES = {"segmenter": "densenet121-unet-lesion-v2", "classifier": "densenet121-multitask-v3",
         "lesion": "densenet121-context-v2"}


def _card(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CARD_FILE).read_text())


def _write(folder: Path, card: dict[str, Any]) -> None:
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    read_card(folder)  # still a valid card


def _copy(source: Path, target: Path) -> dict[str, Any]:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("train"))
    return _card(target)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def main() -> None:
    """Copy, pair and write the cards."""
    run, variant, scores, weights = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), \
        Path(sys.argv[4])
    for part in ("segmenter", "classifier"):
        card = _copy(run / part, weights / NAMES[part])
        card["training_data"] = TRAINING_DATA
        card["notes"] = f"{card['notes']} {RECIPE}"
        card["metrics"]["computed_on"] = "the compact copy (see training_data.copy)"
        _write(weights / NAMES[part], card)
    target = weights / NAMES["lesion"]
    card = _copy(run / f"lesion-{variant}", target)
    pooled_val = _json(scores / "pooled-val.json")
    threshold = pooled_val["fitted_threshold"]
    alone = {k: card["metrics"][k] for k in ("val", "test") if k in card["metrics"]}
    card["metrics"] = {
        "val": pooled_val, "test": _json(scores / "pooled-test.json"),
        "by_source": {name: {subset: _json(scores / subset / f"lesion-{variant}-{key}-"
                                           f"{subset}.json") for subset in ("val", "test")}
                      for key, (name, _) in SOURCES.items()},
        "threshold_rule": "highest P(malignant) threshold with malignant sensitivity >= 0.90 "
                          "on the pooled validation subsets, two-stage reading on suggested "
                          "outlines",
        "history": card["metrics"].get("history", []),
        "lesion_model_alone": {"note": "the lesion model alone on the experts' outlines, on the "
                                       "compact copy", "malignant_threshold":
                               card["malignant_threshold"], **alone},
    }
    card.update(name=NAMES["lesion"], malignant_threshold=threshold,
                two_stage={"whole_image_model": NAMES["classifier"],
                           "outline_model": NAMES["segmenter"]},
                init=f"{NAMES['classifier']} (the first stage of the same run)",
                training_data=TRAINING_DATA, notes=f"{card['notes']} {RECIPE}")
    _write(target, card)
    print(f"Released {', '.join(NAMES.values())} into {weights}; threshold {threshold:.4f}")


if __name__ == "__main__":
    main()
