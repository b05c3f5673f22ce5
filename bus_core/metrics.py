"""Classification metrics, calibration and temperature scaling on numpy arrays.

Conventions shared by every function here:

- `y_true` holds class indices (0..K-1) into `classes`; `probs` / `logits` are (N, K) arrays.
- Predictions are the argmax over all K classes, so a model can predict a class that is absent
  from `y_true` (e.g. "normal" on a benign/malignant-only set); that counts as an error.
- A metric that does not exist for the data (a sensitivity without positives, an AUC without
  positives or negatives, anything on an empty set) is None, never NaN, so every result
  serialises with `json.dumps(..., allow_nan=False)`. All numbers are Python floats / ints.
- Macro-F1 and balanced accuracy average over the classes present in `y_true` only: a class with
  no true samples has no recall, and counting its F1 as 0 would punish a subset evaluation (e.g.
  benign/malignant only) for a class it never contained. Wrong predictions *into* such a class
  still lower the recall of the true classes, so they are not ignored.
- The macro one-vs-rest AUC averages the per-class AUCs that exist.

ROC / AUC are computed here with numpy (ties count one half, as in scikit-learn) rather than
scikit-learn, which would add about two seconds to importing `bus_core.inference.predict`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from bus_core.constants import CLASSES, MALIGNANT, NORMAL

METRIC_LABELS: dict[str, str] = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro-F1",
    "malignant_sensitivity": "Malignant sensitivity",
    "malignant_specificity": "Malignant specificity",
    "auc_malignant": "AUC, malignant vs rest",
    "auc_macro_ovr": "AUC, macro one-vs-rest",
    "ece": "ECE (calibration error, lower is better)",
}
"""The headline figures of `compute_metrics`, in display order, with their display names."""
HEADLINE_KEYS: tuple[str, ...] = tuple(METRIC_LABELS)
CI_SUFFIX = "_ci95"
"""A figure's 95% interval [low, high] is stored beside it under its key plus this suffix:
`auc_malignant_ci95` (see `intervals.score`)."""
LOWER_IS_BETTER: frozenset[str] = frozenset({"ece", "loss"})
"""Metrics (and the validation 'loss') where a smaller value is the better one."""

ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error."""
MIN_CALIBRATION_SAMPLES = 5
"""Below this many validation samples `fit_temperature` keeps T = 1."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities over the last axis of `logits / temperature` (float64, rows sum to 1)."""
    if not temperature > 0:
        raise ValueError(f"The temperature must be positive, got {temperature}.")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, y_true: Sequence[int] | np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `y_true` under `softmax(logits / temperature)`."""
    z, y = _check_scores(logits, y_true, name="logits")
    if not len(y):
        raise ValueError("The negative log-likelihood needs at least one sample.")
    if not temperature > 0:
        raise ValueError(f"The temperature must be positive, got {temperature}.")
    return _nll(z, y, temperature)


def fit_temperature(logits: np.ndarray, y_true: Sequence[int] | np.ndarray, *,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T in `bounds` minimising the NLL of `softmax(logits / T)` on `y_true`.

    Returns 1.0 (no scaling) when there are fewer than `MIN_CALIBRATION_SAMPLES` samples or
    fewer than two classes in `y_true`: such a fit would only chase noise. Deterministic: a
    log-spaced grid search followed by a bounded Brent refinement around the best grid point.
    """
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"Temperature bounds must satisfy 0 < low < high, got {bounds}.")
    z, y = _check_scores(logits, y_true, name="logits")
    if len(y) < MIN_CALIBRATION_SAMPLES or np.unique(y).size < 2:
        return 1.0
    # Imported here so that importing this module (done by predict.py) stays light.

    def loss(log_t: float) -> float:
        return _nll(z, y, math.exp(log_t))

    grid = np.linspace(math.log(lo), math.log(hi), 41)
    losses = [loss(g) for g in grid]
    i = int(np.argmin(losses))
    window = (grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)])
    refined = minimize_scalar(loss, bounds=window, method="bounded", options={"xatol": 1e-5})
    best = float(refined.x) if refined.fun <= losses[i] else float(grid[i])
    return math.exp(best)


