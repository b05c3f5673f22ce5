"""Write one figure of an evaluation's JSON into a model's card (and check the card reads back):
the fitted factor on P(normal)'s odds or the fitted threshold, as the release does by hand.

    python recipes/three-sources/card_value.py MODEL CARD_KEY EVALUATION.json JSON_KEY
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bus_core.models.card import CARD_FILE, read_card


def main() -> None:
    """Copy EVALUATION.json[JSON_KEY] to the card's CARD_KEY."""
    folder, card_key = Path(sys.argv[1]), sys.argv[2]
    evaluation, json_key = sys.argv[3], sys.argv[4]
    value = json.loads(Path(evaluation).read_text())[json_key]
    card_path = folder / CARD_FILE
    card = json.loads(card_path.read_text())
    card[card_key] = value
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    read_card(folder)
    print(f"{folder}: {card_key} = {value}")


if __name__ == "__main__":
    main()
