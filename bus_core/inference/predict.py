"""The single path from a file (+ masks) to calibrated probabilities and a Grad-CAM map, used by
the CLI, the app and the benchmark alike:

    file --io.load_image--> image --inputs.model_input--> (masked crop) --eval transform--> tensor
         --backends.Forward (OpenVINO on CPUs, else PyTorch)--> logits
         --/ temperature, softmax--> probabilities
         --cam.compute_cam (PyTorch)--> map --cam.overlay--> overlay on what the model saw

A lesion model whose card names a `two_stage` pair reads in two stages: its outline model
suggests the lesion outline when none is given; the whole-image model gives P(normal) and reads
images without an outline; this model splits the rest between benign and malignant from the
crop around the outline (`metrics.normal_from_whole`). Where the outline model was trained on
the whole-image model's encoder, frozen (`shares_first_stage`), the two run as one network
(`unet.SharedFirstStage`): one encoder pass gives the outline and P(normal), and a reading
runs two networks in all. Otherwise, where the CPU has at least two physical cores the outline
model and the whole-image model run at the same time; where the whole-image model takes the
same padded square as the outline model, the image is fitted to it once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import torch

from bus_core.constants import MALIGNANT, NORMAL
from bus_core.data.augment import eval_batch
from bus_core.data.dataset import Record
from bus_core.data.images import check_min_side, load_image, load_mask
from bus_core.data.inputs import InputSpec, model_input, record_has_lesion
from bus_core.data.loader import RecordDataset
from bus_core.data.presets import denormalise, eval_transform, fit_square
from bus_core.errors import ModelError
from bus_core.inference import cam as cam_lib
from bus_core.inference.outline import Segmenter
from bus_core.metrics import (
    OUTLINE_CONTRADICTION,
    TARGET_SENSITIVITY,
    normal_from_whole,
    outlined_but_normal,
    percent_pair,
    softmax,
)
from bus_core.models.build import LoadedModel, gradcam_layer, load_model, pools_into_linear
from bus_core.models.card import ModelCard, read_card
from bus_core.models.registry import active_model_path, no_model_message, two_stage_folders
from bus_core.models.unet import DenseNetUNet, SharedFirstStage, shares_encoder
from bus_core.runtime.backends import Forward, OneOutput, OpenVinoForward, choose_forward
from bus_core.runtime.device import DeviceConfig, choose_device, physical_cores, prepare_model

SIDE_BY_SIDE_CORES = 4
"""Physical cores from which a two-stage reading runs its outline and whole-image models at the
same time: on 2 cores each OpenVINO model already uses both, and side by side was slower
(`bench --quick`, 2-core Xeon with AMX, load 1.2: 150 ms against 115 ms one after the other)."""
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
    read_by: str = ""
    """The model whose input `model_view` is (and whose CAM explains it): '' for `model`
    itself; a two-stage reading names its whole-image model when it had no outline."""
    reading: str = ""
    """How a two-stage reading was made, in one sentence ('' for a single model)."""
    outline: np.ndarray | None = field(default=None, repr=False)
    """The outline (HxW bool) the predictor's outline model suggested and the reading used;
    None when the outline was given or there was none."""
    whole: Prediction | None = field(default=None, repr=False)
    """A two-stage reading with an outline: the whole-image model's own prediction, which
    gave P(normal) (None otherwise)."""

    def explained_by(self, target: str) -> Prediction:
        """The prediction whose model gave the probability of `target`, and so whose input a
        map for `target` is drawn over: the whole-image model's for 'normal' in a two-stage
        reading with an outline, else this one."""
        return self.whole if self.whole is not None and target == NORMAL else self
    stages_ms: dict[str, float] = field(default_factory=dict)
    """A two-stage reading's time in each of its networks ('whole', 'outline', 'lesion'; the
    first two may overlap; 'first_stage' for the two as one network); empty for a single
    model."""

    @property
    def malignant_flag(self) -> bool | None:
        """True when P(malignant) reaches the card's sensitivity-first threshold (None for a
        model without one)."""
        if self.malignant_threshold is None or MALIGNANT not in self.probabilities:
            return None
        return self.probabilities[MALIGNANT] >= self.malignant_threshold

    def flag_sentence(self) -> str:
        """The malignant flag as a sentence for the page and the report ('' when not raised)."""
        return flag_sentence(self.probabilities, self.malignant_threshold)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no arrays)."""
        return {"label": self.label, "probabilities": self.probabilities,
                "uncertain": self.uncertain, "malignant_flag": self.malignant_flag,
                "malignant_threshold": self.malignant_threshold, "model": self.model,
                **({"reading": self.reading} if self.reading else {}),
                "warnings": self.warnings, "elapsed_ms": round(self.elapsed_ms, 1)}


