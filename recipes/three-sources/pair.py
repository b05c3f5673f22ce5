"""Make a lesion model read in two stages: its card names the whole-image model and the outline
model (folders beside it) that the Predictor, `evaluate` and the app then run with it.

    python recipes/three-sources/pair.py LESION_MODEL WHOLE_IMAGE_FOLDER OUTLINE_FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bus_core.models.card import CARD_FILE, TWO_STAGE_KEYS, read_card


def main() -> None:
    """Write the pair into the card (and check it reads back)."""
    folder, whole, outline = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    card_path = folder / CARD_FILE
    card = json.loads(card_path.read_text())
    card["two_stage"] = dict(zip(TWO_STAGE_KEYS, (whole, outline), strict=True))
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    read_card(folder)


if __name__ == "__main__":
    main()
