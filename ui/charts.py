"""Plotly figures of predictions."""

from __future__ import annotations

from collections.abc import Mapping

import plotly.graph_objects as go

from bus_core.constants import MALIGNANT
from bus_core.inference.report import BAR_COLOURS, DEFAULT_BAR


def _rgb(colour: tuple[int, int, int], alpha: float = 1.0) -> str:
    return f"rgba({colour[0]}, {colour[1]}, {colour[2]}, {alpha})"


def probability_chart(probabilities: Mapping[str, float], label: str,
                      threshold: float | None = None,
                      malignant_threshold: float | None = None) -> go.Figure:
    """Horizontal bars of the calibrated probabilities (first class on top); the predicted
    class is drawn solid, the others faded; the certainty `threshold` is drawn as a dotted line
    across the chart, the `malignant_threshold` of the malignant flag as a red mark on the
    malignant bar."""
    names = list(probabilities)[::-1]
    values = [probabilities[n] for n in names]
    colours = [_rgb(BAR_COLOURS.get(n, DEFAULT_BAR), 1.0 if n == label else 0.35) for n in names]
    figure = go.Figure(go.Bar(
        x=values, y=[n.capitalize() for n in names], orientation="h", marker_color=colours,
        text=[f"{v:.0%}" for v in values], textposition="outside", cliponaxis=False,
        hovertemplate="%{y}: %{x:.1%}<extra></extra>"))
    if threshold is not None:
        figure.add_vline(x=threshold, line_dash="dot", line_color="#8a96a3", line_width=1,
                         annotation_text="certainty threshold", annotation_position="top",
                         annotation_font_size=11, annotation_font_color="#6c7a89")
    if malignant_threshold is not None and MALIGNANT in names:
        row = names.index(MALIGNANT)
        figure.add_shape(type="line", x0=malignant_threshold, x1=malignant_threshold,
                         y0=row - 0.45, y1=row + 0.45, line=dict(color="#c0392b", width=3))
        figure.add_annotation(x=malignant_threshold, y=row - 0.45, yanchor="top",
                              text="malignant flag", showarrow=False,
                              font=dict(size=11, color="#c0392b"))
    figure.update_layout(
        height=60 + 44 * len(names), margin=dict(l=0, r=40, t=28, b=0), bargap=0.35,
        xaxis=dict(range=[0, 1], tickformat=".0%", showgrid=True, gridcolor="#e8edf1",
                   fixedrange=True, zeroline=False),
        yaxis=dict(fixedrange=True, automargin=True), showlegend=False,
        plot_bgcolor="rgba(0,0,0,0)")
    return figure
