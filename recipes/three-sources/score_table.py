"""The table of score.sh's JSON files (markdown), and each model's selection score: the mean over
sources of malignant AUC, macro-F1 and the share of lesion images not called normal; or, given
one `evaluate --json` file of several sources, its figures per source with 95% intervals.

    python recipes/three-sources/score_table.py runs/three-sources/val
    python recipes/three-sources/score_table.py runs/release/pooled-test.json
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


def called_normal_text(metrics: dict) -> str:
    """'k / n (share)' of lesion images called normal, or '-' without lesion images."""
    k, n = lesions_called_normal(metrics)
    return f"{k} / {n} ({k / n:.1%})" if n else "-"


def selection_figures(metrics: dict) -> list[float]:
    """One source's part of the selection score: malignant AUC, macro-F1 and the share of
    lesion images not called normal (the score is the mean of these over sources)."""
    k, n = lesions_called_normal(metrics)
    return [metrics["auc_malignant"], metrics["macro_f1"], 1 - k / n]


def fmt3(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def with_ci(m: dict, key: str) -> str:
    low, high = m.get(f"{key}_ci95") or (None, None)
    return f"{fmt3(m.get(key))} [{fmt3(low)}, {fmt3(high)}]"


def per_source(path: Path) -> None:
    """Print one row per source of a pooled evaluation, and the pooled row."""
    m = json.loads(path.read_text())
    print("| data (n: normal / benign / malignant) | accuracy | AUC malignant | sensitivity / "
          "specificity at the threshold | lesion images called normal |")
    print("| --- | --- | --- | --- | --- |")
    for name, part in [*m.get("by_source", {}).items(), ("all", m)]:
        called = called_normal_text(part) if "confusion_matrix" in part else "-"
        at = part.get("at_threshold") or {}
        counts = " / ".join(str(part["n_per_class"].get(c, 0)) for c in CLASSES)
        print(f"| {name} ({part['n']}: {counts}) | {with_ci(part, 'accuracy')} | "
              f"{with_ci(part, 'auc_malignant')} | {with_ci(at, 'sensitivity')} / "
              f"{with_ci(at, 'specificity')} | {called} |")


def main() -> None:
    """Print the table, then the scores."""
    folder = Path(sys.argv[1])
    if folder.is_file():
        per_source(folder)
        return
    scores: dict[str, list[float]] = defaultdict(list)
    print("| model | data (n) | accuracy | macro-F1 | AUC malignant | lesion images called "
          "normal | at the threshold: sensitivity / specificity |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path in sorted(folder.glob("*.json")):
        model, source, subset = path.stem.rsplit("-", 2)
        m = json.loads(path.read_text())
        k, n = lesions_called_normal(m)
        at = m.get("at_threshold") or {}
        print(f"| {model} | {SOURCES[source]} {subset} ({m['n']}) | {fmt3(m['accuracy'])} | "
              f"{fmt3(m['macro_f1'])} | {fmt3(m['auc_malignant'])} | {k} / {n} | "
              f"{fmt3(at.get('sensitivity'))} / {fmt3(at.get('specificity'))} "
              f"({fmt3(at.get('threshold'))}) |")
        scores[model] += selection_figures(m)
    for model, parts in scores.items():
        print(f"\n{model}: selection score {np.mean(parts):.3f} ({len(parts) // 3} sources)")


if __name__ == "__main__":
    main()
