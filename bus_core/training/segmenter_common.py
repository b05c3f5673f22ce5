"""What the segmenter's training (bus_core.training.segmenter) and its release
(bus_core.training.segmenter_release) share: the run's settings, the decoded subsets, the
forward pass over them and the per-source figures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bus_core.data.augment import eval_batch
from bus_core.data.dataset import Record, load_records
from bus_core.data.splits import load_split, split_records
from bus_core.evaluation.evaluate import segmentation_summary
from bus_core.models.unet import DenseNetUNet, PostProcess, dice_iou, postprocess
from bus_core.runtime.device import autocast, to_device
from bus_core.training.runs import RunFiles


@dataclass
class SegTrainConfig:
    """Every setting of a segmentation / multi-task run (saved as train/config.json)."""

    data: list[str]
    split: list[str]
    out: str
    init: str = "random"
    size: int = 224
    cache_size: int = 256
    epochs: int = 30
    epoch_size: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    cls_weight: float = 1.0
    freeze_stem: bool = True
    freeze_encoder: bool = False
    normal_crops: float = 0.2
    label_smoothing: float = 0.05
    seed: int = 0
    device: str = "auto"
    checkpoint_every: float = 300.0
    save_dtype: str = "float16"
    name: str = "densenet121-unet-lesion-v1"
    classifier_name: str = "densenet121-multitask-v1"
    style_augment: bool = False
    mixstyle: float = 0.0
    ema: float = 0.0
    ema_warmup: bool = False
    time_limit: float = 0.0

    @property
    def run_dir(self) -> Path:
        """Progress, checkpoint and packed data of the run."""
        return RunFiles(Path(self.out)).dir


@dataclass
class Packed:
    """Decoded records of one subset: square images, union masks and labels."""

    ids: list[str]
    images: np.ndarray  # N x S x S x 3 uint8
    masks: np.ndarray  # N x S x S uint8 (0/1)
    labels: np.ndarray  # N int (CLASSES index)
    sources: np.ndarray  # N int (index into `source_names`)
    content: np.ndarray  # N x 4 int: x0, y0, x1, y1 of the image inside the square
    source_names: list[str]

    def __len__(self) -> int:
        return len(self.ids)


@torch.inference_mode()
def forward_packed(model: DenseNetUNet, packed: Packed, device: Any, batch_size: int = 32
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(lesion probabilities N x S x S float16, class logits N x C or None) over a Packed."""
    model.eval()
    probs, logits = [], []
    for start in range(0, len(packed), batch_size):
        x = eval_batch(torch.from_numpy(packed.images[start:start + batch_size]))
        with autocast(device):
            seg, cls = model.forward_both(to_device(x, device))
        probs.append(torch.sigmoid(seg.float())[:, 0].cpu().numpy().astype(np.float16))
        if cls is not None:
            logits.append(cls.float().cpu().numpy())
    return np.concatenate(probs), (np.concatenate(logits) if logits else None)


THRESHOLD_ONLY = PostProcess(threshold=0.5, min_area=0.0, fill_holes=False)
"""The plain 0.5 threshold that validation scores each epoch with."""


def square_figures(probs: np.ndarray, packed: Packed,
                   params: PostProcess = THRESHOLD_ONLY) -> dict[str, Any]:
    """Per source: `evaluate.segmentation_summary` (Dice / IoU / empty shares) of the masks
    `params` makes of `probs`, in the packed square frame."""
    out: dict[str, Any] = {}
    for s, name in enumerate(packed.source_names):
        rows: list[dict[str, Any]] = []
        for i in np.flatnonzero(packed.sources == s):
            pred = postprocess(probs[i].astype(np.float32), params)
            truth = packed.masks[i] > 0
            dice, iou = dice_iou(pred, truth)
            rows.append({"lesion": bool(truth.any()), "dice": dice, "iou": iou,
                         "empty": not pred.any()})
        out[name] = segmentation_summary(rows)
    return out


def source_subsets(config: SegTrainConfig, subset: str) -> list[tuple[str, str, list[Record]]]:
    """(source name, split file, records) of `subset` for every source, by its own split."""
    out = []
    for source, split_file in zip(config.data, config.split):
        records = split_records(load_records(source), load_split(split_file), subset)
        out.append((records[0].source if records else Path(source).name, split_file, records))
    return out
