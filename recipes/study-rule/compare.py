"""Per-image against per-study reading: each rule of `bus_core.inference.study` on data with a
patient column (BUS-BRA, BUS-UCLM), the model read as clinicians get it (suggested outlines).

    PYTHONPATH=. python recipes/study-rule/compare.py --model weights/densenet121-context-v2 \\
        --data $DATA/BUSBRA/labels.csv --split splits/busbra.json \\
        --data $DATA/BUSUCLM/labels.csv --split splits/busuclm.json --subset val --out OUT

Writes OUT/readings.json (each image's id, source, patient, true class and probabilities: the
tables can be remade from it with --readings, without the model) and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bus_core.data.dataset import load_records
from bus_core.data.splits import load_split, split_records
from bus_core.evaluation.evaluate import SERVED, evaluate, with_policy_outlines
from bus_core.evaluation.intervals import score
from bus_core.evaluation.studies import score_studies
from bus_core.inference.study import RULES, study_keys
from bus_core.metrics import fmt3
from bus_core.models.build import load_model


def read_images(args: argparse.Namespace) -> dict[str, Any]:
    """Each image's reading by the model, with its source and patient."""
    loaded = load_model(args.model)
    records = []
    for data, split in zip(args.data, args.split, strict=True):
        records += split_records(load_records(data), load_split(split), args.subset)
    records, _ = with_policy_outlines(loaded, records, SERVED)
    result = evaluate(loaded, records, device="cpu", batch_size=16)
    patients = {r.id: r.patient for r in records}
    return {"model": loaded.card.name, "subset": args.subset, "classes": result.classes,
            "threshold": loaded.card.malignant_threshold,
            "images": [{"id": i, "source": s, "patient": patients[i], "true": int(t),
                        "probs": [float(x) for x in p]}
                       for i, s, t, p in zip(result.ids, result.sources, result.y_true,
                                             result.probs, strict=True)]}


def called_normal(m: dict[str, Any], classes: list[str]) -> str:
    """Lesion studies (or images) read as normal, of all lesion ones."""
    cm = np.asarray(m["confusion_matrix"])
    normal = classes.index("normal")
    lesions = [i for i in range(len(classes)) if i != normal]
    return f"{int(cm[lesions, normal].sum())} / {int(cm[lesions].sum())}"


def row(level: str, m: dict[str, Any], n: str, classes: list[str]) -> str:
    """One line of the table."""
    low, high = m.get("auc_malignant_ci95") or (None, None)
    at = m.get("at_threshold") or {}
    return (f"| {level} | {n} | {fmt3(m.get('accuracy'))} | {fmt3(m.get('auc_malignant'))} "
            f"[{fmt3(low)}, {fmt3(high)}] | {fmt3(at.get('sensitivity'))} / "
            f"{fmt3(at.get('specificity'))} | {called_normal(m, classes)} |")


def table(readings: dict[str, Any]) -> str:
    """Per source and pooled: images, then studies by each rule."""
    classes = readings["classes"]
    images = readings["images"]
    lines = [f"Model {readings['model']}, {readings['subset']} subsets, flag at "
             f"{fmt3(readings['threshold'])}:", "",
             "| data: reading | images or studies | accuracy | AUC malignant | sensitivity / "
             "specificity at the flag | lesion images or studies called normal |",
             "| --- | --- | --- | --- | --- | --- |"]
    sources = sorted({im["source"] for im in images})
    for source in [*sources, "pooled"]:
        part = [im for im in images if source in ("pooled", im["source"])]
        y = np.asarray([im["true"] for im in part])
        p = np.asarray([im["probs"] for im in part])
        keys = study_keys([im["id"] for im in part], [im["patient"] for im in part],
                          [im["source"] for im in part])
        name = Path(source).parent.name or source
        per_image = score(y, p, classes, threshold=readings["threshold"])
        lines.append(row(f"{name}: each image", per_image, f"{len(y)} images", classes))
        for rule, m in score_studies(keys, y, p, tuple(RULES), classes,
                                     threshold=readings["threshold"]).items():
            lines.append(row(f"{name}: per study, {rule}", m, f"{m['n_studies']} studies",
                             classes))
    return "\n".join(lines)


def main() -> None:
    """Read (or load) the images' readings, then print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--data", action="append", default=[])
    parser.add_argument("--split", action="append", default=[])
    parser.add_argument("--subset", default="val", choices=("val", "test", "val+test"))
    parser.add_argument("--readings", help="readings.json of an earlier run (no model needed)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.readings:
        readings = json.loads(Path(args.readings).read_text())
    else:
        readings = read_images(args)
        (out / "readings.json").write_text(json.dumps(readings) + "\n")
    text = table(readings)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
