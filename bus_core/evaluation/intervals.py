"""95% intervals of the headline figures: a stratified, seeded bootstrap (pure numpy).

A resample draws, within each true class, as many images as the class has, with replacement,
so every resample keeps the class counts: a sensitivity, a specificity or an AUC that exists on
the images exists on every resample. The interval is the 2.5th and 97.5th percentile of the
figure over `RESAMPLES` resamples drawn with `SEED`, so the same images and probabilities
always give the same interval.

A resample is a row of counts (how often each image was drawn), and every figure is a weighted
sum over the images: the confusion matrices of all resamples are one matrix product, an AUC is
the rank formula (ties count one half, as in `metrics`) with the counts as weights. Two models
scored on the same images can share the resamples: `paired_difference` gives the interval of
the difference of a figure between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bus_core.constants import CLASSES, MALIGNANT
from bus_core.metrics import (
    CI_SUFFIX,
    ECE_BINS,
    HEADLINE_KEYS,
    compute_metrics,
    threshold_metrics,
)

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
METHOD = "stratified bootstrap percentile"
"""How the intervals are made, as stored with them (the `ci95` key of a metrics dict)."""
THRESHOLD_KEYS: tuple[str, ...] = ("sensitivity", "specificity")
"""The figures of `metrics.threshold_metrics` that get an interval."""
SUBGROUP_KEYS: tuple[str, ...] = ("n", "n_per_class", "labels", "confusion_matrix",
                                   *HEADLINE_KEYS)
"""The figures (besides their intervals and the threshold's) of each source in `by_source`."""


def bootstrap_weights(y_true: Sequence[int] | np.ndarray, resamples: int = RESAMPLES,
                      seed: int = SEED) -> np.ndarray:
    """Stratified bootstrap resamples of the images labelled `y_true`: a (resamples, N) array
    of how often each image is drawn; within each class the counts sum to the class's size."""
    y = np.asarray(y_true, dtype=np.int64)
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(y)), dtype=np.int64)
    rows = np.arange(resamples)[:, None]
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        draws = rng.integers(0, len(members), size=(resamples, len(members)))
        weights[:, members] = np.bincount((rows * len(members) + draws).ravel(),
                                          minlength=resamples * len(members)
                                          ).reshape(resamples, len(members))
    return weights


def figure_samples(y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray,
                   classes: Sequence[str] = CLASSES) -> dict[str, np.ndarray]:
    """Each headline figure (`metrics.HEADLINE_KEYS`) on every resample of `weights` (rows of
    `bootstrap_weights`), as computed by `metrics.compute_metrics`; a figure that does not
    exist on these images is left out. With a row of ones, the figures of the images."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    k = len(classes)
    if not len(y):
        return {}
    pred = p.argmax(axis=1)
    cells = np.zeros((len(y), k * k))
    cells[np.arange(len(y)), y * k + pred] = 1
    cm = (w @ cells).reshape(len(w), k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    called = cm.sum(axis=1)
    total = cm.sum(axis=(1, 2))
    present = np.bincount(y, minlength=k) > 0
    out: dict[str, np.ndarray] = {"accuracy": tp.sum(axis=1) / total}
    recall = tp[:, present] / support[:, present]
    out["macro_f1"] = (2 * tp[:, present] / (support[:, present] + called[:, present])
                       ).mean(axis=1)
    out["balanced_accuracy"] = recall.mean(axis=1)
    aucs = {c: _auc(y == c, p[:, c], w) for c in range(k) if 0 < (y == c).sum() < len(y)}
    if MALIGNANT in classes:
        m = list(classes).index(MALIGNANT)
        if present[m]:
            out["malignant_sensitivity"] = tp[:, m] / support[:, m]
        if (y != m).any():
            negatives = total - support[:, m]
            out["malignant_specificity"] = (negatives - (called[:, m] - tp[:, m])) / negatives
        if m in aucs:
            out["auc_malignant"] = aucs[m]
    if aucs:
        out["auc_macro_ovr"] = np.mean(list(aucs.values()), axis=0)
    out["ece"] = _ece(y, p, w)
    return {key: out[key] for key in HEADLINE_KEYS if key in out}


def threshold_samples(y_true: np.ndarray, probs: np.ndarray, threshold: float,
                      weights: np.ndarray, classes: Sequence[str] = CLASSES
                      ) -> dict[str, np.ndarray]:
    """Sensitivity and specificity of the rule "P(malignant) >= threshold" on every resample
    of `weights`; a figure without images to count on is left out."""
    y = np.asarray(y_true, dtype=np.int64)
    m = list(classes).index(MALIGNANT)
    flagged = np.asarray(probs, dtype=np.float64)[:, m] >= threshold
    positive = y == m
    w = np.asarray(weights, dtype=np.float64)
    out = {}
    if positive.any():
        out["sensitivity"] = w @ (flagged & positive) / (w @ positive)
    if (~positive).any():
        out["specificity"] = w @ (~flagged & ~positive) / (w @ ~positive)
    return out


def interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """The central `level` percentile interval [low, high] of a figure's resampled values."""
    tail = (1 - level) / 2
    low, high = np.quantile(np.asarray(samples, dtype=np.float64), [tail, 1 - tail])
    return [float(low), float(high)]


