"""The grid of a search (bus_core.training.tune): one parser for the command line and the page."""

from __future__ import annotations

import pytest

from bus_core.training.tune import combinations, grid_values, parse_grid


def test_grid_values_are_typed_by_the_training_option():
    assert grid_values("lr", "1e-3, 3e-4;") == [1e-3, 3e-4]
    assert grid_values("batch-size", "8,16") == [8, 16]
    assert grid_values("optimizer", "adam, sgd") == ["adam", "sgd"]
    with pytest.raises(ValueError):
        grid_values("batch_size", "8, many")
    with pytest.raises(ValueError):
        grid_values("colour", "red")


def test_command_line_grid():
    grid = parse_grid(["lr=0.01,0.001", "batch_size=16"])
    assert grid == {"lr": [0.01, 0.001], "batch_size": [16]}
    assert len(combinations(grid)) == 2
    with pytest.raises(ValueError, match="Bad grid entry"):
        parse_grid(["lr"])
