"""Run a model over records and score it: logits -> calibrated probabilities -> metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bus_core import metrics as metrics_lib
from bus_core.constants import NORMAL
from bus_core.data.dataset import Record
from bus_core.data.images import load_image
from bus_core.data.inputs import InputSpec, record_has_lesion, record_lesion_mask
from bus_core.data.loader import RecordDataset, eval_batches
from bus_core.evaluation.intervals import score
from bus_core.inference.outline import Segmenter, with_automatic_masks
from bus_core.metrics import softmax
from bus_core.models.build import LoadedModel, load_model
from bus_core.models.card import ModelCard
from bus_core.models.registry import two_stage_folders
from bus_core.models.unet import dice_iou
from bus_core.runtime.backends import Forward, TorchForward, choose_forward
from bus_core.runtime.device import DeviceConfig, choose_device, prepare_model


@dataclass
class Evaluation:
    """Metrics plus the per-image results they came from (for galleries and ROC curves);
    `sources`: each image's data source (`Record.source`)."""

    metrics: dict[str, Any]
    ids: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    logits: np.ndarray
    classes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def rescore(self, threshold: float | None) -> None:
        """Replace the figures of `metrics` (`intervals.score`) by those with the malignant
        threshold `threshold` (None: no figures at a threshold)."""
        self.metrics.pop("at_threshold", None)
        self.metrics |= score(self.y_true, self.probs, self.classes, threshold=threshold,
                              sources=self.sources)

    def misclassified(self) -> list[tuple[str, str, str, float]]:
        """(id, true class, predicted class, its probability) of every wrong prediction."""
        pred = self.probs.argmax(1)
        return [(self.ids[i], self.classes[self.y_true[i]], self.classes[pred[i]],
                 float(self.probs[i, pred[i]])) for i in np.flatnonzero(pred != self.y_true)]


SERVED, EXPERT = "served", "expert"
OUTLINE_POLICIES: dict[str, str] = {
    SERVED: "as clinicians get it: on the outlines the outline model suggests",
    EXPERT: "on the data's expert outlines"}
"""How a model that reads a lesion outline is scored (a whole-image model reads the images
alone either way): SERVED, the default, reads every image as the app and the command line's
`predict` do; EXPERT gives it the data's own masks (a labelled option)."""


def reads_outlines(card: ModelCard) -> bool:
    """Whether the outline policy changes a model's scores (it reads a lesion outline)."""
    return InputSpec.from_card(card).uses_masks


def default_policy(card: ModelCard, input_mode: str | None = None) -> str:
    """The outline policy a model is scored under unless told otherwise: SERVED for a model that
    reads an outline (its reading as clinicians get it), EXPERT when another input mode is asked
    for (the lesion model alone) and for a whole-image model (which reads no outline)."""
    return SERVED if reads_outlines(card) and not input_mode else EXPERT


def served_segmenter(loaded: LoadedModel, path: str | Path | None = None) -> Segmenter:
    """The outline model whose suggestions `loaded` reads when served: the one at `path`, else
    a two-stage model's own, else the app's (`registry.active_segmenter_path`)."""
    if path is None and loaded.card.two_stage:
        path = two_stage_folders(loaded.path, loaded.card)[1]
    return Segmenter.from_path(path)


def with_policy_outlines(loaded: LoadedModel, records: Sequence[Record], policy: str = SERVED,
                         *, segmenter: str | Path | None = None, mask_dir: Path | None = None,
                         progress: bool = False) -> tuple[list[Record], str]:
    """The records as `policy` scores `loaded`, and the name of their masks for the
    evaluation's data note ('automatic', 'expert'; '' for a whole-image model). SERVED
    replaces each record's masks by the suggested outline of `served_segmenter(loaded,
    segmenter)` (none where it finds no lesion)."""
    if policy not in OUTLINE_POLICIES:
        raise ValueError(f"Unknown outline policy {policy!r}.")
    if not reads_outlines(loaded.card):
        return list(records), ""
    if policy == EXPERT:
        return list(records), "expert"

    return with_automatic_masks(records, served_segmenter(loaded, segmenter), mask_dir,
                                progress=progress), "automatic"


@torch.inference_mode()
def collect_logits(model: nn.Module, dataset: RecordDataset, config: DeviceConfig,
                   batch_size: int = 32, progress: bool = False, tta: bool = False) -> np.ndarray:
    """Logits (float32, N x classes) of the PyTorch `model` on every item of `dataset`, in
    order. With `tta`, each logit is the mean over the image and its horizontal mirror."""
    model.eval()
    return forward_logits(TorchForward(model, config), dataset, batch_size, progress, tta)


