"""Tables and plotly figures of an evaluation: metrics, confusion matrix, ROC, reliability."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go

from bus_core.data.dataset import csv_safe
from bus_core.evaluation.evaluate import Evaluation
from bus_core.evaluation.intervals import THRESHOLD_KEYS
from bus_core.inference.report import BAR_COLOURS, DEFAULT_BAR
from bus_core.metrics import CI_SUFFIX, HEADLINE_KEYS, METRIC_LABELS, fmt3, fmt_interval
from bus_core.training.architectures import COLUMN_TITLES, DISPLAY_COLUMNS, display_value

PER_CLASS: tuple[str, ...] = ("sensitivity", "specificity", "precision", "f1", "auc", "support")
RUN_COLOURS: tuple[str, ...] = tuple(plotly.colors.qualitative.Safe)
"""Line colours of the rows of a comparison run (colour-blind safe)."""


def metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(label, raw value) of the headline metrics, then n and n per class."""
    rows: list[tuple[str, Any]] = [(label, metrics.get(key))
                                   for key, label in METRIC_LABELS.items()]
    return rows + _count_rows(metrics)


def _count_rows(metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(label, count) of the images and of each class's images."""
    return [("Images (n)", metrics.get("n")),
            *((f"Images: {name}", count)
              for name, count in (metrics.get("n_per_class") or {}).items())]


def _threshold_label(key: str, threshold: float) -> str:
    return f"Malignant {key} at the threshold {threshold:.3f}"


def _display(value: Any) -> str:
    return str(value) if isinstance(value, int) else fmt3(value)


def metrics_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The headline metrics with their 95% intervals, the figures at the malignant threshold
    (when there is one), then the image counts, as a display table (3 decimals)."""
    rows = [(label, metrics.get(key), metrics.get(key + CI_SUFFIX))
            for key, label in METRIC_LABELS.items()]
    at = metrics.get("at_threshold")
    if at:
        rows += [(_threshold_label(key, at["threshold"]), at.get(key), at.get(key + CI_SUFFIX))
                 for key in THRESHOLD_KEYS]
    rows += [(label, count, None) for label, count in _count_rows(metrics)]
    return pd.DataFrame([{"Metric": label, "Value": _display(value),
                          "95% interval": fmt_interval(interval)}
                         for label, value, interval in rows])


def source_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One row per data source (`by_source`; empty with one source): n and each headline
    figure (and those at the malignant threshold) with its 95% interval."""
    rows = []
    for source, part in (metrics.get("by_source") or {}).items():
        row = {"Source": source, "Images (n)": str(part.get("n"))}
        row |= {label: _with_interval(part, key) for key, label in METRIC_LABELS.items()}
        at = part.get("at_threshold")
        if at:
            row |= {_threshold_label(key, at["threshold"]): _with_interval(at, key)
                    for key in THRESHOLD_KEYS}
        rows.append(row)
    return pd.DataFrame(rows)


def interval_note(metrics: Mapping[str, Any]) -> str:
    """How the 95% intervals of `metrics` were made, for a caption ('' without intervals)."""
    method = metrics.get("ci95")
    if not method:
        return ""
    return (f"[low, high]: {method['level']:.0%} intervals, {method['method']}, "
            f"{method['resamples']:,} resamples of these images (seed {method['seed']}).")


def _with_interval(figures: Mapping[str, Any], key: str) -> str:
    return f"{fmt3(figures.get(key))} {fmt_interval(figures.get(key + CI_SUFFIX))}".strip()


def per_class_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One row per class: sensitivity, specificity, precision, F1, AUC (3 decimals), support."""
    rows = []
    for name, figures in (metrics.get("per_class") or {}).items():
        row = {"Class": name}
        row.update({k.upper() if k == "auc" else k.capitalize(): _display(figures.get(k))
                    for k in PER_CLASS})
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Headline metrics of several models side by side: one column per model."""
    columns = {name: [_display(v) for _, v in metric_rows(m)] for name, m in results.items()}
    labels = [label for label, _ in metric_rows(next(iter(results.values())))] if results else []
    return pd.DataFrame(columns, index=labels)


def comparison_run_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The rows of a `python -m bus_core compare` run for display (sensitivity first)."""
    return pd.DataFrame([{COLUMN_TITLES[k]: display_value(k, row.get(k))
                          for k in DISPLAY_COLUMNS} for row in rows])


def metrics_csv(metrics: Mapping[str, Any]) -> str:
    """The scalar metrics and per-class figures as CSV (metric,value; full precision)."""
    rows = [(key, metrics.get(key)) for key in HEADLINE_KEYS]
    for key in HEADLINE_KEYS:
        low, high = metrics.get(key + CI_SUFFIX) or (None, None)
        rows += [(f"{key}{CI_SUFFIX}_low", low), (f"{key}{CI_SUFFIX}_high", high)]
    rows.append(("n", metrics.get("n")))
    rows += [(f"n_{name}", n) for name, n in (metrics.get("n_per_class") or {}).items()]
    for name, figures in (metrics.get("per_class") or {}).items():
        rows += [(f"{name}_{k}", figures.get(k)) for k in PER_CLASS]
    rows += [(key, metrics.get(key)) for key in ("temperature", "model")]
    return _safe_csv(pd.DataFrame(rows, columns=["metric", "value"]), index=False)


def comparison_csv(table: pd.DataFrame) -> str:
    """A `comparison_table` as CSV (model names as column headers)."""
    return _safe_csv(table, index=True)


def _safe_csv(frame: pd.DataFrame, index: bool) -> str:
    """`frame` as CSV with every cell, header and row label passed through `csv_safe`, so a
    spreadsheet does not run text such as a model name as a formula."""
    safe = frame.map(csv_safe)
    safe.columns = [csv_safe(c) for c in frame.columns]
    safe.index = [csv_safe(i) for i in frame.index]
    return safe.to_csv(index=index)


def evaluation_json(evaluation: Evaluation) -> str:
    """Metrics and misclassified cases as pretty JSON."""
    content = {**evaluation.metrics, "misclassified": [
        {"id": i, "true": t, "predicted": p, "probability": q}
        for i, t, p, q in evaluation.misclassified()]}
    return json.dumps(content, indent=2, allow_nan=False, default=str)


def _rgb(name: str) -> str:
    r, g, b = BAR_COLOURS.get(name, DEFAULT_BAR)
    return f"rgb({r}, {g}, {b})"


def _layout(figure: go.Figure, height: int = 380) -> go.Figure:
    figure.update_layout(height=height, margin=dict(l=0, r=0, t=30, b=0),
                         plot_bgcolor="rgba(0,0,0,0)", legend=dict(orientation="h", y=-0.2))
    return figure


def confusion_figure(metrics: Mapping[str, Any], normalise: bool = False) -> go.Figure:
    """The confusion matrix as a heat map (rows: true class; columns: predicted class);
    `normalise` shows each row as fractions of its true class."""
    labels = list(metrics.get("labels") or [])
    cm = np.asarray(metrics.get("confusion_matrix") or np.zeros((len(labels),) * 2), float)
    totals = cm.sum(axis=1, keepdims=True)
    shown = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0) if normalise else cm
    text = [[f"{shown[i, j]:.0%}" if normalise else str(int(cm[i, j]))
             for j in range(len(labels))] for i in range(len(labels))]
    figure = go.Figure(go.Heatmap(
        z=shown, x=labels, y=labels, text=text, texttemplate="%{text}",
        colorscale="Blues", showscale=False,
        hovertemplate="true %{y}, predicted %{x}: %{text}<extra></extra>"))
    figure.update_xaxes(title_text="Predicted class", side="bottom")
    figure.update_yaxes(title_text="True class", autorange="reversed")
    return _layout(figure, height=340)


def roc_figure(curves: Mapping[str, Mapping[str, Any]]) -> go.Figure:
    """One-vs-rest ROC curves per class, with their AUC in the legend."""
    figure = go.Figure()
    figure.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                       line=dict(color="#b0b8c0", dash="dot"), hoverinfo="skip")
    for name, curve in curves.items():
        figure.add_scatter(x=curve["fpr"], y=curve["tpr"], mode="lines", line_shape="hv",
                           name=f"{name} (AUC {fmt3(curve.get('auc'))})",
                           line=dict(color=_rgb(name), width=2))
    figure.update_xaxes(title_text="False-positive rate (1 − specificity)", range=[0, 1])
    figure.update_yaxes(title_text="True-positive rate (sensitivity)", range=[0, 1.02])
    return _layout(figure)


def roc_comparison_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """The malignant-vs-rest ROC curve on test of each row of a comparison run (AUC in the
    legend), with a marker where the row's validation-chosen threshold operates."""
    figure = go.Figure()
    figure.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                       line=dict(color="#b0b8c0", dash="dot"), hoverinfo="skip")
    for i, row in enumerate(rows):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        curve = row.get("roc")
        if curve:
            figure.add_scatter(x=curve["fpr"], y=curve["tpr"], mode="lines", line_shape="hv",
                               name=f"{row['row']} (AUC {fmt3(curve.get('auc'))})",
                               legendgroup=row["row"], line=dict(color=colour, width=2))
        sensitivity, specificity = (row.get("sensitivity_at_threshold"),
                                    row.get("specificity_at_threshold"))
        if sensitivity is not None and specificity is not None:
            figure.add_scatter(
                x=[1 - specificity], y=[sensitivity], mode="markers", legendgroup=row["row"],
                showlegend=False, marker=dict(color=colour, size=10, symbol="diamond"),
                hovertemplate=f"{row['row']} at its threshold: sensitivity {sensitivity:.3f}, "
                              f"specificity {specificity:.3f}<extra></extra>")
    figure.update_xaxes(title_text="False-positive rate (1 − specificity)", range=[0, 1])
    figure.update_yaxes(title_text="Malignant sensitivity", range=[0, 1.02])
    return _layout(figure, height=440)


def reliability_figure(curve: Mapping[str, Sequence[Any]], ece: float | None) -> go.Figure:
    """Reliability diagram: accuracy against confidence per bin, the diagonal being perfect
    calibration; bar widths follow the bins and hover shows their counts."""
    centres, accuracy = list(curve["bin_centers"]), list(curve["accuracy"])
    width = 1.0 / max(1, len(centres))
    figure = go.Figure()
    figure.add_bar(x=centres, y=[a if a is not None else 0 for a in accuracy], width=width * 0.9,
                   name="accuracy", marker_color="#0f6e8c", customdata=list(curve["counts"]),
                   hovertemplate="confidence %{x:.2f}: accuracy %{y:.3f} "
                                 "(%{customdata} images)<extra></extra>")
    figure.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                       line=dict(color="#c0392b", dash="dot"))
    figure.update_xaxes(title_text="Confidence (top probability)", range=[0, 1])
    figure.update_yaxes(title_text="Accuracy", range=[0, 1.02])
    figure.update_layout(title=dict(text=f"ECE {fmt3(ece)}", font=dict(size=13)))
    return _layout(figure)
