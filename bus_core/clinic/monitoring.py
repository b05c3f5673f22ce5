"""How a model does in the clinic, from its saved cases: over consecutive time windows, the
readings it made (class mix, share flagged, share uncertain, share read without an outline,
image sizes) and, on the cases a reviewer confirmed, its agreement with them (sensitivity and
specificity for malignant at its flag, with 95% intervals, accuracy, calibration) beside the
model card's test figures; plain warnings when live agreement falls below the card's interval
or the input mix drifts from the earlier windows.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bus_core.clinic.cases import Case
from bus_core.constants import CLASSES, MALIGNANT
from bus_core.evaluation.intervals import score

WINDOW_DAYS: dict[str, int] = {"week": 7, "month": 30, "quarter": 91}
"""The window lengths a monitor offers, in days."""
MIN_REVIEWED = 10
"""Reviewed cases a window needs before its agreement is compared with the card's."""
SIZE_DRIFT = 0.2
"""A window's median image width this far (as a share) from the earlier windows' is drift."""
OUTLINE_DRIFT = 0.15
"""A share of readings without an outline this much above the earlier windows' is drift."""


@dataclass(frozen=True)
class WindowFigures:
    """One window's figures (shares in [0, 1]; None where there is nothing to count)."""

    start: dt.datetime
    end: dt.datetime
    readings: int
    class_mix: dict[str, float]
    flagged: float | None
    uncertain: float | None
    without_outline: float | None
    median_width: float | None
    reviewed: int
    agreement: float | None
    sensitivity: float | None = None
    sensitivity_ci95: list[float] | None = None
    specificity: float | None = None
    specificity_ci95: list[float] | None = None
    ece: float | None = None
    warnings: list[str] = field(default_factory=list)


