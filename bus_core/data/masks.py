"""Lesion masks: combining the masks of one image, the masked bounding-box crop a model sees
("intersection masking"), the unmasked crop of a lesion with its surroundings (and a tissue
window of the same kind for images without a lesion), leak-free stand-in crops, and
outlines / overlays for display (canvas drawings -> masks: bus_core.data.canvas).

A mask is an HxW array at the image's resolution; non-zero (True) marks the lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import cv2
import numpy as np
from scipy import ndimage

from bus_core.errors import MaskError

CombineMode = Literal["intersection", "weighted", "union"]
COMBINE_MODES: tuple[str, ...] = get_args(CombineMode)
"""How several masks of one image become one: all agree / enough agree / any marks."""

EMPTY_MASK_MESSAGE = ("The lesion mask is empty: paint or upload a mask that covers the lesion "
                      "(only a model that reads the whole image can do without one).")

TISSUE_LEVEL = 10
"""Grey level (0..255) above which a pixel counts as imaged tissue rather than black border."""

TISSUE_FRACTION = 0.25
"""A row / column belongs to the tissue area when at least this fraction of it is tissue."""


# --- combining and cropping ----------------------------------------------------------------

def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]} x {shape[0]} pixels"


def _as_mask(mask: np.ndarray, label: str = "The lesion mask") -> np.ndarray:
    """`mask` as an HxW bool array (non-zero = lesion)."""
    array = np.asarray(mask)
    if array.ndim != 2 or 0 in array.shape:
        raise MaskError(f"{label} is not a 2-D image (its array shape is {array.shape}).")
    return array != 0


def _check_same_size(image: np.ndarray, mask: np.ndarray) -> None:
    if image.shape[:2] != mask.shape:
        raise MaskError(f"The lesion mask is {_size(mask.shape)} but the image is "
                        f"{_size(image.shape)} (width x height): a mask must be the size of "
                        "its image.")


def _stack_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    """The masks as one NxHxW bool array, checked to share one size."""
    if len(masks) == 0:
        raise MaskError("No lesion mask was given: paint or upload at least one mask.")
    arrays = [_as_mask(m, f"Lesion mask {i + 1}") for i, m in enumerate(masks)]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        sizes = ", ".join(_size(s) for s in shapes)
        raise MaskError(f"The lesion masks have different sizes ({sizes}, width x height): "
                        "every mask of an image must be the size of that image.")
    return np.stack(arrays)


def combine_masks(masks: Sequence[np.ndarray], mode: CombineMode = "weighted",
                  threshold: float = 0.3) -> np.ndarray:
    """One HxW bool mask from the masks of one image.

    `intersection`: pixels every mask marks; `union`: pixels any mask marks; `weighted`: pixels
    that more than `threshold` (a fraction, 0 <= threshold < 1) of the masks mark, or the union
    when no pixel passes. The result may be empty (the intersection of separate lesions): the
    caller decides. No masks, or masks of different sizes, raise `MaskError`.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"Unknown combine mode {mode!r}; choose one of "
                         f"{', '.join(COMBINE_MODES)}.")
    if not 0 <= threshold < 1:
        raise ValueError(f"The weighted threshold must be at least 0 and below 1 (got "
                         f"{threshold}).")
    stack = _stack_masks(masks)
    if mode == "intersection":
        return np.asarray(stack.all(axis=0))
    union = np.asarray(stack.any(axis=0))
    if mode == "union":
        return union
    weighted = np.asarray(stack.mean(axis=0) > threshold)
    return weighted if weighted.any() else union


def combination_note(masks: Sequence[np.ndarray], mode: CombineMode = "weighted",
                     threshold: float = 0.3) -> str | None:
    """What `combine_masks` makes of these masks when its name alone does not say it: how many
    masks 'weighted' needs (and when that equals the union or the intersection), or that it
    fell back to the union. None for one mask and for the other modes."""
    if mode != "weighted" or len(masks) < 2:
        return None
    stack = _stack_masks(masks)
    n = len(stack)
    if not (stack.mean(axis=0) > threshold).any():
        return (f"No pixel is marked by more than {threshold:.0%} of the {n} masks, so "
                "'weighted' falls back to their union.")
    needed = next(k for k in range(1, n + 1) if k / n > threshold)
    rule = (f"'weighted' keeps the pixels that more than {threshold:.0%} of the masks mark, "
            f"which with {n} masks means")
    if needed == 1:
        return f"{rule} any of them: the same as 'union'."
    if needed == n:
        return f"{rule} all of them: the same as 'intersection'."
    return f"{rule} at least {needed} of them."


