"""Progress of a training run as JSON lines, written by the trainer and tailed by the app.

Every line is one event: {"event": "start" | "step" | "epoch" | "done" | "cancelled" | "error",
"time": unix seconds, ...fields}. A reader tolerates a half-written last line.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ProgressLog:
    """Appends events to a JSON-lines file (created with its folder)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it."""
        record = {"event": event, "time": round(time.time(), 3), **_clean(fields)}
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


def run_state(events: list[dict[str, Any]]) -> str:
    """'not started', 'running', 'done', 'cancelled' or 'failed' from a run's events.

    A run whose last event is a step or epoch may also have been killed; the caller knows
    whether its process is alive.
    """
    if not events:
        return "not started"
    last = events[-1]["event"]
    return {"done": "done", "cancelled": "cancelled", "error": "failed"}.get(last, "running")