def score(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
          classes: Sequence[str] = CLASSES, *, threshold: float | None = None,
          sources: Sequence[str] | None = None, resamples: int = RESAMPLES,
          seed: int = SEED) -> dict[str, Any]:
    """`metrics.compute_metrics` with a 95% interval beside each headline figure (key +
    `CI_SUFFIX`, None where the figure does not exist) and `ci95` (how they were made); with
    `threshold`, `at_threshold` (`metrics.threshold_metrics` with the intervals of its
    sensitivity and specificity); with `sources` (one per image) naming two or more,
    `by_source`: {source: the `SUBGROUP_KEYS`, their intervals and `at_threshold`}."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    result = compute_metrics(y, p, classes)
    weights = bootstrap_weights(y, resamples, seed)
    samples = figure_samples(y, p, weights, classes)
    result |= {key + CI_SUFFIX: interval(samples[key]) if key in samples else None
               for key in HEADLINE_KEYS}
    result["ci95"] = {"method": METHOD, "level": LEVEL, "resamples": resamples, "seed": seed}
    if threshold is not None and len(y):
        at = threshold_metrics(y, p, threshold, classes)
        spread = threshold_samples(y, p, threshold, weights, classes)
        result["at_threshold"] = at | {key + CI_SUFFIX: interval(spread[key])
                                       if key in spread else None for key in THRESHOLD_KEYS}
    names = list(dict.fromkeys(sources or ()))
    if len(names) > 1:
        where = np.asarray(sources)
        result["by_source"] = {}
        for name in names:
            part = score(y[where == name], p[where == name], classes, threshold=threshold,
                         resamples=resamples, seed=seed)
            kept = (*SUBGROUP_KEYS, *(key + CI_SUFFIX for key in HEADLINE_KEYS), "at_threshold")
            result["by_source"][name] = {key: part[key] for key in kept if key in part}
    return result


def paired_difference(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                      reference_probs: np.ndarray, keys: Sequence[str],
                      classes: Sequence[str] = CLASSES, *, resamples: int = RESAMPLES,
                      seed: int = SEED) -> dict[str, list[float] | None]:
    """The 95% interval of `figure(probs) - figure(reference_probs)` for each headline figure
    in `keys`, both models scored on the same resampled images (a paired bootstrap); None
    where it is not a headline figure or does not exist on these images."""
    y = np.asarray(y_true, dtype=np.int64)
    weights = bootstrap_weights(y, resamples, seed)
    new = figure_samples(y, probs, weights, classes)
    old = figure_samples(y, reference_probs, weights, classes)
    return {key: interval(new[key] - old[key]) if key in new and key in old else None
            for key in keys}


def _auc(positive: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC on every resample: the weighted share of (positive, negative) pairs the
    scores order correctly, ties counting one half."""
    order = np.argsort(scores[~positive], kind="stable")
    negative_scores = scores[~positive][order]
    below = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w[:, ~positive][:, order], axis=1)],
                           axis=1)
    lo = np.searchsorted(negative_scores, scores[positive], side="left")
    hi = np.searchsorted(negative_scores, scores[positive], side="right")
    beaten = below[:, lo] + 0.5 * (below[:, hi] - below[:, lo])
    pairs = (w @ positive) * (w @ ~positive)
    return (w[:, positive] * beaten).sum(axis=1) / pairs


def _ece(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Top-label ECE (as `metrics.expected_calibration_error`) on every resample."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    index = np.clip(np.floor(confidence * ECE_BINS).astype(np.int64), 0, ECE_BINS - 1)
    bins = np.zeros((len(y), ECE_BINS))
    bins[np.arange(len(y)), index] = 1
    gaps = np.abs(w @ (bins * correct[:, None]) - w @ (bins * confidence[:, None]))
    return gaps.sum(axis=1) / w.sum(axis=1)
