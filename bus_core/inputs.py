"""What the model sees: the full image, or the image multiplied by its combined lesion mask and
cropped ("intersection masking").

Input modes:
- `full`: the whole image; masks are ignored.
- `mask`: the first seed document's method. Where the chosen combination is empty but some mask
  is not (two separate lesions have no intersection), the union is used. An image with no
  lesion (every BUSI "normal" image) becomes a black image. This LEAKS the label: a model
  learns "black = normal"
  and its normal-class figures say nothing about ultrasound. Kept only to measure that leak.
- `mask-leakfree`: as `mask`, but an image without a lesion mask becomes a random masked crop of
  its tissue (`masks.leak_free_crop`), so normal inputs look like lesion crops.

At prediction time a mask-mode model needs a non-empty mask from the user (`MaskError` otherwise).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import numpy as np

from bus_core.dataset import Record
from bus_core.errors import MaskError
from bus_core.io import load_image, load_mask
from bus_core.masks import COMBINE_MODES, CombineMode, combine_masks, leak_free_crop, masked_input
from bus_core.transforms import InputSize

InputMode = Literal["full", "mask", "mask-leakfree"]
INPUT_MODES: tuple[str, ...] = get_args(InputMode)


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
    """The image a model gets at prediction time; mask modes need a non-empty mask."""
    if not spec.uses_masks:
        return image
    if not masks:
        raise MaskError("This model was trained on masked lesion crops: paint or upload a lesion "
                        "mask, or choose a model that uses the full image.")
    return masked_input(image, masks, mode=spec.combine, threshold=spec.threshold,
                        margin=spec.margin)


def record_lesion_mask(record: Record, shape: tuple[int, int]) -> np.ndarray:
    """The union of a record's lesion masks at `shape` (all False when it has none)."""
    out = np.zeros(shape, dtype=bool)
    for path in record.masks:
        out |= load_mask(path, shape=shape)
    return out


def record_rng(record_id: str, epoch: int = 0) -> np.random.Generator:
    """A generator seeded by a record id (and epoch): the same crop on every machine."""
    seed = int.from_bytes(hashlib.sha256(f"{record_id}|{epoch}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def record_input(record: Record, spec: InputSpec, rng: np.random.Generator | None = None,
                 image: np.ndarray | None = None) -> np.ndarray:
    """The training/evaluation input of a dataset record under `spec` (see module docstring)."""
    if image is None:
        image = load_image(record.path)
    if not spec.uses_masks:
        return image
    masks = [load_mask(p, shape=image.shape[:2]) for p in record.masks]
    if masks and combine_masks(masks, mode=spec.combine, threshold=spec.threshold).any():
        return masked_input(image, masks, mode=spec.combine, threshold=spec.threshold,
                            margin=spec.margin)
    if any(m.any() for m in masks):  # e.g. the intersection of two separate lesions is empty
        return masked_input(image, masks, mode="union", margin=spec.margin)
    if spec.mode == "mask":
        return np.zeros_like(image)
    return leak_free_crop(image, rng if rng is not None else record_rng(record.id),
                          margin=spec.margin)


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
