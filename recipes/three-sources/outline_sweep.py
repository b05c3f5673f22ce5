"""How an outline model's post-processing (threshold x smallest component) changes its outlines
on one subset: mean lesion Dice, lesion images left without an outline, normal images left
empty, for every setting `train-seg` chooses among. Run it on a source the outline model never
saw to choose post-processing for unseen hospitals, e.g.

    PYTHONPATH=. python recipes/three-sources/outline_sweep.py \\
        --segmenter weights/densenet121-unet-lesion-v1 \\
        --data $DATA/BUSUCLM/labels.csv --split splits/busuclm.json --subset val

Prints a markdown table (the outline model's own setting marked) and, with --json, writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from itertools import product

from bus_core.data.images import load_image
from bus_core.data.inputs import record_lesion_mask
from bus_core.data.splits import select_records
from bus_core.evaluation.evaluate import segmentation_row, segmentation_summary
from bus_core.inference.outline import Segmenter
from bus_core.models.build import load_model
from bus_core.models.unet import PostProcess, postprocess
from bus_core.training.segmenter_release import MIN_AREAS, THRESHOLDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmenter", required=True, help="outline model folder")
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--subset", default="val")
    parser.add_argument("--json", help="write the table as JSON here")
    args = parser.parse_args()
    segmenter = Segmenter(load_model(args.segmenter), backend="torch")
    records, data = select_records(args.data, args.split, args.subset)
    maps, truths = [], []
    for start in range(0, len(records), 8):
        chunk = records[start:start + 8]
        images = [load_image(r.path) for r in chunk]
        maps += segmenter.probabilities(images)
        truths += [record_lesion_mask(r, image.shape[:2]) for r, image in zip(chunk, images)]
    own = segmenter.params
    rows = []
    for threshold, min_area in product(THRESHOLDS, MIN_AREAS):
        params = PostProcess(threshold, min_area, own.fill_holes)
        per_image = [segmentation_row(postprocess(prob, params), truth)
                     for prob, truth in zip(maps, truths)]
        rows.append({**dataclasses.asdict(params), **segmentation_summary(per_image),
                     "own": params == own})
    first = rows[0]
    print(f"{segmenter.card.name} on {', '.join(args.data)}, {args.split} {args.subset}: "
          f"{first['n']} images ({first['n_lesion']} with a lesion, {first['n_normal']} "
          "without)\n")
    print("| threshold | smallest component | lesion Dice | lesion images without an outline "
          "| normal images left empty |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        normal = "-" if r["normal_empty_share"] is None else f"{r['normal_empty_share']:.1%}"
        mark = " (its own)" if r["own"] else ""
        print(f"| {r['threshold']}{mark} | {r['min_area']} | {r['dice']:.3f} | "
              f"{r['lesion_empty_share']:.1%} | {normal} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"segmenter": segmenter.card.name, "data": data, "rows": rows}, out,
                      indent=1, default=str)


if __name__ == "__main__":
    main()
