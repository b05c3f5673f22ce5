"""The single path from a file (+ masks) to calibrated probabilities and a Grad-CAM map, used by
the CLI, the app and the benchmark alike:

    file --io.load_image--> image --inputs.model_input--> (masked crop) --eval transform--> tensor
         --backends.Forward (OpenVINO on CPUs, else PyTorch)--> logits
         --/ temperature, softmax--> probabilities
         --cam.compute_cam (PyTorch)--> map --cam.overlay--> overlay on what the model saw
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from bus_core import cam as cam_lib
from bus_core.backends import choose_forward
from bus_core.constants import MALIGNANT
from bus_core.dataset import Record
from bus_core.device import DeviceConfig, choose_device, prepare_model
from bus_core.errors import ModelError
from bus_core.inputs import InputSpec, model_input
from bus_core.io import check_min_side, load_image, load_mask
from bus_core.loader import RecordDataset
from bus_core.metrics import TARGET_SENSITIVITY, percent_pair, softmax
from bus_core.models import LoadedModel, gradcam_layer, load_model
from bus_core.registry import active_model_path, no_model_message
from bus_core.transforms import denormalise, eval_transform

SCOPE_GRID = 128
"""The colour check looks at a grid of at least this many pixels per side."""
USUAL_SIDES = (128, 5000)
"""Image sides (px) outside this range get a scope warning."""


@dataclass
class Prediction:
    """A calibrated prediction for one image, with what the model saw."""

    label: str
    probabilities: dict[str, float]
    uncertain: bool
    model: str
    model_view: np.ndarray
    tensor: torch.Tensor
    warnings: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0
    malignant_threshold: float | None = None
    activations: np.ndarray | None = field(default=None, repr=False)
    """The Grad-CAM layer's fp32 activations (K x h x w) when the backend returned them with
    the logits (then the CAM needs no second pass)."""

    @property
    def malignant_flag(self) -> bool | None:
        """True when P(malignant) reaches the card's sensitivity-first threshold (None for a
        model without one)."""
        if self.malignant_threshold is None or MALIGNANT not in self.probabilities:
            return None
        return self.probabilities[MALIGNANT] >= self.malignant_threshold

    def flag_sentence(self) -> str:
        """The malignant flag as a sentence for the page and the report ('' when not raised)."""
        if not self.malignant_flag or self.malignant_threshold is None:
            return ""
        shown, limit = percent_pair(self.probabilities[MALIGNANT], self.malignant_threshold)
        return (f"Malignant probability {shown}: at or above this model's sensitivity-first "
                f"threshold ({limit}, set on validation to find "
                f"{TARGET_SENSITIVITY:.0%} of cancers), whatever the "
                "top class.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no arrays)."""
        return {"label": self.label, "probabilities": self.probabilities,
                "uncertain": self.uncertain, "malignant_flag": self.malignant_flag,
                "malignant_threshold": self.malignant_threshold, "model": self.model,
                "warnings": self.warnings, "elapsed_ms": round(self.elapsed_ms, 1)}


