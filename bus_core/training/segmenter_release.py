"""The end of a `train-seg` run: from the best epochs to released model folders with cards.

- `<out>/segmenter/`: the encoder + decoder of the epoch with the best validation segmentation
  score; the post-processing (threshold, smallest component) chosen on validation; test figures
  of every source at the images' own pixels (the test subsets are read here, once).
- `<out>/segmenter-last/` (`--export-last`): the same from the last epoch's weights, to compare
  with the best epoch by validation score where the outline serves a reading.
- `<out>/classifier/`: the encoder + class head of the epoch with the best validation
  classification score, as a plain DenseNet121 classifier (fit 'pad'); the temperature and the
  sensitivity-first malignant threshold fitted on the pooled validation subsets; test figures.
Both are written in `save_dtype`, and every figure is computed on the weights as saved.
"""

from __future__ import annotations

import dataclasses
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from bus_core.constants import CLASSES
from bus_core.data.splits import load_split
from bus_core.evaluation.evaluate import evaluate, evaluate_segmentation
from bus_core.inference.outline import Segmenter
from bus_core.metrics import fit_malignant_threshold, fit_temperature, softmax
from bus_core.models.build import LoadedModel, build_model, file_sha256, save_model
from bus_core.models.card import ModelCard, new_card
from bus_core.models.unet import SEG_ARCH, DenseNetUNet, PostProcess
from bus_core.runtime.device import DeviceConfig, prepare_model
from bus_core.training.runs import ProgressLog
from bus_core.training.segmenter_common import (
    Packed,
    SegTrainConfig,
    forward_packed,
    source_subsets,
    square_figures,
)
from bus_core.training.train import round_weights

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_AREAS = (0.0, 0.001, 0.003, 0.01)
MIN_FOUND = 0.95
"""Post-processing that leaves more than 5% of validation lesion images empty is not chosen
(unless every candidate does)."""


def _load_part(net: torch.nn.Module, path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """`net` with its tensors from the weights file (a multi-task network's), rounded to the
    saved dtype, in eval mode."""
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in load_file(path).items() if k in own})
    round_weights(net, dtype)
    return net.eval()


def choose_postprocess(probs: np.ndarray, packed: Packed) -> tuple[PostProcess, dict[str, Any]]:
    """The threshold x smallest-component pair with the best mean over sources of lesion Dice
    and normal-empty share, among those finding a lesion in >= MIN_FOUND of lesion images."""
    best: tuple[tuple[bool, float], PostProcess, dict[str, Any]] | None = None
    for threshold, min_area in product(THRESHOLDS, MIN_AREAS):
        params = PostProcess(threshold, min_area, True)
        figures = square_figures(probs, packed, params)
        found = min(1 - v["lesion_empty_share"] for v in figures.values() if v["n_lesion"])
        parts = [v["dice"] for v in figures.values() if v["dice"] is not None]
        parts += [v["normal_empty_share"] for v in figures.values()
                  if v["normal_empty_share"] is not None]
        key = (found >= MIN_FOUND, float(np.mean(parts)))
        if best is None or key > best[0]:
            best = (key, params, figures)
    assert best is not None
    return best[1], best[2]


def _provenance(config: SegTrainConfig) -> dict[str, Any]:
    files = []
    for source, split_file in zip(config.data, config.split):
        split = load_split(split_file)
        files.append({"data": source, "file": split_file,
                      "file_sha256": file_sha256(Path(split_file)),
                      "data_hash": split.data_hash, "seed": split.seed})
    return {"files": files, "file": config.split[0], "data_hash": files[0]["data_hash"]}


