"""Training runs on disk: the layout of a run folder (`RunFiles`), and its progress as JSON
lines, written by the trainer and tailed by the app, and what those events say (how far the run
is, the time left, the curves of steps and epochs).

Every line of the progress file is one event: {"event": "start" | "step" | "epoch" |
"done" | "cancelled" | "error", "time": unix seconds, ...fields}. A reader tolerates a
half-written last line.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

RunState = Literal["not started", "running", "done", "cancelled", "failed"]
"""The state of a run read from its progress events."""


@dataclass(frozen=True)
class RunFiles:
    """Where a training run whose model goes to `out` keeps its files: everything but the
    model itself lives in `out/train/`."""

    out: Path

    @property
    def dir(self) -> Path:
        """`out/train`: settings, progress, checkpoints and the split of the run."""
        return Path(self.out) / "train"

    @property
    def config(self) -> Path:
        """The run's settings (JSON)."""
        return self.dir / "config.json"

    @property
    def progress(self) -> Path:
        """The progress events (JSON lines)."""
        return self.dir / "progress.jsonl"

    @property
    def checkpoint(self) -> Path:
        """Everything needed to resume (torch, weights-only safe)."""
        return self.dir / "checkpoint.pt"

    @property
    def best(self) -> Path:
        """The best weights so far (safetensors)."""
        return self.dir / "best.safetensors"

    @property
    def split(self) -> Path:
        """The split the run used (a copy, or the one it made)."""
        return self.dir / "split.json"

    @property
    def cancel(self) -> Path:
        """Created to stop the run cleanly after its current step."""
        return self.dir / "CANCEL"

    @property
    def log(self) -> Path:
        """The output of a run started in the background."""
        return self.dir / "stdout.log"


EVAL_SPEEDUP = 3.0
"""Until an evaluation pass is timed, it is taken to run this many times faster per image than
training (no backward pass)."""


@dataclass
class EtaClock:
    """The time left of a run: training images left at the rate measured over all training
    steps of this process (steady, unlike a per-epoch rate), plus the evaluation passes left
    (each validation, and the final validation + test) at their measured length. Never zero
    before the run is done."""

    n_val: int
    n_final: int
    images: int = 0
    seconds: float = 0.0
    eval_s_per_image: float | None = None

    def trained(self, images: int, seconds: float) -> None:
        """Count one training step."""
        self.images += images
        self.seconds += seconds

    def evaluated(self, images: int, seconds: float) -> None:
        """Time one evaluation pass."""
        if images:
            self.eval_s_per_image = seconds / images

    def eta(self, train_images_left: int, validations_left: int) -> float | None:
        """Seconds left; None before the first step."""
        if not self.images or self.seconds <= 0:
            return None
        per_image = self.seconds / self.images
        per_eval_image = self.eval_s_per_image or per_image / EVAL_SPEEDUP
        return (train_images_left * per_image
                + (validations_left * self.n_val + self.n_final) * per_eval_image)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ProgressLog:
    """Appends events to a JSON-lines file (created with its folder); one not `enabled` (the
    other ranks of a distributed run) writes nothing."""

    def __init__(self, path: str | Path, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (when enabled) and return it."""
        record = {"event": event, "time": round(time.time(), 3), **_clean(fields)}
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, allow_nan=False) + "\n")
        return record


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of an append-only log ([] if it does not exist yet); a line
    being written right now, or cut off by a crash, is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    events = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def read_progress(path: str | Path) -> list[dict[str, Any]]:
    """All complete events of a progress file ([] if it does not exist yet)."""
    return read_json_lines(path)


def run_state(events: list[dict[str, Any]]) -> RunState:
    """'not started', 'running', 'done', 'cancelled' or 'failed' from a run's events.

    A run whose last event is a step or epoch may also have been killed; the caller knows
    whether its process is alive.
    """
    if not events:
        return "not started"
    last = events[-1]["event"]
    ended: dict[str, RunState] = {"done": "done", "cancelled": "cancelled", "error": "failed"}
    return ended.get(last, "running")


def next_epoch_fits(limit_minutes: float, train_time_s: float, epochs_done: int) -> bool:
    """Whether one more epoch, as long as the mean epoch so far, ends within a training-time
    limit (`limit_minutes` > 0; none when 0)."""
    if limit_minutes <= 0 or epochs_done == 0:
        return True
    return train_time_s * (epochs_done + 1) / epochs_done <= limit_minutes * 60


# --- reading the progress events ------------------------------------------------------------

def fmt_duration(seconds: float | None) -> str:
    """'1 h 05 min', '3 min 20 s', '12 s' or '–'."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def last_event(events: Sequence[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """The latest event of `kind`, or None."""
    return next((e for e in reversed(events) if e["event"] == kind), None)


def progress_fraction(events: Sequence[dict[str, Any]]) -> float:
    """How much of the run is done, 0..1 (1 once it is done)."""
    if last_event(events, "done"):
        return 1.0
    step = last_event(events, "step")
    if step is None:
        return 0.0
    done = (step["epoch"] - 1) * step["steps"] + step["step"]
    return min(1.0, done / max(1, step["epochs"] * step["steps"]))


def progress_text(events: Sequence[dict[str, Any]], running: bool = True) -> str:
    """One line under the progress bar: epoch, step, speed and, while the run goes on
    (`running`: not finished and no cancel asked for), the time left."""
    if last_event(events, "done"):
        return "Finished"
    step = last_event(events, "step")
    if step is None:
        start = last_event(events, "start")
        return "Preparing the data and the model…" if start is None else "Starting the first step…"
    text = (f"Epoch {step['epoch']}/{step['epochs']} · step {step['step']}/{step['steps']} · "
            f"{step.get('images_per_s') or 0:.1f} images/s")
    if not running:
        return text
    if step["epoch"] == step["epochs"] and step["step"] == step["steps"]:
        return text + " · final validation and test…"
    return text + f" · about {fmt_duration(step.get('eta_s'))} left"


def step_series(events: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per training step (x = steps since the start, a resumed step replacing its first try):
    loss, the epoch's mean loss and running accuracy."""
    by_x: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["event"] == "step":
            by_x[(e["epoch"] - 1) * e["steps"] + e["step"]] = e
    xs = sorted(by_x)
    return {"x": xs, "loss": [by_x[x]["loss"] for x in xs],
            "mean_loss": [by_x[x]["mean_loss"] for x in xs],
            "accuracy": [by_x[x]["accuracy"] for x in xs]}


def epoch_rows(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished epoch: train loss / accuracy and the validation figures."""
    rows: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["event"] == "epoch":
            val = e.get("val") or {}
            rows[e["epoch"]] = {"epoch": e["epoch"], "train_loss": e.get("train_loss"),
                                "train_accuracy": e.get("train_accuracy"),
                                **{f"val_{k}": v for k, v in val.items()},
                                "best": e.get("improved", False)}
    return [rows[k] for k in sorted(rows)]