def _axis_span(start: int, stop: int, length: int, margin: float, min_size: int
               ) -> tuple[int, int]:
    """[start, stop) grown by `margin` of its size on each side and clipped to [0, length),
    then grown (and shifted inside) to at least min(min_size, length)."""
    pad = int(round(margin * (stop - start)))
    start, stop = max(start - pad, 0), min(stop + pad, length)
    size = min(min_size, length)
    if stop - start < size:
        start = min(max((start + stop - size) // 2, 0), length - size)
        stop = start + size
    return int(start), int(stop)


def mask_bbox(mask: np.ndarray, margin: float = 0.1, min_size: int = 16
              ) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive: the box around the mask's pixels, grown on each side by
    `margin` times the box size, clipped to the image, and at least `min_size` pixels a side
    where the image is that large. An empty mask raises `MaskError`."""
    if margin < 0 or min_size < 1:
        raise ValueError(f"The crop margin must be >= 0 and the minimum size >= 1 (got "
                         f"{margin} and {min_size}).")
    array = _as_mask(mask)
    rows, cols = np.flatnonzero(array.any(axis=1)), np.flatnonzero(array.any(axis=0))
    if rows.size == 0:
        raise MaskError(EMPTY_MASK_MESSAGE)
    y0, y1 = _axis_span(rows[0], rows[-1] + 1, array.shape[0], margin, min_size)
    x0, x1 = _axis_span(cols[0], cols[-1] + 1, array.shape[1], margin, min_size)
    return y0, y1, x0, x1


def apply_mask_crop(image: np.ndarray, mask: np.ndarray, margin: float = 0.1, *,
                    fill: int = 0) -> np.ndarray:
    """The image with every pixel outside the mask set to `fill`, cropped to `mask_bbox`.

    A mask of another size than the image, or an empty mask, raises `MaskError`.
    """
    image = np.asarray(image)
    array = _as_mask(mask)
    _check_same_size(image, array)
    y0, y1, x0, x1 = mask_bbox(array, margin)
    keep = array[y0:y1, x0:x1]
    if image.ndim == 3:
        keep = keep[..., None]
    return np.where(keep, image[y0:y1, x0:x1], np.asarray(fill, dtype=image.dtype))


def masked_input(image: np.ndarray, masks: Sequence[np.ndarray],
                 mode: CombineMode = "weighted", threshold: float = 0.3,
                 margin: float = 0.1) -> np.ndarray:
    """`combine_masks` then `apply_mask_crop`; an empty combination raises `MaskError`."""
    combined = combine_masks(masks, mode=mode, threshold=threshold)
    if not combined.any():
        if not any(np.any(m) for m in masks):
            raise MaskError(EMPTY_MASK_MESSAGE)
        raise MaskError(f"The lesion masks do not overlap, so their {mode} is empty: combine "
                        "them with 'union' instead, or check that every mask outlines the "
                        "same lesion.")
    return apply_mask_crop(image, combined, margin)


# --- images without a lesion ---------------------------------------------------------------

def tissue_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the imaged area: the rows and columns that are mostly not black
    border (the whole image when none are)."""
    grey = image.max(axis=-1) if image.ndim == 3 else image
    tissue = grey > TISSUE_LEVEL
    rows = np.flatnonzero(tissue.mean(axis=1) >= TISSUE_FRACTION)
    cols = np.flatnonzero(tissue.mean(axis=0) >= TISSUE_FRACTION)
    if rows.size == 0 or cols.size == 0:
        return 0, image.shape[0], 0, image.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def pseudo_lesion_mask(shape: tuple[int, int], rng: np.random.Generator, *,
                       min_frac: float = 0.3, max_frac: float = 0.7,
                       within: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A random lesion-like HxW bool mask: an ellipse with a gently irregular border, inscribed
    in a box placed at random inside `within` (y0, y1, x0, x1; the whole image by default)
    whose height and width are each a random fraction in [min_frac, max_frac] of that area's.
    Never empty."""
    if not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"Need 0 < min_frac <= max_frac <= 1 (got {min_frac}, {max_frac}).")
    y0, y1, x0, x1 = within if within is not None else (0, shape[0], 0, shape[1])
    area_h, area_w = y1 - y0, x1 - x0
    box_h = int(np.clip(round(rng.uniform(min_frac, max_frac) * area_h), 1, area_h))
    box_w = int(np.clip(round(rng.uniform(min_frac, max_frac) * area_w), 1, area_w))
    top = y0 + int(rng.integers(0, area_h - box_h + 1))
    left = x0 + int(rng.integers(0, area_w - box_w + 1))
    dy, dx = np.mgrid[:box_h, :box_w] + 0.5
    dy, dx = dy / (box_h / 2) - 1, dx / (box_w / 2) - 1
    lobes, depth, phase = rng.integers(2, 6), rng.uniform(0, 0.2), rng.uniform(0, 2 * np.pi)
    radius = 1 - depth * (1 + np.sin(lobes * np.arctan2(dy, dx) + phase)) / 2
    mask = np.zeros(shape, bool)
    mask[top:top + box_h, left:left + box_w] = np.hypot(dy, dx) <= radius
    return mask


def leak_free_crop(image: np.ndarray, rng: np.random.Generator, *, min_frac: float = 0.3,
                   max_frac: float = 0.7, margin: float = 0.1) -> np.ndarray:
    """A masked crop of an image without a lesion that looks like a masked lesion crop.

    The mask leak: BUSI "normal" images have empty masks, so masking them gives a black image,
    and a model trained on masked inputs learns "black image = normal" instead of anything
    about tissue; its normal-class figures then say nothing about ultrasound. Instead, this
    masks the image with a random lesion-shaped blob (`pseudo_lesion_mask`) of random size and
    aspect placed inside the imaged tissue (black borders excluded) and crops it exactly as a
    lesion would be (`apply_mask_crop` with `margin`), so the input has the same form: a blob
    of tissue on black. What remains different is the content (lesions are mostly darker than
    the tissue around them), which is what the model should learn from.
    """
    image = np.asarray(image)
    mask = pseudo_lesion_mask(image.shape[:2], rng, min_frac=min_frac, max_frac=max_frac,
                              within=tissue_box(image))
    return apply_mask_crop(image, mask, margin)


def lesion_free_box(mask: np.ndarray, within: tuple[int, int, int, int], *, gap: float = 0.05,
                    min_share: float = 0.35) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1): the largest strip of the area `within` (y0, y1, x0, x1) that keeps clear
    of the mask's bounding box grown by `gap` of the area (left of, right of, above or below
    it); the whole area for an empty mask; None when the strip's height or width is under
    `min_share` of the area's."""
    y0, y1, x0, x1 = within
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (y0, y1, x0, x1)
    if rows.size:
        gy, gx = gap * (y1 - y0), gap * (x1 - x0)
        by0, by1 = int(np.floor(rows[0] - gy)), int(np.ceil(rows[-1] + 1 + gy))
        bx0, bx1 = int(np.floor(cols[0] - gx)), int(np.ceil(cols[-1] + 1 + gx))
        options = [(y0, y1, x0, bx0), (y0, y1, bx1, x1), (y0, by0, x0, x1), (by1, y1, x0, x1)]
        box = max(options, key=lambda b: max(0, b[1] - b[0]) * max(0, b[3] - b[2]))
    if box[1] - box[0] < min_share * (y1 - y0) or box[3] - box[2] < min_share * (x1 - x0):
        return None
    return box


# --- the lesion with its surroundings (input mode "lesion-context") ------------------------

def jitter_box(box: tuple[int, int, int, int], shape: tuple[int, int], rng: np.random.Generator,
               *, scale: tuple[float, float] = (0.8, 1.35), shift: float = 0.15
               ) -> tuple[int, int, int, int]:
    """A random variant of a lesion box (y0, y1, x0, x1): each side length times a factor drawn
    log-uniformly from `scale`, the centre moved by up to `shift` of the side, clipped to the
    image of `shape` and never empty. It stands for the outlines different readers draw of the
    same lesion (tight, generous, an ellipse or a box around it)."""
    y0, y1, x0, x1 = box
    h, w = shape
    out = []
    for lo, hi, length in ((y0, y1, h), (x0, x1, w)):
        side = (hi - lo) * float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]))))
        centre = (lo + hi) / 2 + rng.uniform(-shift, shift) * (hi - lo)
        start = int(np.clip(round(centre - side / 2), 0, length - 1))
        stop = int(np.clip(round(centre + side / 2), start + 1, length))
        out += [start, stop]
    return out[0], out[1], out[2], out[3]


