"""The clinic monitor: readings and reviewed agreement over time windows, with warnings."""

from __future__ import annotations

import csv
import datetime as dt
import io

import numpy as np
import pytest

from bus_core.clinic.cases import Case
from bus_core.clinic.monitoring import (
    MIN_REVIEWED,
    agreement_unchecked,
    monitor,
    to_csv,
    window_bounds,
    window_figures,
)

NOW = dt.datetime(2026, 6, 30, 12, 0, tzinfo=dt.timezone.utc)
CARD = {"test": {"at_threshold": {"sensitivity": 0.9, "sensitivity_ci95": [0.8, 0.97],
                                  "specificity": 0.7, "specificity_ci95": [0.6, 0.8]}}}


def _case(i: int, days_ago: float, predicted: str, p_malignant: float,
          confirmed: str | None = None, outline: bool = True, uncertain: bool = False,
          flagged: bool | None = None) -> Case:
    rest = (1 - p_malignant) / 2
    probs = {"normal": rest, "benign": rest, "malignant": p_malignant}
    when = (NOW - dt.timedelta(days=days_ago)).isoformat()
    return Case(id=i, created_at=when, updated_at=when, image_hash=f"{i:064d}",
                image_name=f"img{i}.png", mask_hashes=("m",) if outline else (),
                combine_mode=None, model_name="m", model_hash="h", probabilities=probs,
                predicted_label=predicted, cam_settings=None, reviewer="",
                confirmed_label=confirmed, notes="", status="reviewed" if confirmed else "new",
                uncertain=uncertain, flagged=flagged)


def test_windows_reach_back_to_the_oldest_case_oldest_first() -> None:
    cases = [_case(1, 1, "benign", 0.1), _case(2, 20, "benign", 0.1)]
    bounds = window_bounds(cases, 7, NOW)
    assert len(bounds) == 3
    assert bounds[-1][1] == NOW and bounds[0][0] == NOW - dt.timedelta(days=21)
    assert window_bounds([], 7, NOW) == []


def test_window_figures_count_readings_and_reviewed_agreement() -> None:
    cases = [_case(1, 1, "malignant", 0.8, "malignant"),
             _case(2, 1, "benign", 0.3, "malignant"),       # flagged (0.3 >= 0.25), wrong class
             _case(3, 1, "benign", 0.1, "benign", outline=False, uncertain=True),
             _case(4, 1, "normal", 0.05),                     # not reviewed
             _case(5, 9, "benign", 0.9, "benign")]            # in another window
    w = window_figures(cases, NOW - dt.timedelta(days=7), NOW, threshold=0.25,
                       widths={1: 800, 2: 800, 3: 1000})
    assert w.readings == 4 and w.reviewed == 3
    assert w.class_mix == {"normal": 0.25, "benign": 0.5, "malignant": 0.25}
    assert w.flagged == pytest.approx(0.5)
    assert w.uncertain == pytest.approx(0.25)
    assert w.without_outline == pytest.approx(0.25)
    assert w.median_width == 800
    assert w.agreement == pytest.approx(2 / 3)
    # both cancers were flagged; the benign one was not
    assert w.sensitivity == 1.0 and w.specificity == 1.0
    assert w.sensitivity_ci95 is not None


def test_live_sensitivity_below_the_cards_interval_is_warned_with_enough_reviews() -> None:
    missed = [_case(i, 1, "benign", 0.1, "malignant") for i in range(MIN_REVIEWED)]
    found = [_case(100 + i, 1, "malignant", 0.9, "malignant") for i in range(MIN_REVIEWED)]
    benign = [_case(200 + i, 1, "benign", 0.1, "benign") for i in range(MIN_REVIEWED)]
    [window] = monitor(missed + found + benign, 7, threshold=0.25, card_metrics=CARD, now=NOW)
    assert window.sensitivity == 0.5
    assert any("Live sensitivity (50% of cancers found" in w for w in window.warnings)
    assert not any("specificity" in w for w in window.warnings)
    # the same figures on fewer reviewed cases than MIN_REVIEWED give no warning
    [few] = monitor(missed[:2] + found[:2] + benign[:2], 7, threshold=0.25, card_metrics=CARD,
                    now=NOW)
    assert few.sensitivity == 0.5 and few.warnings == []


def test_drift_in_image_size_and_outline_share_is_warned() -> None:
    old = [_case(i, 10, "benign", 0.1) for i in range(10)]
    new = [_case(100 + i, 1, "normal", 0.1, outline=i < 3) for i in range(10)]
    widths = {c.id: 800 for c in old} | {c.id: 1200 for c in new}
    windows = monitor(old + new, 7, threshold=0.25, card_metrics=CARD, widths=widths, now=NOW)
    assert windows[-1].warnings and windows[0].warnings == []
    text = " ".join(windows[-1].warnings)
    assert "median width 1200 px against 800 px" in text
    assert "without a lesion outline (70% against 0% before)" in text


def test_csv_has_one_row_per_window_in_percent() -> None:
    cases = [_case(1, 1, "malignant", 0.8, "malignant"), _case(2, 8, "benign", 0.1)]
    windows = monitor(cases, 7, threshold=0.25, card_metrics=CARD, now=NOW)
    rows = list(csv.DictReader(io.StringIO(to_csv(windows))))
    assert len(rows) == 2
    assert rows[-1]["read malignant %"] == "100.0" and rows[-1]["reviewed"] == "1"
    assert rows[0]["agreement %"] == "" and rows[0]["flagged %"] == "0.0"
    assert np.isclose(float(rows[-1]["sensitivity %"]), 100.0)


def test_the_flag_saved_with_a_case_counts_before_the_threshold() -> None:
    # saved flags (a study's, or another threshold's) win; the threshold fills in the rest
    cases = [_case(1, 1, "benign", 0.1, flagged=True), _case(2, 1, "benign", 0.9, flagged=False),
             _case(3, 1, "benign", 0.9), _case(4, 1, "benign", 0.1)]
    w = window_figures(cases, NOW - dt.timedelta(days=7), NOW, threshold=0.25)
    assert w.flagged == pytest.approx(0.5)
    # without a threshold only the saved flags count
    w = window_figures(cases, NOW - dt.timedelta(days=7), NOW, threshold=None)
    assert w.flagged == pytest.approx(0.5)
    unsaved = window_figures(cases[2:], NOW - dt.timedelta(days=7), NOW, threshold=None)
    assert unsaved.flagged is None


def test_agreement_is_compared_only_with_test_figures_and_enough_reviews() -> None:
    reviewed = [_case(i, 1, "benign", 0.1, "benign") for i in range(MIN_REVIEWED)]
    [enough] = monitor(reviewed, 7, threshold=0.25, card_metrics=CARD, now=NOW)
    assert agreement_unchecked(enough, CARD) is None
    assert "no test figures" in agreement_unchecked(enough, {})
    [few] = monitor(reviewed[:1], 7, threshold=0.25, card_metrics=CARD, now=NOW)
    assert agreement_unchecked(few, CARD) == (
        f"1 reviewed case in the latest window, fewer than the {MIN_REVIEWED} needed")