def expected_calibration_error(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                               n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: the count-weighted mean |accuracy - confidence| over equal-width bins.

    Confidence is the largest probability of a row; bins are [i/n, (i+1)/n), the last one
    closed at 1. An empty input has ECE 0.
    """
    p, y = _check_scores(probs, y_true, name="probabilities")
    counts, accuracy, confidence = _bin_top_label(p, y, n_bins)
    if not len(y):
        return 0.0
    filled = counts > 0
    gaps = np.abs(accuracy[filled] - confidence[filled])
    return float(np.sum(counts[filled] * gaps) / len(y))


def reliability_curve(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                      n_bins: int = 10) -> dict[str, list]:
    """Per-bin data for a reliability diagram: `bin_centers`, `accuracy`, `confidence`, `counts`.

    Bins are as in `expected_calibration_error`; `accuracy` and `confidence` are None for an
    empty bin.
    """
    p, y = _check_scores(probs, y_true, name="probabilities")
    counts, accuracy, confidence = _bin_top_label(p, y, n_bins)
    filled = counts > 0
    return {
        "bin_centers": [(i + 0.5) / n_bins for i in range(n_bins)],
        "accuracy": [float(a) if f else None for a, f in zip(accuracy, filled)],
        "confidence": [float(c) if f else None for c, f in zip(confidence, filled)],
        "counts": [int(c) for c in counts],
    }


def roc_curves(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
               classes: Sequence[str] = CLASSES) -> dict[str, dict[str, Any]]:
    """One-vs-rest ROC per class: {class: {"fpr": [...], "tpr": [...], "auc": float}}.

    Classes without positives or without negatives in `y_true` are left out.
    """
    p, y = _check_scores(probs, y_true, name="probabilities", n_classes=len(classes))
    curves = {}
    for c, name in enumerate(classes):
        positive = y == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr = _roc(positive, p[:, c])
        curves[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                        "auc": float(np.trapezoid(tpr, fpr))}
    return curves


def compute_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                    classes: Sequence[str] = CLASSES, *,
                    malignant: str = MALIGNANT) -> dict[str, Any]:
    """Accuracy, macro-F1, balanced accuracy, malignant sensitivity/specificity, AUCs, ECE,
    per-class figures and the confusion matrix, as a JSON-ready dict (None where undefined).

    Keys: n, labels, n_per_class, accuracy, macro_f1, balanced_accuracy,
    malignant_sensitivity, malignant_specificity, auc_macro_ovr, auc_malignant, ece,
    per_class ({class: {sensitivity, specificity, precision, f1, auc, support}}) and
    confusion_matrix (rows = true class, columns = predicted class, in `labels` order).
    """
    labels = list(classes)
    p, y = _check_scores(probs, y_true, name="probabilities", n_classes=len(labels))
    n = len(y)
    cm = _confusion_matrix(y, p.argmax(axis=1), len(labels))
    per_class = {name: _class_figures(cm, c, y, p[:, c]) for c, name in enumerate(labels)}
    present = [per_class[name] for name in labels if per_class[name]["support"]]
    aucs = [f["auc"] for f in per_class.values() if f["auc"] is not None]
    target = per_class.get(malignant, {})
    return {
        "n": n,
        "labels": labels,
        "n_per_class": {name: per_class[name]["support"] for name in labels},
        "accuracy": _ratio(np.trace(cm), n),
        "macro_f1": _mean([f["f1"] for f in present]),
        "balanced_accuracy": _mean([f["sensitivity"] for f in present]),
        "malignant_sensitivity": target.get("sensitivity"),
        "malignant_specificity": target.get("specificity"),
        "auc_macro_ovr": _mean(aucs),
        "auc_malignant": target.get("auc"),
        "ece": expected_calibration_error(y, p) if n else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def normal_from_whole(lesion_probs: np.ndarray, whole_probs: np.ndarray,
                      classes: Sequence[str] = CLASSES, *, normal_odds: float = 1.0
                      ) -> np.ndarray:
    """The two-stage reading's probabilities (N x K) of images with a lesion outline: P(normal)
    from the whole-image model (`whole_probs`), its odds multiplied by `normal_odds` (the
    outline found is evidence of a lesion; see `fit_normal_odds`), the rest split between the
    other classes in the lesion model's proportions (`lesion_probs`); both N x K over the same
    `classes`. Without a 'normal' class, the lesion model's probabilities unchanged. Rows sum
    to 1."""
    lesion = np.asarray(lesion_probs, dtype=np.float64)
    whole = np.asarray(whole_probs, dtype=np.float64)
    if lesion.shape != whole.shape or lesion.ndim != 2 or lesion.shape[1] != len(classes):
        raise ValueError(f"Both readings must be N x {len(classes)} arrays; got {lesion.shape} "
                         f"and {whole.shape}.")
    if NORMAL not in classes:
        return lesion
    k = list(classes).index(NORMAL)
    normal = whole[:, k:k + 1]
    normal = normal_odds * normal / np.clip(normal_odds * normal + 1 - normal, 1e-12, None)
    rest = np.delete(lesion, k, axis=1)
    rest = rest / np.clip(rest.sum(1, keepdims=True), 1e-12, None)
    return np.insert(rest * (1 - normal), k, normal[:, 0], axis=1)


LESION_TARGET = 0.95
"""The share of validation lesion images a two-stage reading must not call normal."""
NORMAL_ODDS_GRID = np.geomspace(1.0, 1e-3, 61)
"""The factors on P(normal)'s odds that `fit_normal_odds` tries, largest first."""


def fit_normal_odds(y_true: Sequence[int] | np.ndarray, lesion_probs: np.ndarray,
                    whole_probs: np.ndarray, outlined: Sequence[bool],
                    classes: Sequence[str] = CLASSES, *, target: float = LESION_TARGET) -> float:
    """The largest factor on the odds of P(normal) of outlined images (`normal_from_whole`)
    with which at least `target` of the lesion images (true class not normal) are not called
    normal (argmax) in the two-stage reading; the smallest tried when none reaches it; 1.0
    without lesion images or a 'normal' class."""
    y = np.asarray(y_true)
    if NORMAL not in classes:
        return 1.0
    k = list(classes).index(NORMAL)
    lesion = y != k
    if not lesion.any():
        return 1.0
    pick = np.asarray(outlined, dtype=bool)[:, None]
    whole = np.asarray(whole_probs, dtype=np.float64)
    for odds in NORMAL_ODDS_GRID:
        probs = np.where(pick, normal_from_whole(lesion_probs, whole, classes,
                                                 normal_odds=float(odds)), whole)
        if (probs[lesion].argmax(1) != k).mean() >= target:
            return float(odds)
    return float(NORMAL_ODDS_GRID[-1])


def outlined_but_normal(outlined: Sequence[bool] | np.ndarray, probs: np.ndarray,
                        classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Per image (N bools): a lesion outline was found, yet the reading is 'normal' (the
    contradiction that makes a reading uncertain and is counted in evaluations)."""
    found = np.asarray(outlined, dtype=bool)
    if NORMAL not in classes or not len(found):
        return np.zeros(len(found), dtype=bool)
    return found & (np.asarray(probs).argmax(1) == list(classes).index(NORMAL))


OUTLINE_CONTRADICTION = ("A lesion outline was found, but the model reads the image as normal: "
                         "check the outline and the image.")
"""What a reading with `outlined_but_normal` says (it is also flagged as uncertain)."""

TARGET_SENSITIVITY = 0.90
"""The malignant sensitivity a sensitivity-first threshold must reach on validation."""


def fit_malignant_threshold(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                            classes: Sequence[str] = CLASSES, *,
                            target_sensitivity: float = TARGET_SENSITIVITY) -> float | None:
    """The highest threshold t such that "P(malignant) >= t" finds at least
    `target_sensitivity` of the malignant samples; None without malignant samples."""
    p, y = _check_scores(probs, y_true, name="probabilities", n_classes=len(classes))
    scores = np.sort(p[y == list(classes).index(MALIGNANT), list(classes).index(MALIGNANT)])[::-1]
    if not len(scores):
        return None
    k = max(1, math.ceil(target_sensitivity * len(scores) - 1e-9))
    return float(scores[k - 1])


def threshold_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, threshold: float,
                      classes: Sequence[str] = CLASSES) -> dict[str, Any]:
    """Malignant-vs-rest figures of the rule "P(malignant) >= threshold": sensitivity,
    specificity, and how many images it flags."""
    p, y = _check_scores(probs, y_true, name="probabilities", n_classes=len(classes))
    mal = list(classes).index(MALIGNANT)
    flagged = p[:, mal] >= threshold
    positive = y == mal
    return {"threshold": float(threshold),
            "sensitivity": _ratio(float((flagged & positive).sum()), float(positive.sum())),
            "specificity": _ratio(float((~flagged & ~positive).sum()), float((~positive).sum())),
            "flagged": int(flagged.sum()), "n": int(len(y))}


def format_metrics(m: dict[str, Any]) -> str:
    """A short plain-text summary of a `compute_metrics` dict for the terminal: the figures
    with their 95% intervals where it has them, the confusion matrix, then each source's
    figures (`by_source`)."""
    labels = list(m.get("labels") or CLASSES)
    lines = [_counts_line(m, labels), *_figure_lines(m)]
    method = m.get("ci95")
    if method:
        lines.append(f"  [low, high]: {method['level']:.0%} intervals, {method['method']} "
                     f"({method['resamples']} resamples, seed {method['seed']})")
    cm = m.get("confusion_matrix")
    if cm:
        width = max(9, *(len(c) for c in labels)) + 2
        lines.append("  confusion matrix (rows = true, columns = predicted):")
        lines.append("  " + " " * width + "".join(c.rjust(width) for c in labels))
        for name, row in zip(labels, cm):
            lines.append("  " + name.ljust(width) + "".join(str(v).rjust(width) for v in row))
    for source, part in (m.get("by_source") or {}).items():
        lines.append(f"source {source}: {_counts_line(part, labels)}")
        lines += _figure_lines(part)
    return "\n".join(lines)


def _counts_line(m: dict[str, Any], labels: list[str]) -> str:
    counts = m.get("n_per_class") or {}
    return (f"n = {m.get('n', 'n/a')}  ("
            + ", ".join(f"{c} {counts.get(c, 0)}" for c in labels) + ")")


def _figure_lines(m: dict[str, Any]) -> list[str]:
    """The headline figures of a metrics dict, each with its interval when it has one."""
    def shown(figures: dict[str, Any], key: str) -> str:
        interval = figures.get(key + CI_SUFFIX)
        text = _terminal(figures.get(key))
        return f"{text} {fmt_interval(interval)}" if interval else text

    lines = [
        f"  accuracy            {shown(m, 'accuracy')}",
        f"  balanced accuracy   {shown(m, 'balanced_accuracy')}",
        f"  macro-F1            {shown(m, 'macro_f1')}",
        f"  malignant           sensitivity {shown(m, 'malignant_sensitivity')}"
        f"   specificity {shown(m, 'malignant_specificity')}",
        f"  AUC                 malignant {shown(m, 'auc_malignant')}"
        f"   macro one-vs-rest {shown(m, 'auc_macro_ovr')}",
        f"  ECE                 {shown(m, 'ece')}",
    ]
    at = m.get("at_threshold")
    if at:
        lines.append(f"  at the malignant threshold {at['threshold']:.3f}: sensitivity "
                     f"{shown(at, 'sensitivity')}   specificity {shown(at, 'specificity')}")
    return lines


def format_segmentation(m: dict[str, Any]) -> str:
    """A short plain-text summary of an `evaluate.evaluate_segmentation` result."""
    return "\n".join([
        f"n = {m.get('n')}  (lesion images {m.get('n_lesion')}, "
        f"without lesion {m.get('n_normal')})",
        f"  Dice (lesion images, mean)         {_terminal(m.get('dice'))}",
        f"  IoU (lesion images, mean)          {_terminal(m.get('iou'))}",
        f"  lesion images predicted empty      {_terminal(m.get('lesion_empty_share'))}",
        f"  lesion-free images predicted empty {_terminal(m.get('normal_empty_share'))}",
    ])


def _check_scores(scores: np.ndarray, y_true: Sequence[int] | np.ndarray, *, name: str,
                  n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`scores` as a finite float64 (N, K) array and `y_true` as int labels in 0..K-1."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y_true)
    if s.ndim != 2:
        raise ValueError(f"The {name} must be a 2-D array (samples x classes), "
                         f"got shape {s.shape}.")
    if n_classes is not None and s.shape[1] != n_classes:
        raise ValueError(f"The {name} have {s.shape[1]} columns but there are {n_classes} classes.")
    if y.ndim != 1 or len(y) != len(s):
        raise ValueError(f"Expected {len(s)} labels in a 1-D array, got shape {y.shape}.")
    if len(y) and not (np.issubdtype(y.dtype, np.number) and np.all(y == np.round(y))):
        raise ValueError("Labels must be whole class indices.")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"Labels must lie between 0 and {s.shape[1] - 1}.")
    if not np.isfinite(s).all():
        raise ValueError(f"The {name} contain NaN or infinite values.")
    return s, y


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean NLL for validated inputs (log-sum-exp, stable for large logits)."""
    z = logits / temperature
    top = z.max(axis=1)
    log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def _bin_top_label(probs: np.ndarray, y: np.ndarray, n_bins: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: sample count, accuracy and mean confidence (0 if empty)."""
    if n_bins < 1:
        raise ValueError(f"The number of bins must be at least 1, got {n_bins}.")
    confidence = probs.max(axis=1, initial=0.0)
    correct = probs.argmax(axis=1) == y
    index = np.clip(np.floor(confidence * n_bins).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    safe = np.maximum(counts, 1)
    accuracy = np.bincount(index, weights=correct, minlength=n_bins) / safe
    mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / safe
    return counts, accuracy, mean_conf


def _roc(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-score, kind="mergesort")
    ranked, hits = score[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tps = np.cumsum(hits)[last_of_tie]
    fps = last_of_tie + 1 - tps
    return np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]


def _confusion_matrix(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted class."""
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def _class_figures(cm: np.ndarray, c: int, y: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    """Sensitivity, specificity, precision, F1, one-vs-rest AUC and support of class `c`."""
    tp = int(cm[c, c])
    fn = int(cm[c].sum()) - tp
    fp = int(cm[:, c].sum()) - tp
    tn = int(cm.sum()) - tp - fn - fp
    positive = y == c
    auc = None
    if positive.any() and not positive.all():
        fpr, tpr = _roc(positive, score)
        auc = float(np.trapezoid(tpr, fpr))
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": auc,
        "support": tp + fn,
    }


def _ratio(num: float, den: float) -> float | None:
    """num / den as a float, or None when den is 0."""
    return float(num) / float(den) if den else None


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values that exist, or None when none does."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _terminal(value: Any) -> str:
    return fmt3(value, "n/a")


def fmt3(value: Any, missing: str = "–") -> str:
    """A metric for display: three decimals, or `missing` when it does not exist."""
    return missing if value is None else f"{float(value):.3f}"


def fmt_interval(value: Sequence[float] | None, missing: str = "") -> str:
    """An interval for display: '[0.812, 0.884]', or `missing` when there is none."""
    return missing if value is None else f"[{value[0]:.3f}, {value[1]:.3f}]"


def percent_pair(value: float, reference: float) -> tuple[str, str]:
    """`value` and `reference` as percentages with the fewest decimals (0 to 2) at which their
    order still shows: (0.597, 0.6) -> ('59.7%', '60.0%'), never '60%' below '60%'."""
    for decimals in range(3):
        a, b = round(value * 100, decimals), round(reference * 100, decimals)
        if (a < b) == (value < reference) and (a > b) == (value > reference):
            break
    return f"{value:.{decimals}%}", f"{reference:.{decimals}%}"
