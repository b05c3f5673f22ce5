"""The Monitor page through the whole app (AppTest): windows of saved readings and reviewed
agreement beside the card's figures, with the CSV download (its content:
tests/clinic/test_monitoring.py)."""

from __future__ import annotations

import numpy as np
import pytest

from bus_core.clinic.cases import open_store
from bus_core.db import default_db_path
from bus_core.roles import operator
from tests.conftest import signed_in_app, synthetic_image


def _texts(at) -> str:
    return " ".join(e.value for kind in ("markdown", "caption", "info", "warning", "success",
                                         "error") for e in at.get(kind))


@pytest.fixture
def data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    return tmp_path / "userdata"


def test_without_cases_the_page_says_how_it_fills(data_dir):
    at = signed_in_app("researcher").run()
    at.switch_page("pages/monitor.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "No cases have been saved yet" in _texts(at)


def test_saved_and_reviewed_cases_fill_the_windows_and_the_csv(data_dir):
    rng = np.random.default_rng(0)
    who = operator()
    with open_store(default_db_path()) as store:
        for i, (predicted, p_malignant, confirmed) in enumerate(
                [("malignant", 0.8, "malignant"), ("benign", 0.1, "benign"),
                 ("benign", 0.1, "malignant"), ("normal", 0.05, None)]):
            image, mask = synthetic_image("benign", rng)
            rest = (1 - p_malignant) / 2
            case = store.save_case(image, image_name=f"Patient Name {i}.png",
                                   masks=[mask] if predicted != "normal" else [],
                                   model_name="densenet121-context-v2", model_hash="h",
                                   probabilities={"normal": rest, "benign": rest,
                                                  "malignant": p_malignant},
                                   predicted_label=predicted, who=who)
            if confirmed:
                store.review_case(case.id, label=confirmed, who=who)
    at = signed_in_app("researcher").run()
    at.switch_page("pages/monitor.py").run()
    assert not at.exception, [e.value for e in at.exception]
    text = _texts(at)
    assert "The model card's test figures (490 images)" in text
    assert "Agreement is not compared with the card's figures: 3 reviewed cases" in text
    assert "Patient Name" not in text
    table = at.dataframe[0].value
    newest = table.iloc[0]
    assert newest["Readings"] == 4 and newest["Reviewed"] == 3
    assert newest["Agreement"] == "67%" and newest["No outline"] == "25%"
    assert newest["Cancers found"].startswith("50% [")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Reviewed"] == "3"
    assert at.get("download_button")
    at.segmented_control(key="monitor_window").set_value("week").run()
    assert not at.exception
    assert "7-day window" in " ".join(e.value for e in at.markdown)
