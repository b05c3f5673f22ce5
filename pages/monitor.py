"""Monitor: how a model reads the clinic's images over time (class mix, flagged, uncertain,
read without an outline, image sizes) and how often reviewers agree with it, beside its card's
test figures, with warnings; exportable as CSV (bus_core.clinic.monitoring)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from bus_core.clinic.cases import Case
from bus_core.clinic.monitoring import (
    MIN_REVIEWED,
    OUTLINE_DRIFT,
    SIZE_DRIFT,
    WINDOW_DAYS,
    WindowFigures,
    agreement_unchecked,
    image_widths,
    monitor,
    to_csv,
)
from bus_core.constants import CLASSES
from bus_core.models.card import ModelCard
from bus_core.models.registry import active_model_path, list_models
from ui.auth import require_page
from ui.cases import case_store
from ui.common import md_escape
from ui.state import memo

require_page("monitor")
st.title("Monitor")
st.caption("How a model reads the clinic's images over time, and how often the reviewers' "
           "confirmed labels agree with it.")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _with_interval(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else f"{value:.0%}"


def card_line(card: ModelCard | None) -> str:
    """The card's published figures at the flag, in words ('' when it has none)."""
    test = (card.metrics.get("test") or {}) if card else {}
    at = test.get("at_threshold") or {}
    if at.get("sensitivity") is None or at.get("specificity") is None:
        return ""
    return (f"The model card's test figures ({test.get('n', '?')} images): at the flag it "
            f"found {_with_interval(at['sensitivity'], at.get('sensitivity_ci95'))} of cancers "
            f"and left {_with_interval(at['specificity'], at.get('specificity_ci95'))} of the "
            "other images unflagged.")


def windows_table(windows: list[WindowFigures]) -> pd.DataFrame:
    """The windows as shown, newest first."""
    rows = [{"From": f"{w.start:%Y-%m-%d}", "To": f"{w.end:%Y-%m-%d}",
             "Readings": w.readings, "Reviewed": w.reviewed, "Agreement": _pct(w.agreement),
             "Cancers found": _with_interval(w.sensitivity, w.sensitivity_ci95),
             "Others unflagged": _with_interval(w.specificity, w.specificity_ci95),
             "Flagged": _pct(w.flagged), "Uncertain": _pct(w.uncertain),
             "No outline": _pct(w.without_outline),
             "Median width": "–" if w.median_width is None else f"{w.median_width:.0f} px",
             **{f"Read {c}": _pct(w.class_mix.get(c)) for c in CLASSES}}
            for w in reversed(windows)]
    return pd.DataFrame(rows)


store = case_store()
if store is None:
    st.stop()
cases: list[Case] = store.list_cases(descending=False)
if not cases:
    st.info("No cases have been saved yet: the monitor fills as clinicians save readings on "
            "the Diagnose page.")
    st.stop()
entries = list_models()
cards = {entry.card.name: entry.card for entry in entries}
active = active_model_path()
active_name = next((e.card.name for e in entries if e.path == active), None)
names = sorted({c.model_name for c in cases})
model = st.selectbox("Model", names, index=names.index(active_name) if active_name in names
                     else 0, help="The model that made the saved readings.")
period = st.segmented_control("Window", list(WINDOW_DAYS), default="month",
                              format_func=lambda k: f"{k.capitalize()} ({WINDOW_DAYS[k]} days)",
                              key="monitor_window") or "month"
card = cards.get(model)
mine = [c for c in cases if c.model_name == model]
windows = monitor(mine, WINDOW_DAYS[period],
                  threshold=card.malignant_threshold if card else None,
                  card_metrics=card.metrics if card else {},
                  # stored images never change (named by content): their widths are kept
                  widths=memo("monitor_widths", tuple((c.id, c.image_hash) for c in mine),
                              lambda: image_widths(mine, store.image_path), max_entries=4))
line = card_line(card)
if line:
    st.markdown(line)  # figures only: no user text
elif card is None:
    st.caption("This model is no longer in the registry: its card's figures are not shown.")
latest = windows[-1]
cols = st.columns(4)
cols[0].metric("Readings", latest.readings, help=f"Saved readings in the last {period}")
cols[1].metric("Flagged", _pct(latest.flagged),
               help=f"Readings flagged as possibly malignant in the last {period}")
cols[2].metric("Reviewed", latest.reviewed,
               help=f"Readings of the last {period} a reviewer confirmed or corrected")
cols[3].metric("Agreement", _pct(latest.agreement),
               help="Reviewed readings whose confirmed class is the model's")
warned = [(w, text) for w in reversed(windows) for text in w.warnings]
for window, text in warned:
    st.warning(f"{window.start:%Y-%m-%d} to {window.end:%Y-%m-%d}: {md_escape(text)}",
               icon=":material/warning:")
unchecked = agreement_unchecked(latest, card.metrics if card else {})
if not warned:
    st.success("No warnings: " + ("no change in the images seen." if unchecked else
                                  "agreement within the card's figures and no change in the "
                                  "images seen."), icon=":material/check_circle:")
if unchecked:
    st.info(f"Agreement is not compared with the card's figures: {unchecked}.",
            icon=":material/info:")
st.dataframe(windows_table(windows), hide_index=True, width="stretch")
st.download_button("Download the table (CSV)", to_csv(windows),
                   file_name=f"monitor-{period}.csv", mime="text/csv",
                   icon=":material/download:")
with st.expander("How these figures are made"):
    st.markdown(
        f"- Each row is one {WINDOW_DAYS[period]}-day window of saved readings of this model.\n"
        "- *Cancers found* and *Others unflagged* are the sensitivity and specificity of the "
        "malignant flag on the cases a reviewer confirmed, with 95% intervals (stratified "
        "bootstrap); *Agreement* is the share whose confirmed class is the model's.\n"
        f"- A warning comes when, with at least {MIN_REVIEWED} reviewed cases, a figure falls "
        "below the lower end of the card's test interval; when the median image width moves "
        f"more than {SIZE_DRIFT:.0%} from earlier windows; or when the share read without an "
        f"outline rises more than {OUTLINE_DRIFT * 100:.0f} points.\n"
        "- Reviewed cases are those a reviewer chose to confirm: they may not be a fair "
        "sample of all readings.")
