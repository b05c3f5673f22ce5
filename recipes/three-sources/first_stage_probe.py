"""How well a reading's first stage tells lesion images from normal ones on a hospital it never
saw, as trained and with its BatchNorm statistics re-estimated on that hospital's unlabelled
train images (AdaBN): per row, the lesion-vs-normal AUC of the whole-image model's P(normal)
and of the outline model's highest pixel probability, the images the whole-image model calls
normal (its most probable class), and the share of normal images still called normal by the
better of the two scores at the cut that keeps 95% of the lesion images (markdown, on the
validation subset; AUCs with their 95% intervals, stratified bootstrap).

    PYTHONPATH=. python recipes/three-sources/first_stage_probe.py --adabn \
        weights/densenet121-multitask-v2 weights/densenet121-unet-lesion-v1 \
        $DATA/BUSUCLM/labels.csv splits/busuclm.json

(the two-hospital first stage, trained on BUSI and BUS-BRA only, on BUS-UCLM).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.optim.swa_utils import update_bn

from bus_core.data.augment import eval_batch
from bus_core.data.dataset import Record
from bus_core.data.images import load_image
from bus_core.data.inputs import InputSpec
from bus_core.data.loader import RecordDataset, eval_batches
from bus_core.data.presets import fit_square
from bus_core.data.splits import select_records
from bus_core.evaluation.evaluate import evaluate
from bus_core.evaluation.intervals import bootstrap_weights, interval
from bus_core.inference.outline import Segmenter
from bus_core.models.build import LoadedModel, load_model

LESION_KEPT = 0.95
"""The share of lesion images the cut on a score must keep."""


def whole_batches(loaded: LoadedModel, records: Sequence[Record]) -> list[torch.Tensor]:
    """The whole-image model's input batches of `records`."""
    dataset = RecordDataset(records, InputSpec.from_card(loaded.card), classes=loaded.card.classes)
    return [images for images, _, _ in eval_batches(dataset, 32)]


def outline_batches(size: int, records: Sequence[Record]) -> list[torch.Tensor]:
    """The outline model's input batches (squares of `size`) of `records`."""
    batches = []
    for start in range(0, len(records), 16):
        squares = [fit_square(load_image(r.path), size)[0] for r in records[start:start + 16]]
        batches.append(eval_batch(torch.from_numpy(np.stack(squares))))
    return batches


def scores(whole_dir: str, outline_dir: str, records: Sequence[Record],
           adapt_on: Sequence[Record] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P(normal) of the whole-image model, whether it calls the image normal, highest outline
    probability) per record, after AdaBN on `adapt_on` when given."""
    whole, outline = load_model(whole_dir), load_model(outline_dir)
    segmenter = Segmenter(outline, "cpu-fp32", backend="torch")
    if adapt_on:
        update_bn(whole_batches(whole, adapt_on), whole.model)  # AdaBN
        update_bn(outline_batches(segmenter.size, adapt_on), segmenter.model)
    probs = evaluate(whole, records, device="cpu-fp32", backend="torch").probs
    normal = list(whole.card.classes).index("normal")
    highest = np.array([segmenter.probabilities([load_image(r.path)])[0].max() for r in records])
    return probs[:, normal], probs.argmax(1) == normal, highest


def normals_kept(is_lesion: np.ndarray, score: np.ndarray) -> float:
    """The share of normal images below the cut on `score` (higher: lesion) that keeps
    `LESION_KEPT` of the lesion images at or above it."""
    cut = np.sort(score[is_lesion])[int((1 - LESION_KEPT) * is_lesion.sum())]
    return float((score[~is_lesion] < cut).mean())


def auc_text(is_lesion: np.ndarray, score: np.ndarray) -> str:
    """The lesion-vs-normal AUC of `score` with its 95% interval (stratified bootstrap)."""
    weights = bootstrap_weights(is_lesion.astype(int))
    samples = [roc_auc_score(is_lesion, score, sample_weight=w) for w in weights]
    low, high = interval(np.array(samples))
    return f"{roc_auc_score(is_lesion, score):.3f} [{low:.3f}, {high:.3f}]"


def row(name: str, is_lesion: np.ndarray, p_normal: np.ndarray, called: np.ndarray,
        highest: np.ndarray) -> str:
    """One markdown row (`called`: the whole-image model's reading is 'normal')."""
    better_whole = roc_auc_score(is_lesion, 1 - p_normal) >= roc_auc_score(is_lesion, highest)
    best = 1 - p_normal if better_whole else highest
    return (f"| {name} | {auc_text(is_lesion, 1 - p_normal)} | {auc_text(is_lesion, highest)} | "
            f"{int(called[is_lesion].sum())} / {int(is_lesion.sum())} | "
            f"{int(called[~is_lesion].sum())} / {int((~is_lesion).sum())} | "
            f"{normals_kept(is_lesion, best):.2f} |")


def main(argv: Sequence[str]) -> None:
    """Print the table (see the module docstring; --help for the arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("whole", help="the whole-image model's folder")
    parser.add_argument("outline", help="the outline model's folder")
    parser.add_argument("data", help="the new hospital's data (folder or CSV manifest)")
    parser.add_argument("split", help="its split file")
    parser.add_argument("--name", default="as trained", help="the first row's name")
    parser.add_argument("--adabn", action="store_true",
                        help="add a row after AdaBN on the split's train subset")
    args = parser.parse_args(argv)
    val, _ = select_records([args.data], args.split, "val")
    is_lesion = np.array([r.label != "normal" for r in val])
    print(f"| first stage on {args.split} val ({len(val)} images) | lesion-vs-normal AUC, "
          "P(normal) | lesion-vs-normal AUC, highest outline probability | lesion images the "
          "whole-image model calls normal | normal images it calls normal | normal images kept "
          f"at {LESION_KEPT:.0%} of lesions |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(row(args.name, is_lesion, *scores(args.whole, args.outline, val)))
    if args.adabn:
        train, _ = select_records([args.data], args.split, "train")
        print(row(f"{args.name}, AdaBN on the train subset ({len(train)} unlabelled images)",
                  is_lesion, *scores(args.whole, args.outline, val, train)))


if __name__ == "__main__":
    main(sys.argv[1:])