def forward_logits(forward: Forward, dataset: RecordDataset, batch_size: int = 32,
                   progress: bool = False, tta: bool = False) -> np.ndarray:
    """`collect_logits` through any backend's forward pass."""
    out = []
    batches = eval_batches(dataset, batch_size)
    total = -(-len(dataset) // batch_size)
    for images, _, _ in tqdm(batches, total=total, disable=not progress, desc="evaluate",
                             unit="batch"):
        logits = forward(images)
        if tta:
            logits = (logits + forward(images.flip(-1))) / 2
        out.append(np.asarray(logits, dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def evaluate(loaded: LoadedModel, records: Sequence[Record], *, device: str | DeviceConfig = "auto",
             batch_size: int = 32, temperature: float | None = None, progress: bool = False,
             data: dict[str, Any] | None = None, tta: bool = False,
             input_mode: str | None = None, backend: str | None = None) -> Evaluation:
    """Evaluate `loaded` on `records` with its card's input spec and temperature, through the
    backend `backends.choose_forward` picks (`backend`: see there).

    `data` describes what was evaluated (split file, subset, sources) and is stored in the
    metrics so every figure says which images it came from. `tta` averages each image with its
    mirror (the card's temperature is kept as fitted without it). `input_mode` replaces the
    card's, e.g. to show a `mask` model the leak-free inputs and so measure the mask leak.

    A two-stage card (`ModelCard.two_stage`) is read as `predict.Predictor` reads it: records
    with a lesion in their masks by `two_stage(..., normal_from_whole=True)`, the others by the
    whole-image model alone (give records the suggested outlines, `outline.with_automatic_masks`,
    to score what the app shows without an expert outline). With `input_mode`, the lesion
    model is scored alone.
    """
    config = device if isinstance(device, DeviceConfig) else choose_device(device)
    card = loaded.card
    if card.two_stage and input_mode is None:
        whole_dir, _ = two_stage_folders(loaded.path, card)
        common: dict[str, Any] = {"device": config, "batch_size": batch_size, "progress": progress,
                                  "data": data, "tta": tta, "backend": backend}
        lesion = evaluate(loaded, records, input_mode=card.input_mode, **common)
        whole = evaluate(load_model(whole_dir), records, **common)
        found = [record_has_lesion(r) for r in records]
        result = two_stage(lesion, whole, found, data, normal_from_whole=True,
                           normal_odds=card.normal_odds_with_outline,
                           threshold=card.malignant_threshold)
        result.metrics |= {"model": card.name, "reading": result.metrics["model"], "tta": tta,
                           "input_mode": card.input_mode}
        return result
    spec = InputSpec.from_card(card)
    if input_mode is not None:
        spec = InputSpec.of(input_mode, spec.combine, spec.threshold, spec.margin, spec.size)
    dataset = RecordDataset(records, spec, classes=card.classes)
    model = prepare_model(loaded.model, config)
    forward = choose_forward(model, config, loaded.weights_id, (spec.size.crop, spec.size.crop),
                             backend)
    logits = forward_logits(forward, dataset, batch_size, progress, tta)
    t = card.temperature if temperature is None else temperature
    y = np.asarray(dataset.labels)
    probs = softmax(logits, t) if len(logits) else np.zeros((0, len(card.classes)))
    sources = [r.source for r in records]
    metrics = score(y, probs, card.classes, threshold=card.malignant_threshold, sources=sources)
    if spec.uses_masks:
        found = [record_has_lesion(r) for r in records]
        metrics["outlined_but_normal"] = int(
            metrics_lib.outlined_but_normal(found, probs, card.classes).sum())
    metrics["temperature"] = t
    metrics["model"] = card.name
    metrics["tta"] = tta
    metrics["input_mode"] = spec.mode
    metrics["data"] = data or {}
    return Evaluation(metrics, [r.id for r in records], y, probs, logits, list(card.classes),
                      sources)


def two_stage(lesion: Evaluation, whole: Evaluation, found: Sequence[bool],
              data: dict[str, Any] | None = None, *, normal_from_whole: bool = False,
              normal_odds: float = 1.0, threshold: float | None = None) -> Evaluation:
    """The two-stage reading of the same records: where the suggested outline found a lesion
    (`found`), the lesion model's probabilities (`lesion`, evaluated on those outlines);
    elsewhere the whole-image model's (`whole`). With `normal_from_whole`, P(normal) always
    comes from the whole-image model and, where a lesion was found, the lesion model only
    splits the rest between the other classes in its own proportions, P(normal)'s odds times
    `normal_odds`. Metrics over all records (`intervals.score`; with `threshold`, the figures
    at that malignant threshold), with the factor on the odds these records would give
    (`metrics.fit_normal_odds`: on a validation subset, the one to put in a card)."""
    if lesion.ids != whole.ids or len(found) != len(lesion.ids):
        raise ValueError("The two evaluations must cover the same records in the same order.")
    if lesion.classes != whole.classes:
        raise ValueError("The lesion model and the whole-image model have different classes.")
    pick = np.asarray(found, dtype=bool)[:, None]
    read = (metrics_lib.normal_from_whole(lesion.probs, whole.probs, lesion.classes,
                                          normal_odds=normal_odds)
            if normal_from_whole else lesion.probs)
    probs = np.where(pick, read, whole.probs)
    logits = np.log(np.clip(probs, 1e-12, None)).astype(np.float32)
    metrics = score(lesion.y_true, probs, lesion.classes, threshold=threshold,
                    sources=lesion.sources)
    contradicted = metrics_lib.outlined_but_normal(pick[:, 0], probs, lesion.classes)
    how = (f"{whole.metrics.get('model')} for normal, {lesion.metrics.get('model')} for the "
           "rest on the lesion outline" if normal_from_whole else
           f"{lesion.metrics.get('model')} on the lesion outline")
    metrics |= {"model": f"{how}, else {whole.metrics.get('model')}",
                "outlined": int(pick.sum()), "normal_from_whole": normal_from_whole,
                "outlined_but_normal": int(contradicted.sum()),
                "data": data or {}}
    if normal_from_whole:
        metrics |= {"normal_odds_with_outline": normal_odds,
                    "fitted_normal_odds": metrics_lib.fit_normal_odds(
                        lesion.y_true, lesion.probs, whole.probs, found, lesion.classes)}
    return Evaluation(metrics, lesion.ids, lesion.y_true, probs, logits, lesion.classes,
                      lesion.sources)


def outline_agreement(results: Mapping[str, Evaluation]) -> dict[str, Any]:
    """How far a lesion model's class depends on the outline it is given: `results` are
    evaluations of the same records under each outline variant (`masks.OUTLINE_VARIANTS`, the
    first one the reference). Per variant: the share of lesion images (true class not normal)
    whose predicted class equals the reference's; and the share where every variant agrees."""
    names = list(results)
    if not names:
        raise ValueError("No evaluations to compare.")
    first = results[names[0]]
    lesion = np.array([first.classes[y] != NORMAL for y in first.y_true])
    preds = {name: r.probs.argmax(1)[lesion] for name, r in results.items()}
    n = int(lesion.sum())
    agree = {name: float((preds[name] == preds[names[0]]).mean()) if n else None
             for name in names[1:]}
    every = np.all([preds[name] == preds[names[0]] for name in names], axis=0)
    return {"reference": names[0], "n_lesion": n, "same_class_as_reference": agree,
            "all_agree": float(every.mean()) if n else None}


def segmentation_row(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """One image's outline figures: whether it has a lesion, Dice and IoU of the outline
    `pred` against the expert mask `truth`, and whether the outline is empty."""
    dice, iou = dice_iou(pred, truth)
    return {"lesion": bool(truth.any()), "dice": dice, "iou": iou, "empty": not pred.any()}


def segmentation_summary(per_image: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean Dice / IoU over lesion images, the share of lesion images predicted empty and the
    share of lesion-free images predicted empty, from `evaluate_segmentation`'s per-image rows."""
    lesion = [r for r in per_image if r["lesion"]]
    normal = [r for r in per_image if not r["lesion"]]
    return {
        "n": len(per_image), "n_lesion": len(lesion), "n_normal": len(normal),
        "dice": float(np.mean([r["dice"] for r in lesion])) if lesion else None,
        "iou": float(np.mean([r["iou"] for r in lesion])) if lesion else None,
        "lesion_empty_share": (sum(r["empty"] for r in lesion) / len(lesion)) if lesion else None,
        "normal_empty_share": (sum(r["empty"] for r in normal) / len(normal)) if normal else None,
    }


def evaluate_segmentation(segmenter: Any, records: Sequence[Record], *, batch_size: int = 8,
                          progress: bool = False, data: dict[str, Any] | None = None
                          ) -> dict[str, Any]:
    """Score a `outline.Segmenter` against the records' expert masks (union of each record's
    masks, at the image's own pixels): `segmentation_summary` plus `per_image` rows
    {id, lesion, dice, iou, empty} and `data` (what was evaluated)."""
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(records), disable=not progress, desc="segment", unit="img")
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [load_image(r.path) for r in chunk]
        for record, image, pred in zip(chunk, images, segmenter.segment_many(images)):
            rows.append({"id": record.id,
                         **segmentation_row(pred, record_lesion_mask(record, image.shape[:2]))})
        bar.update(len(chunk))
    bar.close()
    return {**segmentation_summary(rows), "model": segmenter.card.name, "data": data or {},
            "per_image": rows}
