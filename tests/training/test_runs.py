"""Run progress: the ETA clock (deterministic: durations are given, not measured)."""

from __future__ import annotations

import pytest

from bus_core.training.runs import EVAL_SPEEDUP, EtaClock


def test_eta_uses_the_whole_run_rate_and_counts_evaluations_left() -> None:
    clock = EtaClock(n_val=30, n_final=60)
    assert clock.eta(100, 2) is None  # before the first step
    clock.trained(10, 5.0)  # a slow first step (start-up)
    clock.trained(10, 1.0)
    per_image = 6.0 / 20
    assert clock.eta(40, 2) == pytest.approx(40 * per_image + (2 * 30 + 60) * per_image
                                             / EVAL_SPEEDUP)
    clock.evaluated(30, 3.0)  # measured: 0.1 s per image
    assert clock.eta(40, 1) == pytest.approx(40 * per_image + (30 + 60) * 0.1)


def test_eta_is_not_zero_before_the_final_evaluation() -> None:
    clock = EtaClock(n_val=30, n_final=60)
    clock.trained(16, 8.0)
    clock.evaluated(30, 6.0)
    assert clock.eta(0, 1) == pytest.approx((30 + 60) * 0.2)  # last step of the last epoch
