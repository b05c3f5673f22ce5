"""Preprocessing presets: an RGB uint8 array in, a normalised CHW float tensor out.

Two fits (`InputSize.fit`):
- `crop` (the classic preset): resize the shorter side to `resize` (256) keeping the aspect ratio,
  centre-crop `crop` (224; 299 for InceptionV3). The sides of wide images are cut off.
- `pad`: the whole image, padded to a square and resized to `crop` (`fit_square`); nothing is
  cut off. `resize` is the size of the square that the strong training preset crops from.

Eval: the fit alone. Train: the same with rotation +-5 degrees and a horizontal flip
(p=0.5). The "balancing" preset (rotation +-70 degrees, flip, random crop) is applied on the fly
to the extra copies that oversample the minority classes of the training split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from bus_core.constants import IMAGENET_MEAN, IMAGENET_STD

Transform = Callable[[np.ndarray], torch.Tensor]

FITS: tuple[str, ...] = ("crop", "pad")


@dataclass(frozen=True)
class InputSize:
    """Preprocessing sizes: `resize` (shorter side, or the padded square for `pad`), the model's
    input size `crop`, and the fit ('crop' or 'pad', see the module docstring)."""

    resize: int = 256
    crop: int = 224
    fit: str = "crop"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"Unknown fit {self.fit!r}; choose one of {', '.join(FITS)}.")


def input_size_for(arch: str) -> InputSize:
    """The standard input size of `arch` (InceptionV3 needs 299)."""
    return InputSize(342, 299) if arch == "inception_v3" else InputSize()


def resize_shorter(image: np.ndarray, shorter: int) -> np.ndarray:
    """Resize so the shorter side is `shorter` px, keeping the aspect ratio (antialiased)."""
    h, w = image.shape[:2]
    scale = shorter / min(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR,
                                                    reducing_gap=3.0))


@dataclass(frozen=True)
class SquareFit:
    """Where an image went inside the square of `fit_square`: scale and top-left offset."""

    scale: float
    pad_x: int
    pad_y: int
    size: int


def fit_square(image: np.ndarray, size: int, *, nearest: bool = False
               ) -> tuple[np.ndarray, SquareFit]:
    """The whole image resized to fit a `size` x `size` square (aspect kept), centred and
    padded with zeros; and where it went. Works for HxW and HxWxC arrays."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_h, new_w) != (h, w):
        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample,
                                                         reducing_gap=None if nearest else 3.0))
    pad_y, pad_x = (size - new_h) // 2, (size - new_w) // 2
    out = np.zeros((size, size) + image.shape[2:], dtype=image.dtype)
    out[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = image
    return out, SquareFit(scale, pad_x, pad_y, size)


def unfit_square(square: np.ndarray, fit: SquareFit, shape: tuple[int, int]) -> np.ndarray:
    """Undo `fit_square` on a float map (size x size): the map over the original HxW pixels."""
    h, w = shape
    new_h, new_w = max(1, round(h * fit.scale)), max(1, round(w * fit.scale))
    inner = np.ascontiguousarray(square[fit.pad_y:fit.pad_y + new_h, fit.pad_x:fit.pad_x + new_w],
                                 dtype=np.float32)
    return np.asarray(Image.fromarray(inner, mode="F").resize((w, h), Image.Resampling.BILINEAR))


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, order="C")
    return torch.from_numpy(image).permute(2, 0, 1)


NORMALISE = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
"""Float image(s) in [0, 1], CHW or NCHW -> ImageNet-normalised: the one normalisation."""
_NORMALISE = v2.Compose([v2.ToDtype(torch.float32, scale=True), NORMALISE])


def base_image(image: np.ndarray, size: InputSize) -> np.ndarray:
    """The deterministic first resize of `size`'s fit (what training caches): the shorter side
    at `resize` ('crop'), or the whole image padded to a `resize` square ('pad')."""
    if size.fit == "pad":
        return fit_square(image, size.resize)[0]
    return resize_shorter(image, size.resize)


def eval_transform(size: InputSize = InputSize()) -> Transform:
    """Deterministic preset: resize shorter side and centre crop ('crop'), or pad to a square
    of `crop` ('pad'); normalise."""
    if size.fit == "pad":
        return lambda image: _NORMALISE(_to_tensor(fit_square(image, size.crop)[0]))
    crop = v2.CenterCrop(size.crop)

    def apply(image: np.ndarray) -> torch.Tensor:
        return _NORMALISE(crop(_to_tensor(resize_shorter(image, size.resize))))

    return apply


def train_transform(size: InputSize = InputSize(), *, strong: bool = False,
                    colour: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Transform:
    """Random preset for training; `strong` is the balancing augmentation (+-70 degrees, crop);
    `colour` changes the float image in [0, 1] after the geometry (e.g. `augment.intensity`)."""
    if strong:
        geometry = v2.Compose([
            v2.RandomRotation(70),
            v2.RandomResizedCrop(size.crop, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
        ])
    else:
        geometry = v2.Compose([
            v2.RandomRotation(5),
            v2.Resize(size.crop, antialias=True) if size.fit == "pad" else v2.CenterCrop(size.crop),
            v2.RandomHorizontalFlip(),
        ])

    def apply(image: np.ndarray) -> torch.Tensor:
        x = geometry(_to_tensor(base_image(image, size)))
        if colour is None:
            return _NORMALISE(x)
        return NORMALISE(colour(x.float() / 255))

    return apply


def denormalise(tensor: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of one CHW tensor: the HxWx3 uint8 image the model saw."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = (tensor.detach().float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
