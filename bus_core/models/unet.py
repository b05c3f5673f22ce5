"""Lesion segmentation: a U-Net decoder on a DenseNet121 encoder, and the post-processing that
turns its probability map into a lesion mask the size of the input image.

Network (`DenseNetUNet`): torchvision's DenseNet121 `features` (state-dict keys unchanged, so
an encoder trained here and a classifier share weights), skip connections after
`denseblock1` (1/4), `denseblock2` (1/8), `denseblock3` (1/16) and the final ReLU (1/32), a
decoder of upsample + two conv-BN-ReLU blocks per level down to 1/4 scale, one output channel
of lesion logits, upsampled bilinearly to the input resolution. With `num_classes > 0` it also
has the classifier head of `build.DenseNetClassifier` (`classifier`, on the pooled final
ReLU): one encoder, two tasks. `SharedFirstStage` runs an outline model and a classifier that
share their encoder (one trained on the other's, frozen) as one such network.

Geometry: the model sees the whole image, padded to a square and resized (`presets.fit_square`);
`Segmenter.segment` maps the probability map back to the input image's pixels.

Post-processing (`postprocess`): threshold, drop components smaller than `min_area` (a share of
the image area), fill holes; an empty result means "no lesion found".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from torchvision import models as tvm

SEG_ARCH = "densenet121-unet"
"""The `arch` of a segmentation model's card."""

_SKIPS = ("denseblock1", "denseblock2", "denseblock3")
_SKIP_CHANNELS = (256, 512, 1024)
_BOTTOM_CHANNELS = 1024
PRIOR_LOGIT = -3.0
"""Initial bias of the output layer: every pixel starts at P(lesion) = 0.05, near the share of
lesion pixels, so training spends its steps on where lesions are, not on silencing the
background (with a zero start, a few thousand Adam steps left the background near 0.3)."""
BOTTLENECK = 256
DECODER_CHANNELS: tuple[int, ...] = (128, 64, 32)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class UNetDecoder(nn.Module):
    """From the 1/32 bottom (reduced to BOTTLENECK channels by a 1x1 convolution) and three
    skips (coarse to fine) to one logit map at 1/4 scale."""

    def __init__(self, channels: Sequence[int] = DECODER_CHANNELS) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(_BOTTOM_CHANNELS, BOTTLENECK, 1, bias=False),
                                    nn.BatchNorm2d(BOTTLENECK), nn.ReLU())
        skips = tuple(reversed(_SKIP_CHANNELS))  # 1024 (1/16), 512 (1/8), 256 (1/4)
        ins = (BOTTLENECK,) + tuple(channels[:-1])
        self.blocks = nn.ModuleList(_conv_block(c_in + c_skip, c_out)
                                    for c_in, c_skip, c_out in zip(ins, skips, channels))
        self.head = nn.Conv2d(channels[-1], 1, 1)
        nn.init.constant_(self.head.get_parameter("bias"), PRIOR_LOGIT)

    def forward(self, bottom: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.reduce(bottom)
        for block, skip in zip(self.blocks, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


class DenseNetUNet(nn.Module):
    """DenseNet121 encoder + U-Net decoder (+ optional class head). `forward` returns the lesion
    logits (N x 1 x H x W); `forward_both` returns (lesion logits, class logits)."""

    def __init__(self, num_classes: int = 0) -> None:
        super().__init__()
        self.features = tvm.densenet121(weights=None).features
        self.final_relu = nn.ReLU(inplace=False)
        self.decoder = UNetDecoder()
        self.classifier = nn.Linear(_BOTTOM_CHANNELS, num_classes) if num_classes else None

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for name, layer in self.features.named_children():
            x = layer(x)
            if name in _SKIPS:
                skips.append(x)
        return self.final_relu(x), skips

    def segment_with_bottom(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lesion logits at the input size, the encoder's final activations), one pass."""
        bottom, skips = self._encode(x)
        return F.interpolate(self.decoder(bottom, skips), size=x.shape[-2:], mode="bilinear",
                             align_corners=False), bottom

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Lesion logits at the input size, and class logits (None without a class head)."""
        seg, bottom = self.segment_with_bottom(x)
        return seg, None if self.classifier is None else self.classifier(pooled(bottom))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_both(x)[0]


class SharedFirstStage(nn.Module):
    """An outline model and a whole-image DenseNet121 classifier that share their encoder, run
    as one network: `forward` returns (lesion logits at the input size, class logits, the
    classifier's Grad-CAM activations), from one encoder pass. Holds the two models' own
    modules (no copy)."""

    def __init__(self, outline: DenseNetUNet, classifier: nn.Module) -> None:
        super().__init__()
        self.outline = outline
        self.head = classifier.get_submodule("classifier")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seg, bottom = self.outline.segment_with_bottom(x)
        return seg, self.head(pooled(bottom)), bottom


def pooled(activations: torch.Tensor) -> torch.Tensor:
    """N x C x H x W activations averaged to the N x C input of a class head."""
    return torch.flatten(F.adaptive_avg_pool2d(activations, 1), 1)


def shares_encoder(outline: nn.Module, classifier: nn.Module) -> bool:
    """True when an outline model (`DenseNetUNet`) and a DenseNet121 classifier have the same
    encoder, tensor for tensor (an outline model trained with `train-seg --freeze-encoder` on
    that classifier)."""
    mine = {k: v for k, v in outline.state_dict().items() if k.startswith("features.")}
    theirs = classifier.state_dict()
    return bool(mine) and all(k in theirs and theirs[k].shape == v.shape
                              and torch.equal(theirs[k], v) for k, v in mine.items())


@dataclass(frozen=True)
class PostProcess:
    """How a probability map becomes a mask: threshold, smallest kept component (share of the
    image area), hole filling."""

    threshold: float = 0.5
    min_area: float = 0.002
    fill_holes: bool = True


def postprocess(prob: np.ndarray, params: PostProcess = PostProcess()) -> np.ndarray:
    """HxW probabilities in [0, 1] -> HxW bool lesion mask (all False: no lesion found)."""
    mask = prob >= params.threshold
    if params.fill_holes and mask.any():
        mask = fill_holes(mask)
    if params.min_area > 0 and mask.any():
        labels, _ = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())
        keep = sizes >= params.min_area * mask.size
        keep[0] = False  # the background
        mask = keep[labels]
    return mask


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with its holes filled: the background regions (4-connected) that do not touch the
    image's border. The same result as `scipy.ndimage.binary_fill_holes`, in one labelling
    pass instead of repeated dilations (a few times faster on a whole image)."""
    background, _ = ndimage.label(~mask)
    outside = np.unique(np.concatenate([background[0], background[-1], background[:, 0],
                                        background[:, -1]]))
    reaches_border = np.zeros(int(background.max()) + 1, dtype=bool)
    reaches_border[outside] = True
    reaches_border[0] = True  # label 0 is the mask itself
    return mask | ~reaches_border[background]


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two bool masks; both empty counts as 1.0."""
    p, t = pred.astype(bool), truth.astype(bool)
    inter = float(np.logical_and(p, t).sum())
    total = float(p.sum() + t.sum())
    union = total - inter
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / union
