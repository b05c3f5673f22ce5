"""The table of cpu-ablation.sh (markdown): each lesion-model variant alone on the left-out
source's validation subset with the experts' outlines, its malignant AUC with its 95% interval
and the paired-bootstrap interval of its difference from `plain` (the same resampled images).

    python recipes/three-sources/cpu_ablation_table.py runs/three-sources/cpu-ablation \
        without-busbra $DATA

(`$DATA`: the folder holding the data sets; default `../shared/data`, as in common.sh.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from bus_core.data.splits import select_records
from bus_core.evaluation.evaluate import Evaluation, evaluate
from bus_core.evaluation.intervals import paired_difference
from bus_core.models.build import load_model

sys.path.insert(0, str(Path(__file__).parent))
from score_table import called_normal_text, fmt3, with_ci  # noqa: E402  (this folder's table helpers)

HELD_OUT = {"without-busi": ("BUSI", ["BUSI"], "splits/busi.json"),
            "without-busbra": ("BUS-BRA", ["BUSBRA/labels.csv"], "splits/busbra.json"),
            "without-busuclm": ("BUS-UCLM", ["BUSUCLM/labels.csv"], "splits/busuclm.json")}
ORDER = ["plain", "ema", "mixstyle", "style", "balanced", "dg"]


def variants(folder: Path, fold: str) -> list[str]:
    """The finished variants of `fold` in `folder`: those of common.sh in its order, then any
    other (a copy kept under another name) by name."""
    found = {p.parent.name[len(fold) + 1:] for p in folder.glob(f"{fold}-*/card.json")}
    return sorted(found, key=lambda v: (ORDER.index(v) if v in ORDER else len(ORDER), v))


def main() -> None:
    """Print one row per variant found in the folder for the fold."""
    folder, fold = Path(sys.argv[1]), sys.argv[2]
    data = Path(sys.argv[3] if len(sys.argv) > 3 else "../shared/data")
    name, sources, split = HELD_OUT[fold]
    records, _ = select_records([str(data / s) for s in sources], split, "val")
    results: dict[str, Evaluation] = {}
    hyper: dict[str, dict] = {}
    for variant in variants(folder, fold):
        loaded = load_model(folder / f"{fold}-{variant}")
        hyper[variant] = loaded.card.hyperparameters
        results[variant] = evaluate(loaded, records, device="cpu", input_mode="lesion-context")
    print(f"| variant ({name} val, {len(records)} images, experts' outlines) | epochs (best) | "
          "AUC malignant | difference from plain | accuracy | lesion images called normal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant, result in results.items():
        if variant == "plain" or "plain" not in results:
            diff = "-"
        else:
            plain = results["plain"]
            low, high = paired_difference(result.y_true, result.probs, plain.probs,
                                          ["auc_malignant"])["auc_malignant"] or (None, None)
            delta = result.metrics["auc_malignant"] - plain.metrics["auc_malignant"]
            diff = f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"
        m = result.metrics
        h = hyper[variant]
        print(f"| {variant} | {h.get('epochs_trained', h.get('epochs'))} "
              f"({h.get('best_epoch')}) | {with_ci(m, 'auc_malignant')} | {diff} | "
              f"{fmt3(m['accuracy'])} | {called_normal_text(m)} |")


if __name__ == "__main__":
    main()
