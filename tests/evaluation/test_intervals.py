"""Tests for bus_core.evaluation.intervals: the stratified bootstrap against closed forms, its
seeding and strata, the figures of every resample against compute_metrics, and the keys it
stores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bus_core.evaluation.intervals import (
    bootstrap_weights,
    figure_samples,
    paired_difference,
    score,
    threshold_samples,
)
from bus_core.metrics import HEADLINE_KEYS, compute_metrics, format_metrics, threshold_metrics

NORMAL, BENIGN, MALIGNANT = 0, 1, 2


def noisy(n: int, seed: int = 1, decimals: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Labels of three classes and rounded probabilities (so scores tie) leaning to them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    p = rng.dirichlet([1, 1, 1], n)
    p[np.arange(n), y] += 0.4
    p = np.round(p / p.sum(1, keepdims=True), decimals)
    return y, p / p.sum(1, keepdims=True)


def test_resamples_keep_the_class_counts() -> None:
    y = np.array([0] * 5 + [1] * 30 + [2] * 12)
    weights = bootstrap_weights(y, resamples=300, seed=3)
    assert weights.shape == (300, len(y)) and weights.min() >= 0
    for c, count in enumerate(np.bincount(y)):
        assert (weights[:, y == c].sum(axis=1) == count).all()
    assert len({tuple(row) for row in weights}) > 1  # the resamples differ


def test_same_seed_same_intervals_other_seed_other_intervals() -> None:
    y, p = noisy(200)
    first, again = score(y, p, seed=7), score(y, p, seed=7)
    other = score(y, p, seed=8)
    assert first == again
    assert first["accuracy_ci95"] != other["accuracy_ci95"]
    assert first["ci95"] == {"method": "stratified bootstrap percentile", "level": 0.95,
                             "resamples": 2000, "seed": 7}


def test_figures_of_unit_weights_are_those_of_compute_metrics() -> None:
    y, p = noisy(300)  # rounded scores: the AUCs meet ties
    samples = figure_samples(y, p, np.ones((1, len(y))))
    expected = compute_metrics(y, p)
    assert set(samples) == set(HEADLINE_KEYS)
    for key in HEADLINE_KEYS:
        assert samples[key][0] == pytest.approx(expected[key], abs=1e-12), key
    at = threshold_samples(y, p, 0.4, np.ones((1, len(y))))
    figures = threshold_metrics(y, p, 0.4)
    assert at["sensitivity"][0] == pytest.approx(figures["sensitivity"])
    assert at["specificity"][0] == pytest.approx(figures["specificity"])


def test_figures_of_resampled_weights_are_those_of_the_resampled_images() -> None:
    y, p = noisy(60, seed=2)
    weights = bootstrap_weights(y, resamples=3, seed=0)
    samples = figure_samples(y, p, weights)
    for row, w in enumerate(weights):
        drawn = np.repeat(np.arange(len(y)), w)
        expected = compute_metrics(y[drawn], p[drawn])
        for key in HEADLINE_KEYS:
            assert samples[key][row] == pytest.approx(expected[key], abs=1e-12), key


def test_accuracy_interval_matches_the_normal_approximation_on_a_large_set() -> None:
    n, right = 2000, 1600  # one class, so the stratified bootstrap is the plain one
    y = np.zeros(n, dtype=int)
    p = np.tile([0.2, 0.3, 0.5], (n, 1))
    p[:right] = [0.6, 0.2, 0.2]
    half = 1.959964 * math.sqrt(0.8 * 0.2 / n)
    low, high = score(y, p)["accuracy_ci95"]
    assert low == pytest.approx(0.8 - half, abs=0.002)
    assert high == pytest.approx(0.8 + half, abs=0.002)


def test_sensitivity_interval_is_the_binomial_one_of_the_malignant_images() -> None:
    y = np.array([MALIGNANT] * 1500 + [BENIGN] * 500)
    p = np.tile([0.1, 0.6, 0.3], (len(y), 1))
    p[:1200] = [0.1, 0.2, 0.7]  # 1200 of the 1500 malignant images found: 0.8
    half = 1.959964 * math.sqrt(0.8 * 0.2 / 1500)
    low, high = score(y, p)["malignant_sensitivity_ci95"]
    assert (low, high) == pytest.approx((0.8 - half, 0.8 + half), abs=0.003)


def test_perfect_figures_have_a_point_interval() -> None:
    y = np.array([0, 1, 2] * 20)
    p = np.eye(3)[y] * 0.9 + 0.1 / 3
    m = score(y, p, threshold=0.5)
    for key in ("accuracy", "macro_f1", "malignant_sensitivity", "malignant_specificity",
                "auc_malignant", "auc_macro_ovr"):
        assert m[f"{key}_ci95"] == pytest.approx([1.0, 1.0]), key
    assert m["at_threshold"]["sensitivity_ci95"] == pytest.approx([1.0, 1.0])


def test_score_keys_serialise_and_missing_figures_have_no_interval() -> None:
    y, p = noisy(120)
    sources = ["A"] * 70 + ["B"] * 50
    m = json.loads(json.dumps(score(y, p, threshold=0.4, sources=sources), allow_nan=False))
    for key in HEADLINE_KEYS:
        low, high = m[f"{key}_ci95"]
        assert low <= high
    assert {"sensitivity_ci95", "specificity_ci95"} <= set(m["at_threshold"])
    assert set(m["by_source"]) == {"A", "B"}
    part = m["by_source"]["B"]
    assert part["n"] == 50 and part["accuracy"] == compute_metrics(y[70:], p[70:])["accuracy"]
    assert "auc_malignant_ci95" in part and "sensitivity_ci95" in part["at_threshold"]
    assert "by_source" not in score(y, p, sources=["A"] * 120)
    benign_only = score([BENIGN] * 10, p[:10])
    assert benign_only["malignant_sensitivity"] is None
    assert benign_only["malignant_sensitivity_ci95"] is None
    assert benign_only["auc_malignant_ci95"] is None
    assert benign_only["accuracy_ci95"] is not None


def test_paired_difference_of_a_model_with_itself_is_zero_and_follows_a_better_one() -> None:
    y, p = noisy(200)
    same = paired_difference(y, p, p, ["accuracy", "auc_malignant"])
    assert same == {"accuracy": [0.0, 0.0], "auc_malignant": [0.0, 0.0]}
    better = p.copy()
    wrong = np.flatnonzero(p.argmax(1) != y)[:15]
    better[wrong] = np.eye(3)[y[wrong]]  # right on 15 more images, the rest unchanged
    low, high = paired_difference(y, better, p, ["accuracy"])["accuracy"]
    assert 0 < low <= 15 / 200 <= high  # every resample draws some of those images
    assert paired_difference([BENIGN] * 5, p[:5], p[:5], ["auc_malignant"]) == {
        "auc_malignant": None}


def test_terminal_text_shows_each_interval_and_each_source() -> None:
    y, p = noisy(120)
    m = score(y, p, threshold=0.4, sources=["A"] * 70 + ["B"] * 50)
    text = format_metrics(m)
    low, high = m["auc_malignant_ci95"]
    assert f"malignant {m['auc_malignant']:.3f} [{low:.3f}, {high:.3f}]" in text
    low, high = m["at_threshold"]["specificity_ci95"]
    assert f"specificity {m['at_threshold']['specificity']:.3f} [{low:.3f}, {high:.3f}]" in text
    assert "95% intervals, stratified bootstrap percentile (2000 resamples, seed 0)" in text
    assert "source A: n = 70" in text and "source B: n = 50" in text
    assert "[" not in format_metrics(compute_metrics(y, p))