def flag_sentence(probabilities: Mapping[str, float], threshold: float | None) -> str:
    """The sensitivity-first malignant flag as a sentence for pages and reports ('' when
    P(malignant) is below `threshold`, or there is no threshold)."""
    if threshold is None or probabilities.get(MALIGNANT, -1.0) < threshold:
        return ""
    shown, limit = percent_pair(probabilities[MALIGNANT], threshold)
    return (f"Malignant probability {shown}: at or above this model's sensitivity-first "
            f"threshold ({limit}, set on validation to find {TARGET_SENSITIVITY:.0%} of "
            "cancers), whatever the top class.")


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
        a side under `images.MIN_SIDE` raises `InvalidImageError`, a lesion model without a mask
        `MaskError`."""
        check_min_side(image)
        tensor = eval_transform(self.spec.size)(model_input(image, masks, self.spec))
        return tensor, scope_warnings(image)


def shares_first_stage(whole: ModelCard, outline: ModelCard) -> bool:
    """True when a two-stage reading's whole-image model and outline model run as one network:
    the outline model says it was trained on the whole-image model's encoder, frozen
    (`train-seg --freeze-encoder --init` that model), and both take the same padded square.
    `Predictor` checks the encoders are the same, tensor for tensor."""
    return bool(outline.hyperparameters.get("freeze_encoder")) and \
        Path(outline.init).name == whole.name and whole.input_mode == "full" and \
        whole.size.fit == "pad" and whole.size.crop == outline.size.crop


def network_count(folder: str | Path, card: ModelCard) -> int:
    """How many networks a `Predictor` of the model in `folder` (card `card`) prepares: for a
    two-stage card its own and its first stage (the whole-image model and the outline model:
    one network when `shares_first_stage`, else two), else one."""
    if not card.two_stage:
        return 1
    whole_dir, outline_dir = two_stage_folders(Path(folder), card)
    return 2 if shares_first_stage(read_card(whole_dir), read_card(outline_dir)) else 3


class Predictor:
    """A loaded model ready to predict and explain; safe to share between threads."""

    def __init__(self, loaded: LoadedModel, device: str | DeviceConfig = "auto",
                 backend: str | None = None, *,
                 on_network: Callable[[str], None] | None = None,
                 side_by_side: bool | None = None, share: bool = True,
                 forward: Forward | None = None) -> None:
        """`on_network` is called with each network's model name once it is ready to run
        (`network_count` calls in all). `side_by_side`: whether a two-stage reading runs its
        outline and whole-image models at the same time (default: where the CPU has at least
        `SIDE_BY_SIDE_CORES` physical cores). `share`: whether a first stage that can run as
        one network does (`shares_first_stage`; False runs its two models apart, for
        comparison). `forward`: a forward pass already prepared for this model (a shared first
        stage's)."""
        self.loaded = loaded
        self.card = loaded.card
        self.device = device if isinstance(device, DeviceConfig) else choose_device(device)
        self.model = prepare_model(loaded.model, self.device)
        self.spec = InputSpec.from_card(self.card)
        self._lock = threading.Lock()
        side = self.spec.size.crop  # both fits ('crop', 'pad') give a crop x crop tensor
        self.forward = forward or choose_forward(self.model, self.device, loaded.weights_id,
                                                 (side, side), backend)
        if on_network is not None:
            on_network(self.card.name)
        self.whole: Predictor | None = None
        """The whole-image model of a two-stage reading (None: this model reads alone)."""
        self.outliner: Segmenter | None = None
        """The outline model of a two-stage reading."""
        self._side_by_side: ThreadPoolExecutor | None = None
        self.shared_square = False
        """True when the whole-image model takes the outline model's padded square (a
        two-stage reading then fits the image once for both)."""
        self.first_stage: Forward | None = None
        """The whole-image model and the outline model as one network, when they share their
        encoder (`shares_first_stage`): outputs (lesion logits, class logits, activations)."""
        if self.card.two_stage:
            self._load_first_stage(backend, on_network, side_by_side, share)

    def _load_first_stage(self, backend: str | None, on_network: Callable[[str], None] | None,
                          side_by_side: bool | None, share: bool) -> None:
        """Prepare the whole-image model and the outline model of a two-stage card."""
        whole_dir, outline_dir = two_stage_folders(self.loaded.path, self.card)
        whole, outline = load_model(whole_dir), load_model(outline_dir)
        outline_device = choose_device("cpu-fp32") if self.device.device.type == "cpu" \
            else self.device
        whole_forward = outline_forward = None
        if share and shares_first_stage(whole.card, outline.card):
            if not shares_encoder(outline.model, whole.model):
                raise ModelError(f"{outline.card.name} says it was trained on the encoder of "
                                 f"{whole.card.name}, but their encoders differ: one of the two "
                                 "was changed. Install the pair as it was released.")
            network = prepare_model(SharedFirstStage(cast(DenseNetUNet, outline.model),
                                                     whole.model), outline_device)
            side = outline.card.size.crop
            self.first_stage = choose_forward(network, outline_device, outline.weights_id,
                                              (side, side), backend,
                                              variant=f"with-{whole.weights_id[:16]}")
            exact = isinstance(self.first_stage, OpenVinoForward)  # see TorchForward.run
            whole_forward = OneOutput(self.first_stage, 1, 2 if exact else None)
            outline_forward = OneOutput(self.first_stage, 0)
        self.whole = Predictor(whole, self.device, backend, on_network=on_network,
                               forward=whole_forward)
        if self.whole.reads_masks or self.whole.classes != self.classes or \
                self.whole.card.name == self.card.name:
            raise ModelError(f"{self.card.name} names {self.whole.card.name} as its "
                             "whole-image model, but that model does not read the whole "
                             "image with the same classes.")
        self.outliner = Segmenter(outline, outline_device, backend, forward=outline_forward)
        if on_network is not None and self.first_stage is None:
            on_network(self.outliner.card.name)
        if self.first_stage is None and (
                physical_cores() >= SIDE_BY_SIDE_CORES if side_by_side is None else side_by_side):
            self._side_by_side = ThreadPoolExecutor(1, thread_name_prefix="outline")
        whole_spec = self.whole.spec
        self.shared_square = whole_spec.mode == "full" and \
            whole_spec.size.fit == "pad" and whole_spec.size.crop == self.outliner.size

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

    @property
    def side_by_side(self) -> bool:
        """True when a two-stage reading runs its outline and whole-image models at the same
        time."""
        return self._side_by_side is not None

    @property
    def reads_masks(self) -> bool:
        """True when lesion masks change this predictor's reading: its model reads the lesion
        (for a two-stage reading, its lesion model does). A whole-image model ignores the masks
        it is given."""
        return self.spec.uses_masks

    @property
    def two_stage(self) -> bool:
        """True when this predictor reads in two stages (see the module docstring)."""
        return self.whole is not None

    def predict(self, image: np.ndarray, masks: Sequence[np.ndarray] = (), *,
                suggest: bool = True) -> Prediction:
        """Calibrated probabilities for one RGB uint8 image and the lesion masks there are (a
        model that reads the whole image ignores them: see `reads_masks`); an image with a
        side under `images.MIN_SIDE` raises `InvalidImageError`. A two-stage predictor given no
        mask outlines the lesion itself when `suggest`, and reads with its whole-image model
        when there is no outline."""
        start = time.perf_counter()
        if self.whole is not None:
            prediction = self._two_stage(image, [m for m in masks if m.any()], suggest)
        else:
            tensor, warnings = self.prepare(image, masks)
            prediction = self.predict_batch(tensor.unsqueeze(0), [warnings])[0]
        outlined = self.reads_masks and (prediction.outline is not None or any(
            m.any() for m in masks)) and prediction.read_by == ""
        probs = np.array([[prediction.probabilities[c] for c in self.classes]])
        if outlined_but_normal([outlined], probs, self.classes)[0]:
            prediction.uncertain = True
            prediction.warnings = [*prediction.warnings, OUTLINE_CONTRADICTION]
        prediction.elapsed_ms = (time.perf_counter() - start) * 1000
        return prediction

    def _two_stage(self, image: np.ndarray, masks: list[np.ndarray],
                   suggest: bool) -> Prediction:
        """The two-stage reading of one image (see the module docstring)."""
        assert self.whole is not None and self.outliner is not None
        whole, suggested, stages = self._whole_and_outline(image, not masks and suggest)
        if suggested is not None and suggested.any():
            masks = [suggested]
        if not masks:
            top = max(whole.probabilities, key=whole.probabilities.__getitem__)
            return replace(whole, model=self.card.name, read_by=self.whole.card.name,
                           stages_ms=stages,
                           uncertain=whole.probabilities[top] < self.card.uncertain_below,
                           malignant_threshold=self.card.malignant_threshold,
                           reading=f"No lesion outline{' found' if suggest else ''}: the "
                                   f"reading of {self.whole.card.name} on the whole image.")
        start = time.perf_counter()
        tensor, warnings = self.prepare(image, masks)
        with self._lock:
            logits, activations = self.forward.run(tensor.unsqueeze(0))
        stages["lesion"] = (time.perf_counter() - start) * 1000
        lesion = softmax(logits, self.card.temperature)
        whole_probs = np.array([[whole.probabilities[c] for c in self.classes]])
        probs = normal_from_whole(lesion, whole_probs, self.classes,
                                  normal_odds=self.card.normal_odds_with_outline)[0]
        made = (f" (outline suggested by {self.outliner.card.name})" if suggested is not None
                else "")
        return replace(self._prediction(probs, tensor, warnings,
                                        None if activations is None else activations[0]),
                       outline=suggested, whole=whole, stages_ms=stages,
                       reading=f"Two-stage reading: P(normal) from {self.whole.card.name} on "
                               f"the whole image; benign vs malignant from {self.card.name} "
                               f"on the lesion and its surroundings{made}.")

    def _whole_and_outline(self, image: np.ndarray, outline: bool
                           ) -> tuple[Prediction, np.ndarray | None, dict[str, float]]:
        """(the whole-image model's reading, the outline model's suggestion when `outline`
        else None, each one's ms), side by side where the CPU has the cores."""
        assert self.whole is not None and self.outliner is not None
        if self.first_stage is not None:
            return self._first_stage_reading(image, outline)
        whole_model, outliner = self.whole, self.outliner
        stages: dict[str, float] = {}
        if self.shared_square:
            check_min_side(image)
            square, fit = fit_square(image, outliner.size)
            batch = eval_batch(torch.from_numpy(square[None]))

            def read_whole() -> Prediction:
                return whole_model.predict_batch(batch, [scope_warnings(image)])[0]

            def find_outline() -> np.ndarray:
                return outliner.segment_squares(batch, [fit], [image.shape[:2]])[0]
        else:
            def read_whole() -> Prediction:
                return whole_model.predict(image)

            def find_outline() -> np.ndarray:
                return outliner.segment(image)

        def timed(name: str, run: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            result = run()
            stages[name] = (time.perf_counter() - start) * 1000
            return result

        if not outline:
            return timed("whole", read_whole), None, stages
        if self._side_by_side is None:
            return timed("whole", read_whole), timed("outline", find_outline), stages
        suggestion = self._side_by_side.submit(timed, "outline", find_outline)
        whole = timed("whole", read_whole)
        return whole, suggestion.result(), stages

    def _first_stage_reading(self, image: np.ndarray, outline: bool
                             ) -> tuple[Prediction, np.ndarray | None, dict[str, float]]:
        """`_whole_and_outline` from one pass of the shared first stage."""
        assert self.first_stage is not None and self.whole is not None and \
            self.outliner is not None
        check_min_side(image)
        start = time.perf_counter()
        square, fit = fit_square(image, self.outliner.size)
        batch = eval_batch(torch.from_numpy(square[None]))
        outputs = self.first_stage.outputs(batch)
        assert isinstance(self.whole.forward, OneOutput)
        logits, activations = self.whole.forward.pick(outputs)
        whole = self.whole.from_logits(logits, activations, batch, [scope_warnings(image)])[0]
        found = self.outliner.logits_to_masks(outputs[0], [fit], [image.shape[:2]])[0] \
            if outline else None
        return whole, found, {"first_stage": (time.perf_counter() - start) * 1000}

    def predict_batch(self, batch: torch.Tensor,
                      warnings: Sequence[list[str]] | None = None) -> list[Prediction]:
        """Calibrated predictions for a batch (N x 3 x H x W) of tensors made by `prepare`,
        with each image's scope warnings (default none); the same figures as `predict`. Not for
        a two-stage predictor (its reading needs the image itself: use `predict`)."""
        if self.whole is not None:
            raise ModelError(f"{self.card.name} reads in two stages: predict images one by "
                             "one with Predictor.predict.")
        with self._lock:
            logits, activations = self.forward.run(batch)
        return self.from_logits(logits, activations, batch, warnings)

    def from_logits(self, logits: np.ndarray, activations: np.ndarray | None,
                    batch: torch.Tensor, warnings: Sequence[list[str]] | None = None
                    ) -> list[Prediction]:
        """`predict_batch` from this model's logits (and Grad-CAM activations) of `batch`."""
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
        if self.whole is not None and prediction.read_by == self.whole.card.name:
            return self.whole.explain(prediction, target, method)
        if prediction.explained_by(target or prediction.label) is not prediction:
            assert self.whole is not None and prediction.whole is not None
            return self.whole.explain(prediction.whole, target, method)
        target_class = self.classes.index(target or prediction.label)
        if method == "gradcam" and prediction.activations is not None and \
                pools_into_linear(self.model):
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
    leak-free crop of a lesion-free image; for a two-stage model without a lesion in the
    record's masks, or for 'normal', whose probability it gives: its whole-image model on the
    whole image); `probabilities` are the evaluation's for it."""
    if predictor.whole is not None and (not record_has_lesion(record) or target == NORMAL):
        predictor = predictor.whole
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
