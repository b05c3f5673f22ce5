"""The tables of outline-setting.sh (markdown): for each outline post-processing setting, the
two-hospital reading on BUS-UCLM's validation subset (a hospital none of its models saw), then
the default on the three sources' pooled validation subsets with its selection score (the mean
over sources of malignant AUC, macro-F1 and the share of lesion images not called normal).

    python recipes/three-sources/outline_setting_table.py runs/outline-setting
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from score_table import called_normal_text, fmt3, selection_figures, with_ci  # noqa: E402

SOURCES = {"BUSI": "BUSI", "BUSBRA": "BUS-BRA", "BUSUCLM": "BUS-UCLM"}


def _settings(folder: Path, kind: str) -> list[str]:
    """The settings with a finished evaluation of `kind` (held-out or default), by threshold
    from the highest, then smallest component from the largest."""
    ending = "-busuclm-val.json" if kind == "held-out" else "-pooled-val.json"
    found = [p.name[len(kind) + 1:-len(ending)] for p in folder.glob(f"{kind}-*{ending}")]
    return sorted(found, key=lambda s: tuple(-float(x) for x in s.split(":")))


def _normals_kept(m: dict[str, Any]) -> str:
    normal = m["n_per_class"].get("normal", 0)
    return f"{m['confusion_matrix'][0][0]} / {normal}" if normal else "-"


def _row_start(setting: str, m: dict[str, Any]) -> str:
    threshold, area = setting.split(":")
    return (f"| {threshold} | {area} | {m['normal_odds_with_outline']:.3g} | "
            f"{m['at_threshold']['threshold']:.3f} |")


def selection_score(pooled: dict[str, Any]) -> float:
    """The mean over sources of malignant AUC, macro-F1 and lesion images not called normal."""
    figures = [f for part in pooled["by_source"].values() for f in selection_figures(part)]
    return sum(figures) / len(figures)


def main() -> None:
    """Print both tables."""
    folder = Path(sys.argv[1])
    print("Two-hospital reading (`densenet121-context-v1`), BUS-UCLM validation (never seen):\n")
    print("| threshold | smallest component | factor on P(normal)'s odds | malignant threshold | "
          "accuracy | AUC malignant | sensitivity / specificity | lesion images called normal | "
          "normal images called normal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting in _settings(folder, "held-out"):
        m = json.loads((folder / f"held-out-{setting}-busuclm-val.json").read_text())
        at = m["at_threshold"]
        print(f"{_row_start(setting, m)} {with_ci(m, 'accuracy')} | "
              f"{with_ci(m, 'auc_malignant')} | {fmt3(at['sensitivity'])} / "
              f"{fmt3(at['specificity'])} | {called_normal_text(m)} | {_normals_kept(m)} |")
    print("\nThe default (`densenet121-context-v3`), pooled validation of the three sources:\n")
    print("| threshold | smallest component | factor on P(normal)'s odds | malignant threshold | "
          "selection score | " + " | ".join(
              f"{name}: accuracy, AUC, lesions called normal, normals called normal"
              for name in SOURCES.values()) + " |")
    print("| --- | --- | --- | --- | --- |" + " --- |" * len(SOURCES))
    for setting in _settings(folder, "default"):
        m = json.loads((folder / f"default-{setting}-pooled-val.json").read_text())
        cells = []
        for source in SOURCES:
            part = m["by_source"][source]
            cells.append(f"{fmt3(part['accuracy'])}, {fmt3(part['auc_malignant'])}, "
                         f"{called_normal_text(part)}, {_normals_kept(part)}")
        print(f"{_row_start(setting, m)} {selection_score(m):.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
