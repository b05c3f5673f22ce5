"""Preprocessing presets: an RGB uint8 array in, a normalised CHW float tensor out.

Eval: resize the shorter side to `resize` (256) keeping the aspect ratio, centre-crop `size`
(224; 299 for InceptionV3). Train: the same with rotation +-5 degrees and a horizontal flip
(p=0.5). The "balancing" preset (rotation +-70 degrees, flip, random crop) is applied on the fly
to the extra copies that oversample the minority classes of the training split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from bus_core.constants import IMAGENET_MEAN, IMAGENET_STD

Transform = Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class InputSize:
    """Resize (shorter side) and crop sizes of one architecture."""

    resize: int = 256
    crop: int = 224


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


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, order="C")
    return torch.from_numpy(image).permute(2, 0, 1)


_NORMALISE = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(size: InputSize = InputSize()) -> Transform:
    """Deterministic preset: resize shorter side, centre crop, normalise."""
    crop = v2.CenterCrop(size.crop)

    def apply(image: np.ndarray) -> torch.Tensor:
        return _NORMALISE(crop(_to_tensor(resize_shorter(image, size.resize))))

    return apply


def train_transform(size: InputSize = InputSize(), *, strong: bool = False) -> Transform:
    """Random preset for training; `strong` is the balancing augmentation (+-70 degrees, crop)."""
    if strong:
        geometry = v2.Compose([
            v2.RandomRotation(70),
            v2.RandomResizedCrop(size.crop, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
        ])
    else:
        geometry = v2.Compose([
            v2.RandomRotation(5),
            v2.CenterCrop(size.crop),
            v2.RandomHorizontalFlip(),
        ])

    def apply(image: np.ndarray) -> torch.Tensor:
        return _NORMALISE(geometry(_to_tensor(resize_shorter(image, size.resize))))

    return apply


def denormalise(tensor: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of one CHW tensor: the HxWx3 uint8 image the model saw."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = (tensor.detach().float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
