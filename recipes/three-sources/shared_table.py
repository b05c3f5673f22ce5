"""The validation table of `shared-first-stage.sh`: for the released default and each candidate
(the decoder of the best-scored and of the last epoch), per source, the two-stage reading at
its own pooled-validation factor and threshold, and its outline model alone.

    python recipes/three-sources/shared_table.py runs/shared-first-stage
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from score_table import called_normal_text, fmt3, with_ci

CANDIDATES = {"released": "densenet121-context-v2 with densenet121-unet-lesion-v1",
              "best": "decoder of the best-scored epoch", "last": "decoder of the last epoch"}
SOURCES = {"BUSI": "BUSI", "BUSBRA": "BUS-BRA", "BUSUCLM": "BUS-UCLM"}


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def main() -> None:
    """Print the table (markdown)."""
    folder = Path(sys.argv[1])
    print("| candidate | source (val, n) | accuracy | AUC malignant | sensitivity / specificity "
          "at its threshold | lesion images called normal | normal images called normal | "
          "outline Dice | lesion images without an outline | normal images left empty |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for candidate, words in CANDIDATES.items():
        pooled = json.loads((folder / f"{candidate}-pooled-val.json").read_text())
        for source, name in SOURCES.items():
            m = pooled["by_source"][source]
            at = m["at_threshold"]
            normal = m["n_per_class"].get("normal", 0)
            kept = m["confusion_matrix"][0][0] if normal else 0
            outline = json.loads((folder / f"{candidate}-outline-{source}-val.json").read_text())
            print(f"| {words} ({pooled['normal_odds_with_outline']:.3g}, "
                  f"{at['threshold']:.3f}) | {name} ({m['n']}) | {with_ci(m, 'accuracy')} | "
                  f"{with_ci(m, 'auc_malignant')} | {fmt3(at['sensitivity'])} / "
                  f"{fmt3(at['specificity'])} | {called_normal_text(m)} | "
                  f"{f'{kept} / {normal}' if normal else '-'} | {fmt3(outline['dice'])} | "
                  f"{_share(outline['lesion_empty_share'])} | "
                  f"{_share(outline['normal_empty_share'])} |")


if __name__ == "__main__":
    main()