def scope_warnings(image: np.ndarray) -> list[str]:
    """Reasons an image may be outside what the model was trained on (empty when none)."""
    warnings = []
    h, w = image.shape[:2]
    if min(h, w) < USUAL_SIDES[0] or max(h, w) > USUAL_SIDES[1] or max(h, w) / min(h, w) > 4:
        warnings.append(f"Unusual image size ({w}x{h} px): the model was trained on breast "
                        "ultrasound images of about 200-1000 px per side.")
    step = max(1, min(h, w) // SCOPE_GRID)  # a coarser grid: the shares barely change
    r, g, b = (image[::step, ::step, c] for c in range(3))
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # max >= min
    coloured = float((chroma > 60).mean())
    if coloured > 0.25:
        warnings.append("Most of the image is coloured: this does not look like a B-mode "
                        "breast ultrasound image, so the prediction is not meaningful.")
    elif coloured > 0.005:
        warnings.append("Colour overlay detected (colour Doppler, elastography or annotations): "
                        "the model was trained mostly on grayscale B-mode images.")
    return warnings


@dataclass(frozen=True)
class Prepare:
    """What a model with input `spec` sees of an image: the normalised CHW tensor of its input
    (full image or masked crop) and the image's scope warnings. Holds no model, so it can be
    sent to data-loading worker processes."""

    spec: InputSpec

    def __call__(self, image: np.ndarray,
                 masks: Sequence[np.ndarray] = ()) -> tuple[torch.Tensor, list[str]]:
        """(tensor, scope warnings) of one RGB uint8 image and its lesion masks; an image with
        a side under `io.MIN_SIDE` raises `InvalidImageError`, a lesion model without a mask
        `MaskError`."""
        check_min_side(image)
        tensor = eval_transform(self.spec.size)(model_input(image, masks, self.spec))
        return tensor, scope_warnings(image)


class Predictor:
    """A loaded model ready to predict and explain; safe to share between threads."""

    def __init__(self, loaded: LoadedModel, device: str | DeviceConfig = "auto",
                 backend: str | None = None) -> None:
        self.loaded = loaded
        self.card = loaded.card
        self.device = device if isinstance(device, DeviceConfig) else choose_device(device)
        self.model = prepare_model(loaded.model, self.device)
        self.spec = InputSpec.from_card(self.card)
        self._lock = threading.Lock()
        side = self.spec.size.crop  # both fits ('crop', 'pad') give a crop x crop tensor
        self.forward = choose_forward(self.model, self.device, loaded.weights_id, (side, side),
                                      backend)

    @classmethod
    def from_path(cls, path: str | Path | None = None, device: str = "auto",
                  backend: str | None = None) -> Predictor:
        """A predictor for the model folder `path` (default: the active model)."""
        folder = path or active_model_path()
        if folder is None:
            raise ModelError(no_model_message())
        return cls(load_model(folder), device, backend)

    @property
    def description(self) -> str:
        """Where the forward pass runs, e.g. 'OpenVINO 2026.4.1, CPU, bf16'."""
        return self.forward.description

    @property
    def classes(self) -> list[str]:
        """Class names in output order."""
        return list(self.card.classes)

    @property
    def prepare(self) -> Prepare:
        """(tensor, scope warnings) of an image (+ masks): what `predict` feeds the model."""
        return Prepare(self.spec)

    def predict(self, image: np.ndarray, masks: Sequence[np.ndarray] = ()) -> Prediction:
        """Calibrated probabilities for one RGB uint8 image (and its lesion masks); an image
        with a side under `io.MIN_SIDE` raises `InvalidImageError`."""
        start = time.perf_counter()
        tensor, warnings = self.prepare(image, masks)
        prediction = self.predict_batch(tensor.unsqueeze(0), [warnings])[0]
        prediction.elapsed_ms = (time.perf_counter() - start) * 1000
        return prediction

    def predict_batch(self, batch: torch.Tensor,
                      warnings: Sequence[list[str]] | None = None) -> list[Prediction]:
        """Calibrated predictions for a batch (N x 3 x H x W) of tensors made by `prepare`,
        with each image's scope warnings (default none); the same figures as `predict`."""
        with self._lock:
            logits, activations = self.forward.run(batch)
        probs = softmax(logits, self.card.temperature)
        return [self._prediction(probs[i], batch[i], list(warnings[i]) if warnings else [],
                                 None if activations is None else activations[i])
                for i in range(len(batch))]

    def _prediction(self, probs: np.ndarray, tensor: torch.Tensor, warnings: list[str],
                    activations: np.ndarray | None) -> Prediction:
        """The Prediction of one image from its calibrated probabilities."""
        top = int(probs.argmax())
        return Prediction(
            label=self.classes[top],
            probabilities={c: float(p) for c, p in zip(self.classes, probs)},
            uncertain=bool(probs[top] < self.card.uncertain_below),
            model=self.card.name, model_view=denormalise(tensor), tensor=tensor,
            warnings=warnings, malignant_threshold=self.card.malignant_threshold,
            activations=activations)

    def explain(self, prediction: Prediction, target: str | None = None,
                method: str = "gradcam") -> np.ndarray:
        """The CAM (HxW in [0, 1], over `prediction.model_view`) for class `target`
        (default: the predicted class)."""
        target_class = self.classes.index(target or prediction.label)
        if method == "gradcam" and prediction.activations is not None and \
                cam_lib.pools_into_linear(self.model):
            return cam_lib.gradcam_from_activations(
                prediction.activations, cam_lib.head_weights(self.model, target_class),
                (prediction.tensor.shape[-2], prediction.tensor.shape[-1]))
        layer = gradcam_layer(self.model, self.card.arch)
        with self._lock:
            return cam_lib.compute_cam(self.model, layer, prediction.tensor, target_class, method)


def explain_record(predictor: Predictor, record: Record, probabilities: Sequence[float],
                   target: str) -> tuple[np.ndarray, np.ndarray]:
    """(what the model saw, its CAM for class `target`) for a dataset record, over exactly the
    input an evaluation gives the model (for mask models: the masked crop of its masks, or the
    leak-free crop of a lesion-free image); `probabilities` are the evaluation's for it."""
    tensor, _ = RecordDataset([record], predictor.spec, classes=predictor.classes)[0]
    top = int(np.argmax(probabilities))
    prediction = Prediction(label=predictor.classes[top], model=predictor.card.name,
                            probabilities=dict(zip(predictor.classes, map(float, probabilities))),
                            uncertain=False, model_view=denormalise(tensor), tensor=tensor)
    return prediction.model_view, predictor.explain(prediction, target)


def predict_file(image: str | Path | bytes | BinaryIO, masks: Sequence[str | Path] = (),
                 predictor: Predictor | None = None) -> Prediction:
    """Load an image file (+ mask files) and predict with `predictor` (default: active model)."""
    predictor = predictor or Predictor.from_path()
    array = load_image(image)
    mask_arrays = [load_mask(m, shape=array.shape[:2]) for m in masks]
    return predictor.predict(array, mask_arrays)
