"""Tests for bus_core.metrics: hand-computed figures on tiny arrays, edge cases, calibration."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bus_core.metrics import (
    compute_metrics,
    expected_calibration_error,
    fit_temperature,
    format_metrics,
    nll,
    percent_pair,
    reliability_curve,
    roc_curves,
    softmax,
)

NORMAL, BENIGN, MALIGNANT = 0, 1, 2


def probs_for(predictions: list[int], confidence: float = 0.8, k: int = 3) -> np.ndarray:
    """Rows whose argmax is the given prediction, with the rest spread evenly."""
    p = np.full((len(predictions), k), (1 - confidence) / (k - 1))
    p[np.arange(len(predictions)), predictions] = confidence
    return p


# Nine samples: true 0 -> [0, 1]; true 1 -> [1, 1, 2]; true 2 -> [2, 2, 1, 0].
Y = [0, 0, 1, 1, 1, 2, 2, 2, 2]
PRED = [0, 1, 1, 1, 2, 2, 2, 1, 0]


def test_confusion_matrix_and_summary_figures_by_hand() -> None:
    m = compute_metrics(Y, probs_for(PRED))
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [1, 1, 2]]
    assert m["n"] == 9
    assert m["labels"] == ["normal", "benign", "malignant"]
    assert m["n_per_class"] == {"normal": 2, "benign": 3, "malignant": 4}
    assert m["accuracy"] == pytest.approx(5 / 9)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 7 + 4 / 7) / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 4) / 3)


def test_per_class_sensitivity_specificity_precision_f1_by_hand() -> None:
    per = compute_metrics(Y, probs_for(PRED))["per_class"]
    # malignant: TP 2, FN 2, FP 1, TN 4
    assert per["malignant"]["sensitivity"] == pytest.approx(2 / 4)
    assert per["malignant"]["specificity"] == pytest.approx(4 / 5)
    assert per["malignant"]["precision"] == pytest.approx(2 / 3)
    assert per["malignant"]["f1"] == pytest.approx(4 / 7)
    assert per["malignant"]["support"] == 4
    # benign: TP 2, FN 1, FP 2, TN 4
    assert per["benign"]["sensitivity"] == pytest.approx(2 / 3)
    assert per["benign"]["specificity"] == pytest.approx(4 / 6)
    assert per["benign"]["precision"] == pytest.approx(2 / 4)
    assert per["benign"]["f1"] == pytest.approx(4 / 7)
    # normal: TP 1, FN 1, FP 1, TN 6
    assert per["normal"]["sensitivity"] == pytest.approx(1 / 2)
    assert per["normal"]["specificity"] == pytest.approx(6 / 7)
    assert per["normal"]["f1"] == pytest.approx(2 / 4)


def test_malignant_summary_keys_mirror_per_class() -> None:
    m = compute_metrics(Y, probs_for(PRED))
    assert m["malignant_sensitivity"] == pytest.approx(0.5)
    assert m["malignant_specificity"] == pytest.approx(0.8)
    assert m["auc_malignant"] == m["per_class"]["malignant"]["auc"]


def test_auc_by_hand_with_a_tie() -> None:
    # malignant scores: positives 0.4, 0.9; negatives 0.1, 0.6, 0.4 (tie with a positive).
    # Pairs won: 0.4 > 0.1, 0.4 = 0.4 (half), 0.9 beats all three -> 4.5 / 6.
    score = np.array([0.1, 0.6, 0.4, 0.4, 0.9])
    probs = np.stack([np.zeros(5), 1 - score, score], axis=1)
    m = compute_metrics([1, 1, 1, 2, 2], probs)
    assert m["auc_malignant"] == pytest.approx(4.5 / 6)


def test_auc_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    probs = softmax(np.round(rng.normal(size=(60, 3)) + np.eye(3)[y], 1))
    m = compute_metrics(y, probs)
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert m["auc_macro_ovr"] == pytest.approx(expected)
    for c, name in enumerate(m["labels"]):
        assert m["per_class"][name]["auc"] == pytest.approx(roc_auc_score(y == c, probs[:, c]))


def test_perfect_classifier() -> None:
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    m = compute_metrics(y, np.eye(3)[y])
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["auc_macro_ovr"] == 1.0
    assert m["auc_malignant"] == 1.0
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)


def test_benign_malignant_subset_gives_none_for_normal() -> None:
    y = [1, 1, 1, 2, 2, 2]
    pred = [1, 0, 1, 2, 2, 1]  # one benign predicted normal, one malignant predicted benign
    probs = probs_for(pred)
    probs[[0, 3], 2] += [0.05, 0.1]  # break ties within the malignant column
    probs /= probs.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y, probs)
    normal = m["per_class"]["normal"]
    assert normal["sensitivity"] is None and normal["auc"] is None
    assert normal["precision"] == 0.0 and normal["f1"] == 0.0  # one false "normal", no TP
    assert normal["support"] == 0
    assert normal["specificity"] == pytest.approx(5 / 6)  # 1 false "normal" among 6 negatives
    assert m["confusion_matrix"][0] == [0, 0, 0]
    assert m["auc_malignant"] is not None and 0.0 <= m["auc_malignant"] <= 1.0
    benign_f1 = 2 * 2 / (2 * 2 + 1 + 1)  # TP 2, FP 1, FN 1
    malignant_f1 = 2 * 2 / (2 * 2 + 0 + 1)  # TP 2, FP 0, FN 1
    assert m["macro_f1"] == pytest.approx((benign_f1 + malignant_f1) / 2)
    aucs = [m["per_class"][c]["auc"] for c in ("benign", "malignant")]
    assert m["auc_macro_ovr"] == pytest.approx(np.mean(aucs))


def test_single_class_gives_none_aucs_without_warnings() -> None:
    y = [2, 2, 2, 2]
    probs = probs_for([2, 2, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y, probs)
        curves = roc_curves(y, probs)
    assert m["auc_macro_ovr"] is None and m["auc_malignant"] is None
    assert m["malignant_sensitivity"] == pytest.approx(3 / 4)
    assert m["malignant_specificity"] is None
    assert curves == {}


def test_empty_set_gives_none() -> None:
    m = compute_metrics(np.zeros(0, dtype=int), np.zeros((0, 3)))
    assert m["n"] == 0 and m["accuracy"] is None and m["ece"] is None
    assert m["confusion_matrix"] == [[0] * 3] * 3


@pytest.mark.parametrize("y", [Y, [1, 2, 2, 1], [0, 0, 0]])
def test_output_is_strict_json_with_python_numbers(y: list[int]) -> None:
    rng = np.random.default_rng(0)
    m = compute_metrics(np.array(y), softmax(rng.normal(size=(len(y), 3)).astype(np.float32)))
    assert json.loads(json.dumps(m, allow_nan=False)) == m

    def check(value: object) -> None:
        if isinstance(value, dict):
            [check(v) for v in value.values()]
        elif isinstance(value, list):
            [check(v) for v in value]
        else:
            assert value is None or type(value) in (int, float, str), type(value)
    check(m)


def test_ece_known_value() -> None:
    # Three rows at confidence 0.65, all right (gap 0.35); one at 0.95, wrong (gap 0.95).
    probs = np.array([[0.65, 0.35, 0.0]] * 3 + [[0.95, 0.05, 0.0]])
    y = [0, 0, 0, 1]
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx((3 * 0.35 + 0.95) / 4)
    assert compute_metrics(y, probs)["ece"] == pytest.approx((3 * 0.35 + 0.95) / 4)


def test_reliability_curve_counts_and_consistency_with_ece() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 50)
    probs = softmax(rng.normal(size=(50, 3)) * 2)
    curve = reliability_curve(y, probs, n_bins=10)
    assert sum(curve["counts"]) == 50
    assert curve["bin_centers"][0] == pytest.approx(0.05) and len(curve["bin_centers"]) == 10
    for count, acc, conf in zip(curve["counts"], curve["accuracy"], curve["confidence"]):
        assert (acc is None) == (conf is None) == (count == 0)
    gaps = [n * abs(a - c) for n, a, c in zip(*(curve[k] for k in ("counts", "accuracy",
                                                                    "confidence"))) if n]
    assert sum(gaps) / 50 == pytest.approx(expected_calibration_error(y, probs, n_bins=10))


def test_roc_curves_skip_classes_and_match_auc() -> None:
    y = [1, 1, 2, 2, 2]
    probs = softmax(np.random.default_rng(2).normal(size=(5, 3)))
    curves = roc_curves(y, probs)
    assert set(curves) == {"benign", "malignant"}
    m = compute_metrics(y, probs)
    for name, curve in curves.items():
        assert curve["fpr"][0] == 0.0 and curve["tpr"][0] == 0.0
        assert curve["fpr"][-1] == 1.0 and curve["tpr"][-1] == 1.0
        assert curve["auc"] == pytest.approx(m["per_class"][name]["auc"])


def test_softmax_is_stable_and_uses_temperature() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = softmax(logits)
    assert np.allclose(p.sum(axis=1), 1.0) and np.isfinite(p).all()
    assert p[0, 0] == pytest.approx(1.0)
    assert np.allclose(softmax(logits, 2.0), softmax(logits / 2.0))
    with pytest.raises(ValueError):
        softmax(logits, 0.0)


def test_nll_matches_definition() -> None:
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    y = [1, 2]
    p = softmax(logits / 1.5)
    assert nll(logits, y, 1.5) == pytest.approx(-np.mean(np.log(p[[0, 1], y])))


def test_fit_temperature_recovers_known_temperature() -> None:
    rng = np.random.default_rng(0)
    t_true = 2.5
    logits = rng.normal(0.0, 4.0, size=(2000, 3))
    p = softmax(logits, t_true)
    y = (rng.random(2000)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    t = fit_temperature(logits, y)
    assert abs(t - t_true) / t_true < 0.15
    assert nll(logits, y, t) < nll(logits, y, 1.0)
    assert fit_temperature(logits, y) == t  # deterministic


def test_fit_temperature_keeps_one_when_data_is_too_small() -> None:
    logits = np.random.default_rng(0).normal(size=(20, 3))
    assert fit_temperature(logits[:4], [0, 1, 2, 0]) == 1.0
    assert fit_temperature(logits, [2] * 20) == 1.0


def test_format_metrics_lists_figures_and_matrix() -> None:
    text = format_metrics(json.loads(json.dumps(compute_metrics(Y, probs_for(PRED)))))
    assert "0.556" in text  # accuracy 5/9
    assert "0.800" in text  # malignant specificity
    assert "malignant 4" in text and "normal 2" in text
    matrix_rows = [line.split() for line in text.splitlines()[-3:]]
    assert matrix_rows == [["normal", "1", "1", "0"], ["benign", "0", "2", "1"],
                           ["malignant", "1", "1", "2"]]
    assert "n/a" in format_metrics(compute_metrics([2, 2], probs_for([2, 2])))


@pytest.mark.parametrize(("y", "probs"), [
    ([0, 1], np.ones((2, 2)) / 2),          # two columns for three classes
    ([0, 3], np.ones((2, 3)) / 3),          # label out of range
    ([0, 1, 2], np.ones((2, 3)) / 3),       # length mismatch
    ([0, 1], np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]])),
])
def test_bad_input_raises(y: list[int], probs: np.ndarray) -> None:
    with pytest.raises(ValueError):
        compute_metrics(y, probs)


def test_malignant_threshold_reaches_the_target_sensitivity():
    from bus_core.metrics import fit_malignant_threshold, threshold_metrics

    y = np.array([2] * 10 + [1] * 10)
    p_mal = np.concatenate([np.linspace(0.95, 0.05, 10), np.linspace(0.5, 0.0, 10)])
    probs = np.stack([np.zeros(20), 1 - p_mal, p_mal], axis=1)
    t = fit_malignant_threshold(y, probs, target_sensitivity=0.9)
    assert t == pytest.approx(p_mal[8])  # the 9th highest malignant score: 9 / 10 found
    at = threshold_metrics(y, probs, t)
    assert at["sensitivity"] == pytest.approx(0.9) and at["flagged"] == 9 + 7
    assert at["specificity"] == pytest.approx(0.3)
    assert fit_malignant_threshold(np.array([0, 1]), probs[:2]) is None


def test_percent_pair_keeps_the_order_visible():
    assert percent_pair(0.597, 0.6) == ("59.7%", "60.0%")
    assert percent_pair(0.2951, 0.295) == ("29.51%", "29.50%")
    assert percent_pair(0.72, 0.6) == ("72%", "60%")
    assert percent_pair(0.6, 0.6) == ("60%", "60%")
