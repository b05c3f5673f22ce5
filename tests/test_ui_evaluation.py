"""The Evaluate page's tables show the 95% intervals; its CSV downloads hold no spreadsheet
formulas (bus_core.data.dataset.csv_safe)."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from bus_core.data.dataset import csv_safe
from bus_core.evaluation.intervals import score
from ui.evaluation import (
    comparison_csv,
    comparison_table,
    interval_note,
    metrics_csv,
    metrics_table,
    source_table,
)


def scored() -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    probs = rng.dirichlet([1, 1, 1], 60)
    return score(y, probs, threshold=0.4, sources=["A"] * 40 + ["B"] * 20)


def test_tables_show_each_figure_with_its_interval():
    metrics = scored()
    table = metrics_table(metrics).set_index("Metric")
    low, high = metrics["auc_malignant_ci95"]
    assert table.loc["AUC, malignant vs rest", "95% interval"] == f"[{low:.3f}, {high:.3f}]"
    low, high = metrics["at_threshold"]["sensitivity_ci95"]
    assert table.loc["Malignant sensitivity at the threshold 0.400", "95% interval"] == \
        f"[{low:.3f}, {high:.3f}]"
    assert table.loc["Images (n)"].tolist() == ["60", ""]
    sources = source_table(metrics).set_index("Source")
    part = metrics["by_source"]["B"]
    low, high = part["accuracy_ci95"]
    assert sources.loc["B", "Accuracy"] == f"{part['accuracy']:.3f} [{low:.3f}, {high:.3f}]"
    assert sources.loc["A", "Images (n)"] == "40"
    assert "Malignant specificity at the threshold 0.400" in sources.columns
    assert source_table({"accuracy": 0.5}).empty
    assert "2,000 resamples" in interval_note(metrics) and interval_note({}) == ""
    rows = dict(csv.reader(io.StringIO(metrics_csv(metrics))))
    assert float(rows["auc_malignant_ci95_low"]) == pytest.approx(metrics["auc_malignant_ci95"][0])


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
