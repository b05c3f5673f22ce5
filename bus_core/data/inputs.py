"""What the model sees: the full image, or the image multiplied by its combined lesion mask and
cropped ("intersection masking").

Input modes:
- `full`: the whole image; masks are ignored.
- `mask`: the published intersection-masking method. Where the chosen combination is empty but
  some mask is not (two separate lesions have no intersection), the union is used. An image with no
  lesion (every BUSI "normal" image) becomes a black image. This LEAKS the label: a model
  learns "black = normal"
  and its normal-class figures say nothing about ultrasound. Kept only to measure that leak.
- `mask-leakfree`: as `mask`, but an image without a lesion mask becomes a random masked crop of
  its tissue (`masks.leak_free_crop`), so normal inputs look like lesion crops.
- `lesion-context`: the lesion with its surroundings, not blacked out: the image cropped to the
  box around the combined mask, grown by `margin` of its size on each side. Only the box of
  the outline reaches the model, never its shape, so a quick brush stroke, an expert outline
  and a box around the same lesion give nearly the same input; training draws a random
  variant of the box each time (`masks.jitter_box`). An image without a lesion becomes a
  lesion-sized window of its tissue (`masks.tissue_window`), cropped the same way.

At prediction time a mask-mode model needs a non-empty mask from the user (`MaskError` otherwise).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import numpy as np

from bus_core.data.dataset import Record
from bus_core.data.images import load_image, load_mask
from bus_core.data.masks import (
    COMBINE_MODES,
    CombineMode,
    box_of,
    combine_masks,
    context_crop,
    jitter_box,
    leak_free_crop,
    lesion_free_box,
    masked_input,
    tissue_box,
    tissue_window,
)
from bus_core.data.presets import InputSize
from bus_core.errors import MaskError

TEXT_BAND = 0.12
"""Share of the imaged area's height / width at each edge that lesion-free windows avoid."""

InputMode = Literal["full", "mask", "mask-leakfree", "lesion-context"]
INPUT_MODES: tuple[str, ...] = get_args(InputMode)


def default_margin(mode: str) -> float:
    """The crop margin of a mode when none is given: half the lesion box on each side for
    `lesion-context` (its surroundings), a tenth for the masked crops."""
    return 0.5 if mode == "lesion-context" else 0.1


@dataclass(frozen=True)
class InputSpec:
    """How a model's input is made from an image and its masks."""

    mode: InputMode = "full"
    combine: CombineMode = "weighted"
    threshold: float = 0.3
    margin: float = 0.1
    size: InputSize = InputSize()

    def __post_init__(self) -> None:
        if self.mode not in INPUT_MODES:
            raise ValueError(f"Unknown input mode {self.mode!r}; choose one of "
                             f"{', '.join(INPUT_MODES)}.")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"Unknown mask combination {self.combine!r}; choose one of "
                             f"{', '.join(COMBINE_MODES)}.")

    @property
    def uses_masks(self) -> bool:
        """True for the mask modes."""
        return self.mode != "full"

    @classmethod
    def of(cls, mode: str, combine: str = "weighted", threshold: float = 0.3,
           margin: float = 0.1, size: InputSize | None = None) -> InputSpec:
        """A spec from plain strings (a card, a config, the command line); ValueError for an
        unknown mode or combination (checked by __post_init__)."""
        return cls(mode=cast(InputMode, mode), combine=cast(CombineMode, combine),
                   threshold=threshold, margin=margin, size=size or InputSize())

    @classmethod
    def from_card(cls, card: Any) -> InputSpec:
        """The spec a model card describes."""
        return cls.of(card.input_mode, card.combine_mode, card.combine_threshold,
                      card.crop_margin, card.size)


