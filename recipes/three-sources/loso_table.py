"""The leave-one-source-out table (markdown) from the JSON files of loso.sh.

    python recipes/three-sources/loso_table.py runs/three-sources/loso
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bus_core.constants import CLASSES, NORMAL

RUNS = {"without-busi": "BUSI", "without-busbra": "BUS-BRA", "without-busuclm": "BUS-UCLM"}


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def called_normal(metrics: dict[str, Any]) -> str:
    """Lesion images called normal, as 'k / n (share)', from the confusion matrix."""
    labels = list(metrics.get("labels") or CLASSES)
    matrix = metrics["confusion_matrix"]
    normal = labels.index(NORMAL)
    rows = [row for i, row in enumerate(matrix) if i != normal]
    k, n = sum(row[normal] for row in rows), sum(sum(row) for row in rows)
    return f"{k} / {n} ({k / n:.1%})" if n else "-"


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    """Print one row per left-out source and variant."""
    folder = Path(sys.argv[1])
    print("| left out (val+test images) | lesion model | AUC malignant | accuracy | "
          "sensitivity / specificity at the pooled-validation threshold | lesion images "
          "called normal | lesion model alone, experts' outlines: AUC | outline Dice "
          "(lesion images without an outline) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run, source in RUNS.items():
        outline = _read(folder / f"{run}-outline.json")
        dice = "-" if outline is None else (
            f"{_f(outline.get('dice'))} ({_f(outline.get('lesion_empty_share'))})")
        for variant in ("dg", "plain"):
            held = _read(folder / f"{run}-{variant}-held-out.json")
            alone = _read(folder / f"{run}-{variant}-lesion-alone.json")
            if held is None:
                continue
            at = held.get("at_threshold") or {}
            counts = held.get("n_per_class", {})
            name = f"{source} ({held['n']}: " + ", ".join(
                f"{counts[c]} {c}" for c in CLASSES if counts.get(c)) + ")"
            print(f"| {name} | {variant} (threshold {_f(at.get('threshold'))}) | "
                  f"{_f(held.get('auc_malignant'))} | {_f(held.get('accuracy'))} | "
                  f"{_f(at.get('sensitivity'))} / {_f(at.get('specificity'))} | "
                  f"{called_normal(held)} | "
                  f"{_f(alone.get('auc_malignant') if alone else None)} | {dice} |")


if __name__ == "__main__":
    main()
