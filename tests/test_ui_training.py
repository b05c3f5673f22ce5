"""The progress line of a training run."""

from __future__ import annotations

from bus_core.training.runs import progress_text

STEP = {"event": "step", "epoch": 2, "epochs": 5, "step": 3, "steps": 10, "images_per_s": 4.0,
        "eta_s": 600}


def test_the_time_left_is_shown_only_while_the_run_goes_on():
    assert "about 10 min 00 s left" in progress_text([STEP])
    stopped = progress_text([STEP, {"event": "cancelled", "epoch": 2, "step": 3}], running=False)
    assert "left" not in stopped and "Epoch 2/5" in stopped