def context_crop(image: np.ndarray, box: tuple[int, int, int, int], margin: float,
                 min_size: int = 32) -> np.ndarray:
    """The image (not masked) cropped to the box (y0, y1, x0, x1) grown by `margin` times its
    size on each side, clipped to the image and at least `min_size` px a side where the image
    is that large."""
    y0, y1, x0, x1 = box
    h, w = image.shape[:2]
    y0, y1 = _axis_span(y0, y1, h, margin, min_size)
    x0, x1 = _axis_span(x0, x1, w, margin, min_size)
    return image[y0:y1, x0:x1]


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) end-exclusive: the bounding box of a non-empty mask (`MaskError` if
    empty)."""
    return mask_bbox(mask, margin=0.0, min_size=1)


def tissue_window(image: np.ndarray, rng: np.random.Generator, *, min_frac: float = 0.25,
                  max_frac: float = 0.6, within: tuple[int, int, int, int] | None = None
                  ) -> tuple[int, int, int, int]:
    """A random lesion-sized box (y0, y1, x0, x1) inside `within` (default: the imaged tissue,
    black borders excluded): height and width each a random fraction in [min_frac, max_frac]
    of that area's. What an image without a lesion offers in place of a lesion box."""
    y0, y1, x0, x1 = within if within is not None else tissue_box(image)
    box_h = max(1, round(rng.uniform(min_frac, max_frac) * (y1 - y0)))
    box_w = max(1, round(rng.uniform(min_frac, max_frac) * (x1 - x0)))
    top = y0 + int(rng.integers(0, y1 - y0 - box_h + 1))
    left = x0 + int(rng.integers(0, x1 - x0 - box_w + 1))
    return top, top + box_h, left, left + box_w


