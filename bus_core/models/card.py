"""The model card: the JSON file (card.json) beside a model's weights that says what the model
is, how its input is made and its outputs read, and how it was made and scored; its checks,
reading and writing. A model is a folder holding its weights and its card.

A card is JSON, so reading one never executes code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision

from bus_core import __version__, atomic
from bus_core.constants import CLASSES, IMAGENET_MEAN, IMAGENET_STD
from bus_core.data.inputs import INPUT_MODES
from bus_core.data.masks import COMBINE_MODES
from bus_core.data.presets import FITS, InputSize, input_size_for
from bus_core.errors import ModelError
from bus_core.models.unet import SEG_ARCH

ARCHS: tuple[str, ...] = ("densenet121", "vgg16", "resnet50", "inception_v3")
"""The classifier architectures a card may name (`build.build_model` builds them)."""
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
CARD_VERSION = 1


def _code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def _software() -> dict[str, str]:
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


@dataclass
class ModelCard:
    """Everything needed to use, judge and reproduce a model; saved as card.json."""

    name: str
    arch: str = "densenet121"
    task: str = "classification"
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    input_size: dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(InputSize()))
    normalisation: dict[str, list[float]] = field(
        default_factory=lambda: {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    input_mode: str = "full"
    combine_mode: str = "weighted"
    combine_threshold: float = 0.3
    crop_margin: float = 0.1
    temperature: float = 1.0
    uncertain_below: float = 0.6
    malignant_threshold: float | None = None
    postprocess: dict[str, Any] = field(default_factory=dict)
    two_stage: dict[str, str] = field(default_factory=dict)
    """For a lesion model read as the second stage of a two-stage reading: the folder names
    (beside this model's folder, or bundled) of its `whole_image_model`, which gives P(normal)
    and reads images without an outline, and its `outline_model`, which suggests the outline
    when none is given (see `predict.Predictor`). Empty: the model reads alone."""
    normal_odds_with_outline: float = 1.0
    """For a two-stage card: the factor on the odds of the whole-image model's P(normal) when an
    outline was found (`metrics.normal_from_whole`), fitted on validation so that no more than
    5% of lesion images are called normal (`metrics.fit_normal_odds`); 1.0 keeps P(normal)."""
    init: str = "random"
    training_data: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_time_s: float | None = None
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc)
                         .isoformat(timespec="seconds"))
    code_version: str = field(default_factory=_code_version)
    software: dict[str, str] = field(default_factory=_software)
    weights_sha256: str = ""
    weights_dtype: str = "float32"
    notes: str = ""
    card_version: int = CARD_VERSION

    @property
    def size(self) -> InputSize:
        """The preprocessing sizes as an InputSize."""
        return InputSize(**self.input_size)

    def to_json(self) -> str:
        """The card as pretty JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """A card from parsed JSON, checked by `validate_card`; unknown keys are kept out,
        missing ones take defaults."""
        if not isinstance(data, dict) or "name" not in data or "arch" not in data:
            raise ModelError("The model card has no 'name' or 'arch'; it is not a bus_core card.")
        known = {f.name for f in dataclasses.fields(cls)}
        card = cls(**{k: v for k, v in data.items() if k in known})
        validate_card(card)
        return card


TWO_STAGE_KEYS: tuple[str, str] = ("whole_image_model", "outline_model")
"""The keys of a card's `two_stage` field."""
MAX_INPUT_SIZE = 1024
"""Largest input side a card may ask for (a bigger one would only exhaust memory)."""


def _problem(card: ModelCard) -> str | None:
    """What makes a card unusable, or None: every field's type and range, and the classes,
    architectures, input modes and fits this app knows."""
    def number(value: Any, low: float, high: float) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and low <= value <= high)

    texts = ("name", "arch", "task", "init", "created", "code_version", "weights_sha256",
             "weights_dtype", "notes")
    for name in texts:
        if not isinstance(getattr(card, name), str):
            return f"'{name}' must be text"
    for name in ("metrics", "training_data", "split", "hyperparameters", "postprocess",
                 "normalisation", "software", "input_size", "two_stage"):
        if not isinstance(getattr(card, name), dict):
            return f"'{name}' must be an object"
    if any(not isinstance(card.metrics.get(k, {}), dict) for k in ("val", "test")):
        return "'metrics' must hold objects under 'val' and 'test'"
    if card.task not in ("classification", "segmentation"):
        return f"the task {card.task!r} is unknown"
    known_arch = (SEG_ARCH,) if card.task == "segmentation" else ARCHS
    if card.arch not in known_arch:
        return f"the architecture {card.arch!r} is unknown for a {card.task} model"
    classes = card.classes
    if not isinstance(classes, list) or len(set(map(str, classes))) != len(classes) or \
            not all(isinstance(c, str) for c in classes):
        return "'classes' must be a list of different names"
    allowed = ["lesion"] if card.task == "segmentation" else list(CLASSES)
    if card.task == "segmentation" and classes != allowed:
        return "a segmentation model's classes must be ['lesion']"
    if card.task == "classification" and (len(classes) < 2 or not set(classes) <= set(allowed)):
        return f"the classes {classes} are not two or more of {', '.join(allowed)}"
    size = card.input_size
    if set(size) - {"resize", "crop", "fit"} or not all(
            isinstance(size.get(k), int) and not isinstance(size.get(k), bool)
            and 16 <= size[k] <= MAX_INPUT_SIZE for k in ("resize", "crop")):
        return f"'input_size' needs whole numbers 'resize' and 'crop' of 16..{MAX_INPUT_SIZE}"
    if size.get("fit", "crop") not in FITS:
        return f"the fit {size.get('fit')!r} is unknown"
    if size.get("fit", "crop") == "crop" and size["crop"] > size["resize"]:
        return "'crop' cannot be larger than 'resize'"
    if card.input_mode not in INPUT_MODES:
        return f"the input mode {card.input_mode!r} is unknown"
    if card.combine_mode not in COMBINE_MODES:
        return f"the mask combination {card.combine_mode!r} is unknown"
    checks = {"temperature": number(card.temperature, 1e-3, 100.0),
              "uncertain_below": number(card.uncertain_below, 0.0, 1.0),
              "combine_threshold": number(card.combine_threshold, 0.0, 0.999),
              "crop_margin": number(card.crop_margin, 0.0, 1.0),
              "malignant_threshold": card.malignant_threshold is None
              or number(card.malignant_threshold, 0.0, 1.0),
              "normal_odds_with_outline": number(card.normal_odds_with_outline, 1e-6, 1.0),
              "training_time_s": card.training_time_s is None
              or number(card.training_time_s, 0.0, float("inf")),
              "card_version": isinstance(card.card_version, int)}
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        return f"'{bad[0]}' is out of range or not a number"
    if card.two_stage and (set(card.two_stage) != set(TWO_STAGE_KEYS) or not all(
            isinstance(v, str) and v.strip(". ") and not set(v) & set("/\\:")
            for v in card.two_stage.values())):
        return (f"'two_stage' needs the folder names {' and '.join(TWO_STAGE_KEYS)} (names, "
                "not paths)")
    if card.two_stage and card.input_mode == "full":
        return "'two_stage' is for a model that reads a lesion outline"
    post = card.postprocess
    if post and (set(post) - {"threshold", "min_area", "fill_holes"}
                 or not number(post.get("threshold", 0.5), 0.0, 1.0)
                 or not number(post.get("min_area", 0.0), 0.0, 1.0)
                 or not isinstance(post.get("fill_holes", True), bool)):
        return "'postprocess' needs a threshold and a min_area in 0..1 and fill_holes true/false"
    return None


