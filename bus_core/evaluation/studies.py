"""Study-level figures: a model's per-image results grouped into studies (`study.by_study`) and
scored by each study rule, with 95% intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bus_core.constants import CLASSES
from bus_core.evaluation.intervals import score
from bus_core.inference.study import MOST_SUSPICIOUS, RULES, by_study


def score_studies(keys: Sequence[str], y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                  rules: Sequence[str] = tuple(RULES), classes: Sequence[str] = CLASSES, *,
                  threshold: float | None = None) -> dict[str, dict[str, Any]]:
    """The study-level figures (`intervals.score`) of each rule in `rules`, plus `n_images`
    and `n_studies`, from per-image results (`keys`, `y_true`, `probs`, one entry per image).
    With `threshold`, `at_threshold` scores the study flag, raised when any image reaches it
    (the same for every rule)."""
    flagged = by_study(keys, y_true, probs, MOST_SUSPICIOUS, classes)
    at = (score(flagged.y_true, flagged.probs, classes, threshold=threshold)["at_threshold"]
          if threshold is not None and len(flagged.keys) else None)
    scored: dict[str, dict[str, Any]] = {}
    for rule in rules:
        studies = by_study(keys, y_true, probs, rule, classes)
        scored[rule] = score(studies.y_true, studies.probs, classes) | {
            "rule": RULES[rule], "n_images": int(studies.sizes.sum()),
            "n_studies": len(studies.keys)} | ({"at_threshold": at} if at else {})
    return scored
