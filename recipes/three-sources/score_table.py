"""The table of score.sh's JSON files (markdown), and each model's selection score: the mean over
sources of malignant AUC, macro-F1 and the share of lesion images not called normal.

    python recipes/three-sources/score_table.py runs/three-sources/val
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from bus_core.constants import CLASSES, NORMAL

SOURCES = {"busi": "BUSI", "busbra": "BUS-BRA", "busuclm": "BUS-UCLM"}


def lesions_called_normal(metrics: dict) -> tuple[int, int]:
    """(lesion images called normal, lesion images) from the confusion matrix."""
    labels = list(metrics.get("labels") or CLASSES)
    normal = labels.index(NORMAL)
    rows = [row for i, row in enumerate(metrics["confusion_matrix"]) if i != normal]
    return sum(row[normal] for row in rows), sum(sum(row) for row in rows)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    """Print the table, then the scores."""
    folder = Path(sys.argv[1])
    scores: dict[str, list[float]] = defaultdict(list)
    print("| model | data (n) | accuracy | macro-F1 | AUC malignant | lesion images called "
          "normal | at the threshold: sensitivity / specificity |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path in sorted(folder.glob("*.json")):
        model, source, subset = path.stem.rsplit("-", 2)
        m = json.loads(path.read_text())
        k, n = lesions_called_normal(m)
        at = m.get("at_threshold") or {}
        print(f"| {model} | {SOURCES[source]} {subset} ({m['n']}) | {_f(m['accuracy'])} | "
              f"{_f(m['macro_f1'])} | {_f(m['auc_malignant'])} | {k} / {n} | "
              f"{_f(at.get('sensitivity'))} / {_f(at.get('specificity'))} "
              f"({_f(at.get('threshold'))}) |")
        scores[model] += [m["auc_malignant"], m["macro_f1"], 1 - k / n]
    for model, parts in scores.items():
        print(f"\n{model}: selection score {np.mean(parts):.3f} ({len(parts) // 3} sources)")


if __name__ == "__main__":
    main()
