"""MixStyle for training: the per-image channel means and standard deviations of early feature
maps (what a scanner's gain, contrast and texture leave there) are mixed between images of a
batch, preferably of different sources, so that the network learns to read lesions under styles
between those of the training sources. It holds no weights, acts only while the network trains
and is never part of a saved model: inference is the same with and without it.

Zhou et al., "Domain Generalization with MixStyle", ICLR 2021.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

MIXSTYLE_LAYERS: tuple[str, ...] = ("denseblock1", "denseblock2")
"""The DenseNet `features` blocks whose outputs are mixed (the early ones hold style; the later
ones, content)."""


def mixstyle_probability(value: str) -> float:
    """A `--mixstyle` value: the share of training batches mixed, in [0, 1]."""
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, not {value!r}") from None
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"the share of batches mixed must be from 0 to 1, not {p}")
    return p


def mixing_partners(domains: torch.Tensor | None, n: int) -> torch.Tensor:
    """For each of `n` images, the index of the image whose style it takes: one drawn at random
    among the images of other sources (`domains`: each image's source id) when the batch has
    several sources, else a random permutation of the batch."""
    if domains is None or int(domains.unique().numel()) < 2:
        return torch.randperm(n)
    draws = torch.rand(n, n)
    draws[domains[:, None] == domains[None, :]] = -1.0  # never the image's own source
    return draws.argmax(dim=1)


class MixStyle(nn.Module):
    """Mixes each image's channel statistics with those of a partner image (`mixing_partners`)
    in a share `p` of training batches, by a weight drawn per image from Beta(`alpha`,
    `alpha`). Identity in eval mode. `domains` (the source id of each image of the next batch,
    or None) is set by the training loop before each step."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        if not 0 <= p <= 1 or alpha <= 0:
            raise ValueError(f"MixStyle needs p in [0, 1] and alpha > 0, not p={p}, "
                             f"alpha={alpha}.")
        self.p, self.eps = p, eps
        self.beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
        self.domains: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if not self.training or n < 2 or float(torch.rand(())) >= self.p:
            return x
        domains = self.domains if self.domains is not None and len(self.domains) == n else None
        partner = mixing_partners(domains, n).to(x.device)
        lam = self.beta.sample((n, 1, 1, 1)).to(x.device)
        features = x.float()
        mean = features.mean(dim=(2, 3), keepdim=True).detach()
        std = (features.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        mixed_mean = lam * mean + (1 - lam) * mean[partner]
        mixed_std = lam * std + (1 - lam) * std[partner]
        return ((features - mean) / std * mixed_std + mixed_mean).to(x.dtype)

    def attach(self, features: nn.Module,
               layers: tuple[str, ...] = MIXSTYLE_LAYERS) -> list[RemovableHandle]:
        """Apply to the outputs of `layers` of a DenseNet's `features` whenever `features` is in
        training mode, even where those layers are frozen (forward hooks: the network's modules
        and state dict stay as they are)."""

        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            return self(output) if features.training else output

        return [features.get_submodule(name).register_forward_hook(hook) for name in layers]
