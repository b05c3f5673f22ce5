"""Release a chosen two-stage candidate as bundled models: its lesion model and its run's
first-stage classifier (and the run's outline model when the candidate reads with it) go into
weights/ under their names, paired by those names, and the lesion model's card gets the figures
of the two-stage reading on the full-size data sets.

    python recipes/three-sources/release.py CANDIDATE SCORES WEIGHTS

CANDIDATE: a lesion model folder beside its run's `classifier` (and `segmenter`), whose card
names the pair (pair.py) and holds the fitted threshold and factor on P(normal)'s odds; SCORES:
the folder with `pooled-val.json` and `pooled-test.json` (`evaluate --json` of the candidate on
`splits/busi+busbra+busuclm.json`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bus_core.models.card import CARD_FILE, read_card

LICENCES = ("BUSI: see its Kaggle page; BUS-BRA: see its LICENSE.txt; BUS-UCLM: CC BY-NC 4.0 "
            "(non-commercial research use; cite Vallez et al., Scientific Data 2025)")
TRAINING_DATA = {
    "sources": ["$DATA/BUSI", "$DATA/BUSBRA/labels.csv", "$DATA/BUSUCLM/labels.csv"],
    "subset": "train",
    "copy": "trained on the compact copy of recipes/compact_copy.py (longest side 320 px, "
            "JPEG quality 80)",
    "licences": LICENCES,
}
RECIPE = ("Recipe: recipes/three-sources/ (compact copy, first-stage.sh, lesion.sh, score.sh, "
          "release.py). Trained on BUSI, BUS-BRA and BUS-UCLM; BUS-UCLM is licensed CC BY-NC "
          "4.0, so this model is for non-commercial research use.")
NAMES = {"segmenter": "densenet121-unet-lesion-v2", "classifier": "densenet121-multitask-v3",
         "lesion": "densenet121-context-v2"}


def card_of(folder: Path) -> dict[str, Any]:
    """The card of the model folder `folder`, as JSON."""
    return json.loads((folder / CARD_FILE).read_text())


def write_card(folder: Path, card: dict[str, Any]) -> None:
    """Write `card` into `folder`, checked to read back as a valid card."""
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    read_card(folder)


def copy_model(source: Path, target: Path) -> dict[str, Any]:
    """Copy the model folder `source` to `target` (replacing it), without a run's `train/` or
    a README (a model's card in words is written by hand for each release); its card."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("train", "README.md"))
    return card_of(target)


def _release_first_stage(run: Path, part: str, weights: Path) -> str:
    """Copy the run's `part` (classifier or segmenter) into weights/ under its name."""
    card = copy_model(run / part, weights / NAMES[part])
    card.update(training_data=TRAINING_DATA, notes=f"{card['notes']} {RECIPE}")
    card["metrics"]["computed_on"] = "the compact copy (see training_data.copy)"
    write_card(weights / NAMES[part], card)
    return NAMES[part]


def main() -> None:
    """Copy, pair and write the cards."""
    candidate, scores, weights = (Path(a) for a in sys.argv[1:4])
    card = card_of(candidate)
    pair = {key: _release_first_stage(candidate.parent, name, weights)
            if name in ("classifier", "segmenter") else name
            for key, name in card["two_stage"].items()}
    alone = {k: card["metrics"][k] for k in ("val", "test") if k in card["metrics"]}
    val, test = (json.loads((scores / f"pooled-{s}.json").read_text()) for s in ("val", "test"))
    card["metrics"] = {
        "val": val, "test": test,
        "threshold_rule": "highest P(malignant) threshold with malignant sensitivity >= 0.90 "
                          "on the pooled validation subsets, two-stage reading on suggested "
                          "outlines",
        "normal_odds_rule": "largest factor on P(normal)'s odds where an outline is found with "
                            "which at most 5% of the pooled validation lesion images are "
                            "called normal",
        "history": card["metrics"].get("history", []),
        "lesion_model_alone": {"note": "the lesion model alone on the experts' outlines, on "
                                       "the compact copy", **alone},
    }
    card.update(name=NAMES["lesion"], two_stage=pair, training_data=TRAINING_DATA,
                init=f"{NAMES['classifier']} (the first stage of the same run)",
                notes=f"{card['notes']} {RECIPE}")
    target = weights / NAMES["lesion"]
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(candidate, target)
    write_card(target, card)
    print(f"Released {NAMES['lesion']} (with {', '.join(pair.values())}) into {weights}")


if __name__ == "__main__":
    main()
