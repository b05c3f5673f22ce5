"""The table of shared-held-out.sh (markdown): the two-hospital reading with two first-stage
networks and with one, on BUS-UCLM's validation subset (a hospital none of its models saw),
each at its own factor and threshold fitted on BUSI + BUS-BRA validation, with each outline
model alone there; then, as a bound, the one-network reading with the factor fitted on BUS-UCLM
validation itself.

    PYTHONPATH=. python recipes/three-sources/shared_held_out_table.py runs/shared-held-out
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from score_table import called_normal_text, fmt3, with_ci  # noqa: E402

READINGS = {"two-networks": "two networks (its own outline model, as released)",
            "one-network": "one network (a decoder on the whole-image model's encoder)",
            "one-network-fitted-there": "one network, factor fitted on BUS-UCLM val itself "
                                        "(a bound, not a choice)"}


def main() -> None:
    """Print the table."""
    folder = Path(sys.argv[1])
    print("| first stage (BUS-UCLM val, never seen) | factor on P(normal)'s odds | malignant "
          "threshold | accuracy | AUC malignant | sensitivity / specificity | lesion images "
          "called normal | normal images called normal | outline Dice (lesion images without "
          "one) | normal images left without an outline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, name in READINGS.items():
        m = json.loads((folder / f"{key}-busuclm-val.json").read_text())
        outline = folder / f"{key.removesuffix('-fitted-there')}-outline-busuclm-val.json"
        seg = json.loads(outline.read_text())
        at = m["at_threshold"]
        normal = m["labels"].index("normal")
        without = round(seg["lesion_empty_share"] * seg["n_lesion"])
        kept_empty = round(seg["normal_empty_share"] * seg["n_normal"])
        print(f"| {name} | {m['normal_odds_with_outline']:.3g} | {at['threshold']:.3f} | "
              f"{with_ci(m, 'accuracy')} | {with_ci(m, 'auc_malignant')} | "
              f"{fmt3(at['sensitivity'])} / {fmt3(at['specificity'])} | "
              f"{called_normal_text(m)} | {m['confusion_matrix'][normal][normal]} / "
              f"{m['n_per_class']['normal']} | {fmt3(seg['dice'])} "
              f"({without} / {seg['n_lesion']}) | {kept_empty} / {seg['n_normal']} |")


if __name__ == "__main__":
    main()