def validate_card(card: ModelCard) -> None:
    """Raise ModelError saying what is wrong with a card this app cannot use safely."""
    problem = _problem(card)
    if problem:
        raise ModelError(f"The model card is not valid: {problem}.")


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding card.json and model.safetensors for a folder or either file's path."""
    p = Path(path).expanduser()
    folder = p.parent if p.is_file() or p.suffix in (".json", ".safetensors") else p
    if not folder.is_dir():
        raise ModelError(f"No model found at {p}: the folder does not exist.")
    missing = [n for n in (CARD_FILE, WEIGHTS_FILE) if not (folder / n).is_file()]
    if missing:
        raise ModelError(f"The model folder {folder} is missing {' and '.join(missing)}. A model "
                         f"is a folder with {WEIGHTS_FILE} (weights) and {CARD_FILE} (model card).")
    return folder


def read_card(path: str | Path, *, label: str | None = None) -> ModelCard:
    """The model card of a model folder, without loading the weights. Refuses a card from a
    newer version of the app, or one asking for a normalisation the app does not apply.
    Messages name the card by its path, or as "the model card of <label>"."""
    card_path = resolve_model_dir(path) / CARD_FILE
    where = f"of {label}" if label else str(card_path)
    try:
        card = ModelCard.from_dict(json.loads(card_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ModelError(f"The model card {where} is not valid JSON: {exc}") from exc
    if not isinstance(card.card_version, int) or card.card_version > CARD_VERSION:
        raise ModelError(f"The model card {where} is of version {card.card_version!r}; this "
                         f"app reads versions up to {CARD_VERSION}. Update the app.")
    expected = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if card.normalisation != expected:
        raise ModelError(f"The model card {where} asks for the normalisation "
                         f"{card.normalisation}; this app normalises inputs with ImageNet's "
                         f"mean and standard deviation {expected}.")
    return card


def write_card(card: ModelCard, folder: Path) -> Path:
    """Write `card` as the card of the model folder `folder`; returns the card's path."""
    path = folder / CARD_FILE
    atomic.write_text(path, card.to_json())
    return path


def new_card(name: str, arch: str, **fields: Any) -> ModelCard:
    """A card for a new model of `arch` with its standard input size."""
    fields.setdefault("input_size", dataclasses.asdict(input_size_for(arch)))
    return ModelCard(name=name, arch=arch, **fields)