def model_input(image: np.ndarray, masks: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """The image a model gets at prediction time from an image and the masks there are: the
    image itself in `full` mode (the masks are ignored); mask modes need a non-empty mask."""
    if not spec.uses_masks:
        return image
    if not masks:
        raise MaskError("This model reads the lesion it is shown: paint or upload a lesion "
                        "mask, or choose a model that uses the full image.")
    if spec.mode == "lesion-context":
        return context_crop(image, box_of(lesion_mask(masks, spec)), spec.margin)
    return masked_input(image, masks, mode=spec.combine, threshold=spec.threshold,
                        margin=spec.margin)


def describe_input(spec: InputSpec, *, two_stage: bool, has_mask: bool,
                   outlined_automatically: bool) -> str:
    """What a model with input `spec` looks at, in one sentence for the clinician: `two_stage`
    for a lesion model read with a whole-image model, `has_mask` when the image has a lesion
    mask, `outlined_automatically` when the outline model made that mask."""
    if two_stage:
        if not has_mask:
            return ("No lesion outline, so the whole-image model reads the whole image. Accept "
                    "the suggested outline or paint one to read the lesion itself.")
        made = ", outlined automatically" if outlined_automatically else ""
        return ("Two-stage reading: the whole image tells normal from lesion; the lesion and "
                f"the tissue around it (the box around the outline{made}) tell benign from "
                "malignant.")
    if spec.uses_masks:
        automatic = " (outlined automatically)" if outlined_automatically else ""
        if spec.mode == "lesion-context":
            return ("This model looks at the lesion and the tissue around it: the box around "
                    f"the outline{automatic}.")
        return f"This model looks only at the masked lesion crop{automatic}."
    if has_mask:
        return "This model looks at the whole image; the mask is for reference only."
    return "This model looks at the whole image; a lesion mask is optional."


def lesion_mask(masks: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """The combined lesion mask of `spec`; the union where that combination is empty but some
    mask is not (two separate lesions have no intersection). May be empty."""
    combined = combine_masks(masks, mode=spec.combine, threshold=spec.threshold)
    return combined if combined.any() else combine_masks(masks, mode="union")


def record_lesion_mask(record: Record, shape: tuple[int, int]) -> np.ndarray:
    """The union of a record's lesion masks at `shape` (all False when it has none)."""
    out = np.zeros(shape, dtype=bool)
    for path in record.masks:
        out |= load_mask(path, shape=shape)
    return out


def record_has_lesion(record: Record) -> bool:
    """True when one of a record's mask files marks a lesion (a two-stage model then reads the
    lesion; without one, the whole image)."""
    return any(load_mask(path).any() for path in record.masks)


def record_rng(record_id: str, epoch: int = 0) -> np.random.Generator:
    """A generator seeded by a record id (and epoch): the same crop on every machine."""
    seed = int.from_bytes(hashlib.sha256(f"{record_id}|{epoch}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def record_input(record: Record, spec: InputSpec, rng: np.random.Generator | None = None,
                 image: np.ndarray | None = None, *, lesion: np.ndarray | None = None,
                 jitter: bool = False) -> np.ndarray:
    """The training/evaluation input of a dataset record under `spec` (see module docstring).

    `image` and `lesion` (its combined lesion mask, `lesion_mask`) are read from the record
    when not given. Random choices (the tissue crop of an image without a lesion; with
    `jitter`, the variant of a `lesion-context` box) come from `rng`, by default one seeded by
    the record id."""
    if image is None:
        image = load_image(record.path)
    if not spec.uses_masks:
        return image
    rng = rng if rng is not None else record_rng(record.id)
    if lesion is None:
        masks = [load_mask(p, shape=image.shape[:2]) for p in record.masks]
        lesion = lesion_mask(masks, spec) if masks else np.zeros(image.shape[:2], bool)
    if spec.mode == "lesion-context":
        if lesion.any():
            box = box_of(lesion)
            box = jitter_box(box, image.shape[:2], rng) if jitter else box
        else:
            box = tissue_window(image, rng)
        return context_crop(image, box, spec.margin)
    if lesion.any():
        return masked_input(image, [lesion], mode="union", margin=spec.margin)
    if spec.mode == "mask":
        return np.zeros_like(image)
    return leak_free_crop(image, rng, margin=spec.margin)


def lesion_free_strip(image: np.ndarray, lesion: np.ndarray
                      ) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1): where lesion-free windows of the image are cut (`masks.lesion_free_box`
    of the imaged area less `TEXT_BAND` at each edge, where scanners burn in text and scales
    that lesion crops rarely show: a model must not learn "text = normal"); None when no strip
    is large enough."""
    y0, y1, x0, x1 = tissue_box(image)
    dy, dx = round(TEXT_BAND * (y1 - y0)), round(TEXT_BAND * (x1 - x0))
    return lesion_free_box(lesion, (y0 + dy, y1 - dy, x0 + dx, x1 - dx))


def lesion_free_input(image: np.ndarray, lesion: np.ndarray, rng: np.random.Generator
                      ) -> np.ndarray | None:
    """A `lesion-context` input of tissue away from the image's lesion (an extra "normal"
    example from a data set without normal images), cut inside `lesion_free_strip`; None when
    there is no such strip."""
    strip = lesion_free_strip(image, lesion)
    if strip is None:
        return None
    window = tissue_window(image, rng, min_frac=0.5, max_frac=0.9, within=strip)
    return context_crop(image, window, margin=0.0)  # no margin: it would reach the text band


def blank_input_share(records: Sequence[Record], spec: InputSpec) -> dict[str, dict[str, float]]:
    """Per class: how many records there are and the share whose model input is all black.

    Measures the mask leak without training anything: in `mask` mode every image without a
    lesion mask becomes black, so "black input => normal" is a perfect rule on BUSI.
    """
    out: dict[str, dict[str, float]] = {}
    for record in records:
        entry = out.setdefault(record.label, {"n": 0, "black_share": 0.0})
        black = not record_input(record, spec).any()
        entry["black_share"] = (entry["black_share"] * entry["n"] + black) / (entry["n"] + 1)
        entry["n"] += 1
    return out
