"""Ultrasound-specific augmentation of whole batches, on the training device.

Input: uint8 images N x S x S x 3 (already padded to a square by `presets.fit_square`),
lesion masks N x S x S (0/1) and, per item, a sampling window in normalised coordinates
(`Window`: centre and half-extent; the whole square is (0, 0, 1, 1)). Output: normalised float
images N x 3 x R x R and float masks N x 1 x R x R.

Geometry (one affine warp for image and mask): the window, zoomed 0.85-1.25x with an aspect
change of up to 15%, rotated up to 10 degrees, shifted up to 8%, mirrored with p = 0.5.
Intensity (per image): gain, gamma and contrast; speckle (multiplicative noise); blur;
a resolution change (down- then up-sampling); a few burned-in caliper crosses. With `style`,
also what differs between scanners and their settings: a time-gain-compensation curve (a smooth
random gain over depth), a colour tint, and a lateral gain band. All randomness comes from one
`torch.Generator`, so a batch is reproducible from its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bus_core.data.presets import NORMALISE


@dataclass(frozen=True)
class Window:
    """A sampling window: centre (cx, cy) and half-extent (hx, hy), normalised to [-1, 1]."""

    cx: float = 0.0
    cy: float = 0.0
    hx: float = 1.0
    hy: float = 1.0


FULL = Window()


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def _chance(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def affine_thetas(windows: list[Window], gen: torch.Generator, *, strength: float = 1.0
                  ) -> torch.Tensor:
    """N x 2 x 3 sampling matrices (output -> input coordinates) for `affine_grid`."""
    n = len(windows)
    zoom = torch.exp(_uniform(n, math.log(0.85), math.log(1.25), gen) * strength)
    aspect = torch.exp(_uniform(n, -0.15, 0.15, gen) * strength)
    angle = _uniform(n, -10, 10, gen) * strength * math.pi / 180
    shift = _uniform(2 * n, -0.08, 0.08, gen).view(n, 2) * strength
    flip = torch.where(_chance(n, 0.5, gen), -1.0, 1.0)
    win = torch.tensor([[w.cx, w.cy, w.hx, w.hy] for w in windows], dtype=torch.float32)
    sx = win[:, 2] / (zoom * aspect) * flip
    sy = win[:, 3] / (zoom / aspect)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = sx * cos, -sy * sin
    theta[:, 1, 0], theta[:, 1, 1] = sx * sin, sy * cos
    theta[:, 0, 2] = win[:, 0] + shift[:, 0] * win[:, 2]
    theta[:, 1, 2] = win[:, 1] + shift[:, 1] * win[:, 3]
    return theta


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, -1)
    c = x.shape[0]
    x = F.conv2d(x.unsqueeze(0), k.unsqueeze(2).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    x = F.conv2d(x, k.unsqueeze(3).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)
    return x.squeeze(0)


def _calipers(x: torch.Tensor, gen: torch.Generator) -> None:
    """Draw 1-4 small bright '+' marks in place (C x H x W in [0, 1])."""
    _, h, w = x.shape
    arm = max(2, h // 60)
    for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
        yy = int(torch.randint(arm, h - arm, (1,), generator=gen))
        xx = int(torch.randint(arm, w - arm, (1,), generator=gen))
        x[:, yy, xx - arm:xx + arm + 1] = 1.0
        x[:, yy - arm:yy + arm + 1, xx] = 1.0


TGC_KNOTS = 5
"""Control points of a random time-gain-compensation curve (depth = image rows)."""


def scanner_style(x: torch.Tensor, gen: torch.Generator, *, strength: float = 1.0
                  ) -> torch.Tensor:
    """What changes with the scanner and its settings, on one C x H x W image in [0, 1]: a
    smooth random gain over depth (TGC, +-35%), a colour tint (+-8% per channel, the same for
    grey images turned RGB) and, half the time, a lateral gain band (+-20%)."""
    s = strength
    c, h, w = x.shape
    knots = 1 + _uniform(TGC_KNOTS, -0.35 * s, 0.35 * s, gen)
    curve = F.interpolate(knots.view(1, 1, -1), size=h, mode="linear", align_corners=True)
    x = x * curve.view(1, h, 1).to(x.device)
    tint = 1 + _uniform(c, -0.08 * s, 0.08 * s, gen)
    x = x * tint.view(c, 1, 1).to(x.device)
    if _chance(1, 0.5, gen):
        centre, width = float(_uniform(1, 0.1, 0.9, gen)), float(_uniform(1, 0.1, 0.4, gen))
        gain = float(_uniform(1, -0.2 * s, 0.2 * s, gen))
        cols = torch.linspace(0, 1, w, device=x.device)
        x = x * (1 + gain * torch.exp(-((cols - centre) / width) ** 2)).view(1, 1, w)
    return x.clamp(0, 1)


def intensity(x: torch.Tensor, gen: torch.Generator, *, strength: float = 1.0,
              style: bool = False) -> torch.Tensor:
    """Random gain, gamma, contrast, speckle, blur, resolution change and calipers on one
    C x H x W image in [0, 1], and `scanner_style` first with `style`; returns a new tensor in
    [0, 1]."""
    s = strength
    if style:
        x = scanner_style(x, gen, strength=s)
    x = x * float(_uniform(1, 1 - 0.25 * s, 1 + 0.3 * s, gen))
    x = x.clamp(0, 1) ** float(torch.exp(_uniform(1, math.log(0.7), math.log(1.5), gen) * s))
    mean = x.mean()
    x = (x - mean) * float(_uniform(1, 1 - 0.25 * s, 1 + 0.3 * s, gen)) + mean
    if _chance(1, 0.5 * s, gen):
        sigma = float(_uniform(1, 0.03, 0.2, gen))
        noise = torch.randn(x.shape[-2:], generator=gen).to(x.device)
        x = x * (1 + sigma * noise)
    if _chance(1, 0.3 * s, gen):
        x = _gaussian_blur(x, float(_uniform(1, 0.5, 1.5, gen)))
    if _chance(1, 0.3 * s, gen):
        size = x.shape[-2:]
        factor = float(_uniform(1, 0.35, 0.75, gen))
        small = F.interpolate(x.unsqueeze(0), scale_factor=factor, mode="bilinear",
                              align_corners=False, antialias=True)
        x = F.interpolate(small, size=size, mode="bilinear", align_corners=False).squeeze(0)
    x = x.clamp(0, 1)
    if _chance(1, 0.3 * s, gen):
        _calipers(x, gen)
    return x


def augment_batch(images: torch.Tensor, masks: torch.Tensor, windows: list[Window],
                  out_size: int, gen: torch.Generator, *, strength: float = 1.0,
                  style: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp and colour a batch (see module docstring) on the device the images are on;
    returns (normalised images, masks)."""
    x = images.permute(0, 3, 1, 2).float() / 255
    m = masks.unsqueeze(1).float()
    theta = affine_thetas(windows, gen, strength=strength).to(x.device)
    grid = F.affine_grid(theta, [len(windows), 1, out_size, out_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = (F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
         > 0.5).float()
    x = torch.stack([intensity(xi, gen, strength=strength, style=style) for xi in x])
    return NORMALISE(x), m


def eval_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x R x R x 3 -> normalised float N x 3 x R x R (no randomness)."""
    return NORMALISE(images.permute(0, 3, 1, 2).float() / 255)
