"""Hyper-parameter grid search: one training run per combination, ranked on validation.

The default grid is that of the published intersection-masking method: lr {1e-3, 5e-4, 1e-4} x
batch size {16, 32, 64} x optimiser {Adam, SGD}. Runs are ranked by the monitored validation
metric only; their test figures are recorded but never used for choosing.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bus_core import atomic
from bus_core.training.train import TrainConfig, clear_cancel, score, train

RESULTS_FILE = "results.json"
"""The grid's results table (best first), rewritten after every finished run."""

DEFAULT_GRID: dict[str, list[Any]] = {"lr": [1e-3, 5e-4, 1e-4], "batch_size": [16, 32, 64],
                                      "optimizer": ["adam", "sgd"]}
_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def grid_values(name: str, text: str) -> list[Any]:
    """The values of the training option `name` in a grid from their text (separated by commas
    or semicolons), typed as TrainConfig's field. Raises ValueError on an unknown option or a
    value of the wrong type."""
    name = name.strip().replace("-", "_")
    if name not in _TYPES:
        raise ValueError(f"Unknown training option {name!r} in the grid.")
    kind = str(_TYPES[name])
    caster = float if "float" in kind else int if "int" in kind else str
    return [caster(v.strip()) for v in text.replace(";", ",").split(",") if v.strip()]


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """A grid from 'name=v1,v2' strings (`grid_values`)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        if name.strip().replace("-", "_") not in _TYPES or not values:
            raise ValueError(f"Bad grid entry {spec!r}: use NAME=V1,V2 with a training option "
                             f"name such as lr, batch_size, optimizer, weight_decay.")
        grid[name.strip().replace("-", "_")] = grid_values(name, values)
    return grid


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


def run_name(combo: dict[str, Any]) -> str:
    """A folder name for one combination, e.g. 'lr=0.001_batch_size=16_optimizer=adam'."""
    return "_".join(f"{k}={v}" for k, v in combo.items())


def tune(base: TrainConfig, grid: dict[str, list[Any]] | None = None, *,
         on_result: Callable[[dict[str, Any]], None] | None = None,
         should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Train every combination under `base.out/<run name>` and return the results table rows,
    best validation score first. Finished runs are reused, so a killed search resumes."""
    scored: list[tuple[float | None, dict[str, Any]]] = []
    for combo in combinations(grid or DEFAULT_GRID):
        out = Path(base.out) / run_name(combo)
        config = dataclasses.replace(base, out=str(out), name=run_name(combo), **combo)
        card_path = out / "card.json"
        if card_path.is_file():
            card = json.loads(card_path.read_text())
            metrics, time_s = card.get("metrics", {}), card.get("training_time_s")
        else:
            clear_cancel(config.files)  # a stale request from an earlier search
            result = train(config, resume=config.files.checkpoint.is_file(),
                           should_stop=should_stop)
            if result.status != "done" or result.card is None:
                break
            metrics, time_s = result.card.metrics, result.card.training_time_s
        val, test = metrics.get("val", {}), metrics.get("test", {})
        row = {**combo, "val_" + base.monitor: val.get(base.monitor),
               "val_accuracy": val.get("accuracy"), "val_macro_f1": val.get("macro_f1"),
               "test_accuracy": test.get("accuracy"),
               "test_malignant_sensitivity": test.get("malignant_sensitivity"),
               "training_time_s": time_s, "model": str(out)}
        scored.append((score(val, base.monitor), row))
        scored.sort(key=lambda pair: (pair[0] is None, -(pair[0] or 0.0)))
        write_table([r for _, r in scored], Path(base.out))  # the app reads it while we run
        if on_result:
            on_result(row)
    rows = [row for _, row in scored]
    write_table(rows, Path(base.out))
    return rows


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    """Save the results as results.csv and results.json (RESULTS_FILE) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / RESULTS_FILE, json.dumps(rows, indent=2))
    if rows:
        with atomic.atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
