"""Make a lesion model read in two stages: its card names the whole-image model and the outline
model (folders beside it) that the Predictor, `evaluate` and the app then run with it.

    python recipes/three-sources/pair.py LESION_MODEL WHOLE_FOLDER OUTLINE_FOLDER [--name NAME]

With --name, the card also takes a new model name (a new release of the same weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bus_core.models.card import CARD_FILE, TWO_STAGE_KEYS, read_card


def main() -> None:
    """Write the pair (and the name) into the card, and check it reads back."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lesion_model", type=Path)
    parser.add_argument("whole_image_folder")
    parser.add_argument("outline_folder")
    parser.add_argument("--name")
    args = parser.parse_args()
    card_path = args.lesion_model / CARD_FILE
    card = json.loads(card_path.read_text())
    card["two_stage"] = dict(zip(TWO_STAGE_KEYS, (args.whole_image_folder, args.outline_folder),
                                 strict=True))
    if args.name:
        card["name"] = args.name
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    read_card(args.lesion_model)


if __name__ == "__main__":
    main()