def _when(case: Case) -> dt.datetime:
    when = dt.datetime.fromisoformat(case.created_at)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _share(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def window_bounds(cases: Sequence[Case], days: int, now: dt.datetime | None = None
                  ) -> list[tuple[dt.datetime, dt.datetime]]:
    """Consecutive windows of `days` days ending at `now`, oldest first, reaching back to the
    oldest case (none without cases)."""
    if not cases:
        return []
    end = now or dt.datetime.now(dt.timezone.utc)
    oldest = min(_when(c) for c in cases)
    bounds = []
    while end > oldest:
        bounds.append((end - dt.timedelta(days=days), end))
        end -= dt.timedelta(days=days)
    return bounds[::-1]


def flag_of(case: Case, threshold: float | None) -> bool | None:
    """Whether the malignant flag was raised for `case`: as saved with it, else P(malignant) at
    `threshold` (None when neither is known)."""
    if case.flagged is not None:
        return case.flagged
    return None if threshold is None else case.probabilities.get(MALIGNANT, 0.0) >= threshold


def window_figures(cases: Sequence[Case], start: dt.datetime, end: dt.datetime, *,
                   threshold: float | None, widths: Mapping[int, int] | None = None,
                   classes: Sequence[str] = CLASSES) -> WindowFigures:
    """The figures of the cases made in [start, end); `widths`: image width by case id,
    where known."""
    inside = [c for c in cases if start <= _when(c) < end]
    reviewed = [c for c in inside if c.confirmed_label in classes]
    sized = [widths[c.id] for c in inside if widths and c.id in widths]
    figures: dict[str, Any] = {}
    if reviewed:
        y = np.asarray([list(classes).index(str(c.confirmed_label)) for c in reviewed])
        probs = np.asarray([[c.probabilities.get(k, 0.0) for k in classes] for c in reviewed])
        scored = score(y, probs, classes, threshold=threshold)
        at = scored.get("at_threshold") or {}
        figures = {"sensitivity": at.get("sensitivity"),
                   "sensitivity_ci95": at.get("sensitivity_ci95"),
                   "specificity": at.get("specificity"),
                   "specificity_ci95": at.get("specificity_ci95"), "ece": scored.get("ece")}
    return WindowFigures(
        start=start, end=end, readings=len(inside),
        class_mix={k: float(np.mean([c.predicted_label == k for c in inside])) if inside
                   else 0.0 for k in classes},
        flagged=_share([f for f in (flag_of(c, threshold) for c in inside) if f is not None]),
        uncertain=_share([c.uncertain for c in inside]),
        without_outline=_share([not c.mask_hashes for c in inside]),
        median_width=float(np.median(sized)) if sized else None,
        reviewed=len(reviewed),
        agreement=_share([c.confirmed_label == c.predicted_label for c in reviewed]),
        **figures)


def _below(live: float | None, card: Mapping[str, Any], key: str) -> bool:
    low = (card.get(f"{key}_ci95") or [None])[0]
    return live is not None and low is not None and live < low


def warnings_for(window: WindowFigures, earlier: Sequence[WindowFigures],
                 card_metrics: Mapping[str, Any]) -> list[str]:
    """Plain warnings for `window`: agreement under the card's test interval (with enough
    reviewed cases), or an input mix unlike the `earlier` windows'."""
    found = []
    at = (card_metrics.get("test") or {}).get("at_threshold") or {}
    if window.reviewed >= MIN_REVIEWED:
        for key, words in (("sensitivity", "cancers found"), ("specificity",
                                                                 "non-cancers left unflagged")):
            live = getattr(window, key)
            if _below(live, at, key):
                found.append(f"Live {key} ({live:.0%} of {words}, on {window.reviewed} reviewed "
                             f"cases) is below the model card's test interval (from "
                             f"{at[f'{key}_ci95'][0]:.0%}). Check recent cases and consider "
                             "retraining.")
    past_widths = [w.median_width for w in earlier if w.median_width]
    if window.median_width and past_widths:
        before = float(np.median(past_widths))
        if abs(window.median_width - before) > SIZE_DRIFT * before:
            found.append(f"Images are a different size from before (median width "
                         f"{window.median_width:.0f} px against {before:.0f} px): a new scanner "
                         "or setting? Check readings closely.")
    past_outline = [w.without_outline for w in earlier if w.without_outline is not None]
    if window.without_outline is not None and past_outline:
        before = float(np.mean(past_outline))
        if window.without_outline - before > OUTLINE_DRIFT:
            found.append(f"More images read without a lesion outline ({window.without_outline:.0%}"
                         f" against {before:.0%} before): images unlike those it was made for?")
    return found


def agreement_unchecked(window: WindowFigures, card_metrics: Mapping[str, Any]) -> str | None:
    """Why `window`'s agreement is not compared with the model card's test figures (None when
    it is)."""
    at = (card_metrics.get("test") or {}).get("at_threshold") or {}
    if not any(at.get(f"{key}_ci95") for key in ("sensitivity", "specificity")):
        return "the model's card has no test figures to compare with"
    if window.reviewed < MIN_REVIEWED:
        return (f"{window.reviewed} reviewed case{'' if window.reviewed == 1 else 's'} in the "
                f"latest window, fewer than the {MIN_REVIEWED} needed")
    return None


def monitor(cases: Sequence[Case], days: int, *, threshold: float | None,
            card_metrics: Mapping[str, Any], widths: Mapping[int, int] | None = None,
            now: dt.datetime | None = None, classes: Sequence[str] = CLASSES
            ) -> list[WindowFigures]:
    """Every window's figures with its warnings, oldest first."""
    result: list[WindowFigures] = []
    for start, end in window_bounds(cases, days, now):
        window = window_figures(cases, start, end, threshold=threshold, widths=widths,
                                classes=classes)
        window.warnings.extend(warnings_for(window, result, card_metrics))
        result.append(window)
    return result


def to_csv(windows: Sequence[WindowFigures], classes: Sequence[str] = CLASSES) -> str:
    """The windows as CSV text: one row each, shares in percent (1 decimal)."""

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.1f}"

    def ci(value: list[float] | None, i: int) -> str:
        return "" if not value or value[i] is None else pct(value[i])

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["from", "to", "readings", *(f"read {k} %" for k in classes), "flagged %",
                     "uncertain %", "without outline %", "median width px", "reviewed",
                     "agreement %", "sensitivity %", "sensitivity low %", "sensitivity high %",
                     "specificity %", "specificity low %", "specificity high %", "warnings"])
    for w in windows:
        writer.writerow([f"{w.start:%Y-%m-%d %H:%M}", f"{w.end:%Y-%m-%d %H:%M}", w.readings,
                         *(pct(w.class_mix.get(k)) for k in classes), pct(w.flagged),
                         pct(w.uncertain), pct(w.without_outline),
                         "" if w.median_width is None else f"{w.median_width:.0f}", w.reviewed,
                         pct(w.agreement), pct(w.sensitivity), ci(w.sensitivity_ci95, 0),
                         ci(w.sensitivity_ci95, 1), pct(w.specificity),
                         ci(w.specificity_ci95, 0), ci(w.specificity_ci95, 1),
                         " ".join(w.warnings)])
    return out.getvalue()


def image_widths(cases: Sequence[Case], image_path: Callable[[str], Path]) -> dict[int, int]:
    """Each case's image width in pixels, read from the stored image's header
    (`image_path(hash)`: `CaseStore.image_path`); cases whose image cannot be read are left
    out."""
    widths: dict[int, int] = {}
    for case in cases:
        try:
            with Image.open(image_path(case.image_hash)) as image:
                widths[case.id] = image.width
        except (OSError, UnidentifiedImageError):
            continue
    return widths
