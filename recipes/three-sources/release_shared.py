"""Release the one-network first stage of `shared-first-stage.sh`: its outline model and the
lesion model paired with it go into weights/ (the whole-image model is already there), the
lesion model's card with the figures of the two-stage reading on the pooled validation and test
subsets (full-size images).

    python recipes/three-sources/release_shared.py CANDIDATE SCORES WEIGHTS

CANDIDATE: the folder holding the whole-image model, the outline model and the paired lesion
model (`$OUT/candidate`); SCORES: the folder with `pooled-val.json` and `pooled-test.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from release import LICENCES, card_of, copy_model, write_card

RECIPE = ("Recipe: recipes/three-sources/shared-first-stage.sh (training, pairing and "
          "fitting) and release_shared.py. Trained on BUSI, BUS-BRA and BUS-UCLM; BUS-UCLM is "
          "licensed CC BY-NC 4.0, so this model is for non-commercial research use.")


def _as_data(path: str) -> str:
    """A data path as the cards write it: from the data set's folder on, under $DATA."""
    parts = Path(path).parts
    start = next(i for i, part in enumerate(parts) if part in ("BUSI", "BUSBRA", "BUSUCLM"))
    return "/".join(("$DATA", *parts[start:]))


def main() -> None:
    """Copy the outline model and the lesion model, and write their cards."""
    candidate, scores, weights = (Path(a) for a in sys.argv[1:4])
    lesion = next(p for p in candidate.iterdir() if card_of(p).get("two_stage"))
    card = card_of(lesion)
    outline_name = card["two_stage"]["outline_model"]
    outline = card_of(candidate / outline_name)
    outline["training_data"] |= {"sources": [_as_data(p) for p in
                                             outline["training_data"]["sources"]],
                                 "licences": LICENCES}
    for entry in outline["split"]["files"]:
        entry["data"] = _as_data(entry["data"])
    whole = card["two_stage"]["whole_image_model"]
    outline["notes"] = (f"{outline['notes']} With {whole} it reads as one network: one encoder "
                        f"pass gives the outline and P(normal). {RECIPE}")
    copy_model(candidate / outline_name, weights / outline_name)
    write_card(weights / outline_name, outline)
    val, test = (json.loads((scores / f"pooled-{s}.json").read_text()) for s in ("val", "test"))
    previous = card["metrics"]
    card["metrics"] = previous | {"val": val, "test": test}
    card["notes"] = (f"The weights of densenet121-context-v2, read with {outline_name} (one "
                     "network with the whole-image model) instead of densenet121-unet-lesion-v1;"
                     " factor on P(normal)'s odds and threshold fitted again on the pooled "
                     f"validation subsets. Lesion model trained on NVIDIA H200 (140 GiB), bf16. "
                     f"{RECIPE}")
    copy_model(lesion, weights / card["name"])
    write_card(weights / card["name"], card)
    print(f"Released {card['name']} (with {outline_name}) into {weights}")


if __name__ == "__main__":
    main()
