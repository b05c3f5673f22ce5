"""The Evaluate page's CSV downloads hold no spreadsheet formulas (bus_core.store.csv_safe)."""

from __future__ import annotations

import csv
import io

import pytest

from bus_core.store import csv_safe
from ui.evaluation import comparison_csv, comparison_table, metrics_csv


@pytest.mark.parametrize("cell", ["=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)",
                                  "\t=1", "\r=1"])
def test_formula_cells_are_neutralised(cell):
    assert csv_safe(cell) == "'" + cell
    assert csv_safe(f"x{cell}") == f"x{cell}" and csv_safe(-2.5) == -2.5 and csv_safe(None) is None


def test_evaluation_csv_downloads_hold_no_formulas():
    name = '=HYPERLINK("http://evil")'
    metrics = {"accuracy": 0.5, "n": 4, "model": name}
    rows = list(csv.reader(io.StringIO(metrics_csv(metrics))))
    assert ["model", "'" + name] in rows and ["accuracy", "0.5"] in rows
    table = comparison_table({name: metrics, "@other": metrics})
    header = next(csv.reader(io.StringIO(comparison_csv(table))))
    assert header == ["", "'" + name, "'@other"]