def export_segmenter(config: SegTrainConfig, device: DeviceConfig, state: dict[str, Any],
                     val_packed: Packed, log: ProgressLog, last: bool = False) -> ModelCard:
    """Write `<out>/segmenter` (see module docstring), or with `last` `<out>/segmenter-last`
    from the last epoch's weights."""
    dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
    net = DenseNetUNet(num_classes=0)
    _load_part(net, config.run_dir / f"{'last' if last else 'best'}-seg.safetensors", dtype)
    prepare_model(net, device)
    probs, _ = forward_packed(net, val_packed, device)
    params, val_figures = choose_postprocess(probs, val_packed)
    card = ModelCard(
        name=config.name, arch=SEG_ARCH, task="segmentation", classes=["lesion"],
        input_size={"resize": config.size, "crop": config.size, "fit": "pad"},
        postprocess=dataclasses.asdict(params), init=config.init,
        training_data={"sources": config.data, "subset": "train"},
        split=_provenance(config),
        hyperparameters={k: getattr(config, k) for k in (
            "size", "epochs", "epoch_size", "batch_size", "lr", "encoder_lr", "weight_decay",
            "cls_weight", "freeze_stem", "freeze_encoder", "normal_crops", "seed",
            "style_augment", "mixstyle", "ema", "ema_warmup", "time_limit")}
        | {"best_epoch": state["best_seg"]["epoch"], "epochs_trained": state["epoch"],
           "exported_epoch": state["epoch"] if last else state["best_seg"]["epoch"]},
        metrics={"val": val_figures, "val_frame": "padded square at the input size"},
        training_time_s=round(state["train_time_s"], 1),
        notes=(f"Decoder trained alone on the encoder of {config.init}, frozen"
               if config.freeze_encoder else
               f"Multi-task run ({config.cls_weight} x classification loss)")
        + f"; device {device.description}.")
    out = Path(config.out) / ("segmenter-last" if last else "segmenter")
    save_model(net, card, out, dtype=dtype)
    segmenter = Segmenter(LoadedModel(net, card, out), device)
    test: dict[str, Any] = {}
    for name, split_file, records in source_subsets(config, "test"):
        result = evaluate_segmentation(segmenter, records, progress=True,
                                       data={"subset": "test", "split_file": split_file,
                                             "n": len(records)})
        test[name] = {k: v for k, v in result.items() if k != "per_image"}
    card.metrics["test"] = test
    save_model(net, card, out, dtype=dtype)
    log.write("exported", what="segmenter", out=str(out), postprocess=card.postprocess,
              test=test)
    return card


def export_classifier(config: SegTrainConfig, device: DeviceConfig, state: dict[str, Any],
                      log: ProgressLog) -> ModelCard:
    """Write `<out>/classifier` (see module docstring)."""
    dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
    net = _load_part(build_model("densenet121", len(CLASSES)),
                     config.run_dir / "best-cls.safetensors", dtype)
    size = {"resize": config.size, "crop": config.size, "fit": "pad"}
    card = new_card(config.classifier_name, "densenet121", input_size=size, init=config.init)
    loaded = LoadedModel(net, card, Path(config.out) / "classifier")
    val = [(name, f, evaluate(loaded, recs, device=device, temperature=1.0))
           for name, f, recs in source_subsets(config, "val")]
    logits = np.concatenate([e.logits for _, _, e in val])
    y = np.concatenate([e.y_true for _, _, e in val])
    card.temperature = fit_temperature(logits, y)
    card.malignant_threshold = fit_malignant_threshold(y, softmax(logits, card.temperature))
    metrics: dict[str, Any] = {"threshold_rule": "highest P(malignant) threshold with malignant "
                               "sensitivity >= 0.90 on the pooled validation subsets",
                               "by_source": {}}
    for subset in ("val", "test"):
        for i, (name, split_file, records) in enumerate(source_subsets(config, subset)):
            result = evaluate(loaded, records, device=device, progress=subset == "test",
                              data={"subset": subset, "split_file": split_file,
                                    "sources": [config.data[i]], "n": len(records)}).metrics
            if i == 0:
                metrics[subset] = result
            metrics["by_source"].setdefault(name, {})[subset] = result
    card.metrics = metrics
    card.training_data = {"sources": config.data, "subset": "train",
                          "normal_crops": config.normal_crops}
    card.split = _provenance(config)
    card.hyperparameters = {"best_epoch": state["best_cls"]["epoch"],
                            "epochs_trained": state["epoch"], "trained_with":
                            "train-seg (multi-task)", "cls_weight": config.cls_weight,
                            "mixstyle": config.mixstyle}
    card.training_time_s = round(state["train_time_s"], 1)
    card.notes = (f"Encoder shared with {config.name} (multi-task training); whole image padded "
                  f"to a square; device {device.description}.")
    out = save_model(net, card, Path(config.out) / "classifier", dtype=dtype)
    log.write("exported", what="classifier", out=str(out), test=metrics["test"].get("accuracy"))
    return card


def export_run(config: SegTrainConfig, device: DeviceConfig, state: dict[str, Any],
               val_packed: Packed, log: ProgressLog, last: bool = False) -> None:
    """Export the segmenter and (for a multi-task run) the classifier from the best epochs
    saved on disk, and with `last` the segmenter of the last epoch too; log 'done'."""
    export_segmenter(config, device, state, val_packed, log)
    if last:
        export_segmenter(config, device, state, val_packed, log, last=True)
    if state.get("best_cls"):
        export_classifier(config, device, state, log)
    log.write("done", out=str(config.out))