OutlineVariant = Literal["expert", "dilated", "box"]
OUTLINE_VARIANTS: tuple[str, ...] = get_args(OutlineVariant)
"""Outlines of one lesion as different readers draw it: the data set's own (expert) outline,
a generous one (dilated by `DILATION` of the lesion's size) and the box around it."""

DILATION = 0.15
"""Dilation of the "dilated" outline variant, as a share of the lesion's equivalent diameter."""


def outline_variant(mask: np.ndarray, kind: str) -> np.ndarray:
    """`mask` as outline variant `kind` (see `OUTLINE_VARIANTS`); an empty mask stays empty."""
    array = _as_mask(mask)
    if kind not in OUTLINE_VARIANTS:
        raise ValueError(f"Unknown outline variant {kind!r}; choose one of "
                         f"{', '.join(OUTLINE_VARIANTS)}.")
    if kind == "expert" or not array.any():
        return array
    if kind == "box":
        y0, y1, x0, x1 = box_of(array)
        out = np.zeros_like(array)
        out[y0:y1, x0:x1] = True
        return out
    radius = max(1, round(DILATION * 2 * np.sqrt(array.sum() / np.pi)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(array.astype(np.uint8), kernel).astype(bool)


# --- display -------------------------------------------------------------------------------

def mask_outline(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """The HxW bool band of the mask's pixels within `thickness` pixels of its border (the
    image edge counts as border)."""
    if thickness < 1:
        raise ValueError(f"The outline thickness must be at least 1 pixel (got {thickness}).")
    array = _as_mask(mask)
    inner = ndimage.binary_erosion(array, np.ones((3, 3), bool), iterations=thickness,
                                   border_value=0)
    return array & ~inner


def draw_outline(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0),
                 thickness: int = 2) -> np.ndarray:
    """A copy of the RGB image with the mask's outline drawn in `color`."""
    array = _as_mask(mask)
    _check_same_size(image, array)
    out = np.array(image, copy=True)
    out[mask_outline(array, thickness)] = color
    return out


def mask_overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0),
                 alpha: float = 0.35) -> np.ndarray:
    """A copy of the RGB uint8 image with the mask's pixels tinted: (1 - alpha) of the image
    plus alpha of `color`."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"The overlay opacity must lie between 0 and 1 (got {alpha}).")
    array = _as_mask(mask)
    _check_same_size(image, array)
    out = np.array(image, copy=True)
    tinted = out[array].astype(np.float32) * (1 - alpha) + np.float32(alpha) * np.asarray(
        color, np.float32)
    out[array] = np.rint(tinted).astype(out.dtype)
    return out
