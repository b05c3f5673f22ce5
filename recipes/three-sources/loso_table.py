"""The leave-one-source-out tables (markdown) from the JSON files of loso.sh: every lesion-model
variant found ("plain" first), one row per left-out source and variant, then each variant's
AUC on each left-out source side by side.

    python recipes/three-sources/loso_table.py runs/three-sources/loso
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bus_core.constants import CLASSES

sys.path.insert(0, str(Path(__file__).parent))
from score_table import called_normal_text, fmt3, with_ci  # noqa: E402  (this folder's table helpers)

RUNS = {"without-busi": "BUSI", "without-busbra": "BUS-BRA", "without-busuclm": "BUS-UCLM"}


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def variants(folder: Path) -> list[str]:
    """The lesion-model variants with a left-out score in `folder`, "plain" first, then by
    name."""
    found = {path.name[len(run) + 1:-len("-held-out.json")]
             for run in RUNS for path in folder.glob(f"{run}-*-held-out.json")}
    return sorted(found, key=lambda v: (v != "plain", v))


def main() -> None:
    """Print one row per left-out source and variant, then one row per variant."""
    folder = Path(sys.argv[1])
    names = variants(folder)
    print("| left out (val+test images) | lesion model | AUC malignant | accuracy | "
          "sensitivity / specificity at the pooled-validation threshold | lesion images "
          "called normal | lesion model alone, experts' outlines: AUC | outline Dice "
          "(lesion images without an outline) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run, source in RUNS.items():
        outline = _read(folder / f"{run}-outline.json")
        dice = "-" if outline is None else (
            f"{fmt3(outline.get('dice'))} ({fmt3(outline.get('lesion_empty_share'))})")
        for variant in names:
            held = _read(folder / f"{run}-{variant}-held-out.json")
            alone = _read(folder / f"{run}-{variant}-lesion-alone.json")
            if held is None:
                continue
            at = held.get("at_threshold") or {}
            counts = held.get("n_per_class", {})
            name = f"{source} ({held['n']}: " + ", ".join(
                f"{counts[c]} {c}" for c in CLASSES if counts.get(c)) + ")"
            print(f"| {name} | {variant} (threshold {fmt3(at.get('threshold'))}) | "
                  f"{with_ci(held, 'auc_malignant')} | {with_ci(held, 'accuracy')} | "
                  f"{with_ci(at, 'sensitivity')} / {with_ci(at, 'specificity')} | "
                  f"{called_normal_text(held)} | "
                  f"{fmt3(alone.get('auc_malignant') if alone else None)} | {dice} |")
    print()
    print("| lesion model | " + " | ".join(f"AUC malignant, {s} left out" for s in
                                           RUNS.values()) + " | mean |")
    print("| --- |" + " --- |" * (len(RUNS) + 1))
    for variant in names:
        aucs = [(_read(folder / f"{run}-{variant}-held-out.json") or {}).get("auc_malignant")
                for run in RUNS]
        known = [a for a in aucs if a is not None]
        mean = sum(known) / len(known) if len(known) == len(RUNS) else None  # all three only
        print(f"| {variant} | " + " | ".join(fmt3(a) for a in aucs) + f" | {fmt3(mean)} |")


if __name__ == "__main__":
    main()
