"""A training run's live curves and final metrics as figures (the progress events are read by
bus_core.training.runs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bus_core.training.runs import epoch_rows, step_series

LOSS_COLOUR, ACC_COLOUR, F1_COLOUR, AUC_COLOUR = "#c0392b", "#0f6e8c", "#2e8b57", "#8e44ad"


def _style(figure: go.Figure, height: int = 280) -> go.Figure:
    figure.update_layout(height=height, margin=dict(l=0, r=0, t=30, b=0),
                         legend=dict(orientation="h", y=-0.25), plot_bgcolor="rgba(0,0,0,0)",
                         hovermode="x unified")
    figure.update_xaxes(gridcolor="#e8edf1")
    figure.update_yaxes(gridcolor="#e8edf1")
    return figure


def step_figure(events: Sequence[dict[str, Any]]) -> go.Figure | None:
    """Loss and accuracy per step (None before the first step)."""
    s = step_series(events)
    if not s["x"]:
        return None
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Training loss", "Training accuracy"))
    figure.add_scatter(x=s["x"], y=s["loss"], name="loss (batch)", row=1, col=1,
                       line=dict(color=LOSS_COLOUR, width=1), opacity=0.35)
    figure.add_scatter(x=s["x"], y=s["mean_loss"], name="loss (epoch mean)", row=1, col=1,
                       line=dict(color=LOSS_COLOUR, width=2))
    figure.add_scatter(x=s["x"], y=s["accuracy"], name="accuracy (epoch so far)", row=1, col=2,
                       line=dict(color=ACC_COLOUR, width=2))
    figure.update_xaxes(title_text="step", dtick=max(1, math.ceil(len(s["x"]) / 8)))
    figure.update_yaxes(range=[0, 1], row=1, col=2)
    return _style(figure)


def epoch_figure(events: Sequence[dict[str, Any]]) -> go.Figure | None:
    """Validation loss and scores per epoch (None before the first epoch ends)."""
    rows = epoch_rows(events)
    if not rows:
        return None
    x = [r["epoch"] for r in rows]
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Validation scores"))
    figure.add_scatter(x=x, y=[r["train_loss"] for r in rows], name="train loss", row=1, col=1,
                       mode="lines+markers", line=dict(color=LOSS_COLOUR, dash="dot"))
    figure.add_scatter(x=x, y=[r.get("val_loss") for r in rows], name="val loss", row=1, col=1,
                       mode="lines+markers", line=dict(color=LOSS_COLOUR))
    for key, name, colour in (("val_accuracy", "val accuracy", ACC_COLOUR),
                              ("val_macro_f1", "val macro-F1", F1_COLOUR),
                              ("val_auc_malignant", "val AUC malignant", AUC_COLOUR)):
        figure.add_scatter(x=x, y=[r.get(key) for r in rows], name=name, row=1, col=2,
                           mode="lines+markers", line=dict(color=colour))
    figure.update_xaxes(title_text="epoch", dtick=1)
    figure.update_yaxes(range=[0, 1.02], row=1, col=2)
    return _style(figure)
