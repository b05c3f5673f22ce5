"""Weight averaging for training: an exponential moving average (EMA) of a network's weights
and batch-norm statistics, which validation and the saved model use instead of the last
step's weights (it generalises better to scanners not seen in training at no extra cost per
step). Built on `torch.optim.swa_utils.AveragedModel`.

With a fixed decay d the starting weights keep a share d^n of the average after n steps
(0.995 over 180 steps: 41%), so a short run validates and saves a network that is still largely
its initialisation. With warm-up the decay of step n is min(d, (1 + n) / (10 + n)): early steps
replace most of the average, and d applies once the run is long enough for it."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bus_core.errors import DataError
from bus_core.training.mixstyle import mixstyle_probability


def add_shared_training_options(p: argparse.ArgumentParser) -> None:
    """The options `train` and `train-seg` share for reading unseen scanners and for time-boxed
    runs: scanner-style augmentation, MixStyle, weight averaging, a training-time limit."""
    p.add_argument("--style-augment", action="store_true",
                   help="also randomise what differs between scanners (depth gain curve, tint, "
                        "lateral gain band)")
    p.add_argument("--mixstyle", type=mixstyle_probability, default=0.0, metavar="P",
                   help="in this share of training batches, mix the per-image feature "
                        "statistics of the first two dense blocks between images of different "
                        "sources (MixStyle; training only, the saved model is unchanged; "
                        "e.g. 0.5; 0: off)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate and keep an exponential moving average of the weights with "
                        "this decay per step (e.g. 0.998; 0: off)")
    p.add_argument("--ema-warmup", action="store_true",
                   help="with --ema: the decay grows as (1 + n) / (10 + n) over the first steps "
                        "up to DECAY, so that a short run averages its own steps rather than "
                        "its starting weights")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="MINUTES",
                   help="start no epoch that would end past this much training time; the run "
                        "then ends as after its last epoch (0: no limit)")


def check_average_options(ema: float, warmup: bool) -> None:
    """Refuse a warm-up without an average (`DataError`)."""
    if warmup and ema <= 0:
        raise DataError("--ema-warmup warms up the weight average: give --ema DECAY too "
                        "(e.g. 0.995).")


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of the average's update after `updates` earlier ones, with warm-up."""
    return min(decay, (1 + updates) / (10 + updates))


def _warm_ema_multi_avg_fn(decay: float) -> Any:
    """`get_ema_multi_avg_fn` with the decay of `warmed_decay` at each update."""
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               updates: torch.Tensor) -> None:
        get_ema_multi_avg_fn(warmed_decay(decay, int(updates.item())))(averaged, current, None)
    return update


class WeightAverage:
    """The EMA of `model` with `decay` per step (0: none, `module` is `model` itself), with
    warm-up (`warmed_decay`) when `warmup`."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"The EMA decay must be in [0, 1), not {decay}.")
        self.model = model
        average = _warm_ema_multi_avg_fn(decay) if warmup else get_ema_multi_avg_fn(decay)
        self._ema = (AveragedModel(model, multi_avg_fn=average, use_buffers=True)
                     if decay > 0 else None)

    @property
    def module(self) -> nn.Module:
        """The network to validate and save: the average, or the trained model without one."""
        return self.model if self._ema is None else self._ema.module

    def update(self) -> None:
        """Fold the model's current weights into the average (after each optimiser step)."""
        if self._ema is not None:
            self._ema.update_parameters(self.model)

    def state_dict(self) -> dict[str, Any] | None:
        """The average's state for a checkpoint (None without one)."""
        return None if self._ema is None else self._ema.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the average from a checkpoint (nothing without one)."""
        if self._ema is not None and state is not None:
            self._ema.load_state_dict(state)
