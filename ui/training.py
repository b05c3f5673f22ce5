"""Reading a training run's progress events: progress with ETA, live curves, final metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

LOSS_COLOUR, ACC_COLOUR, F1_COLOUR, AUC_COLOUR = "#c0392b", "#0f6e8c", "#2e8b57", "#8e44ad"


def fmt_duration(seconds: float | None) -> str:
    """'1 h 05 min', '3 min 20 s', '12 s' or '–'."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def last_event(events: Sequence[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """The latest event of `kind`, or None."""
    return next((e for e in reversed(events) if e["event"] == kind), None)


def progress_fraction(events: Sequence[dict[str, Any]]) -> float:
    """How much of the run is done, 0..1 (1 once it is done)."""
    if last_event(events, "done"):
        return 1.0
    step = last_event(events, "step")
    if step is None:
        return 0.0
    done = (step["epoch"] - 1) * step["steps"] + step["step"]
    return min(1.0, done / max(1, step["epochs"] * step["steps"]))


def progress_text(events: Sequence[dict[str, Any]], running: bool = True) -> str:
    """One line under the progress bar: epoch, step, speed and, while the run goes on
    (`running`: not finished and no cancel asked for), the time left."""
    if last_event(events, "done"):
        return "Finished"
    step = last_event(events, "step")
    if step is None:
        start = last_event(events, "start")
        return "Preparing the data and the model…" if start is None else "Starting the first step…"
    text = (f"Epoch {step['epoch']}/{step['epochs']} · step {step['step']}/{step['steps']} · "
            f"{step.get('images_per_s') or 0:.1f} images/s")
    if not running:
        return text
    if step["epoch"] == step["epochs"] and step["step"] == step["steps"]:
        return text + " · final validation and test…"
    return text + f" · about {fmt_duration(step.get('eta_s'))} left"


def step_series(events: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per training step (x = steps since the start, a resumed step replacing its first try):
    loss, the epoch's mean loss and running accuracy."""
    by_x: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["event"] == "step":
            by_x[(e["epoch"] - 1) * e["steps"] + e["step"]] = e
    xs = sorted(by_x)
    return {"x": xs, "loss": [by_x[x]["loss"] for x in xs],
            "mean_loss": [by_x[x]["mean_loss"] for x in xs],
            "accuracy": [by_x[x]["accuracy"] for x in xs]}


def epoch_rows(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished epoch: train loss / accuracy and the validation figures."""
    rows: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["event"] == "epoch":
            val = e.get("val") or {}
            rows[e["epoch"]] = {"epoch": e["epoch"], "train_loss": e.get("train_loss"),
                                "train_accuracy": e.get("train_accuracy"),
                                **{f"val_{k}": v for k, v in val.items()},
                                "best": e.get("improved", False)}
    return [rows[k] for k in sorted(rows)]


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
