"""The Retrain page through the whole app (AppTest): fine-tuning on reviewed cases, the gate's
comparison and decisions with roll back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bus_core.clinic.gate import GATE_FILE, compare, decision_log
from bus_core.clinic.retraining import RetrainPlan
from bus_core.data.dataset import load_records
from bus_core.data.splits import make_split, save_split
from bus_core.models.registry import active_model_path, set_active_model
from bus_core.settings import user_models_dir
from bus_core.training.train import TrainConfig
from tests.conftest import ADMIN, opened_page, texts


def candidate(case_ids, tiny_model_dir, result) -> tuple[Path, Path]:
    """An active model and a finished retrained candidate with the gate `result`."""
    old, new = user_models_dir() / "old", user_models_dir() / "new"
    for folder in (old, new):
        shutil.copytree(tiny_model_dir, folder)
    set_active_model(old, who=ADMIN)
    RetrainPlan(config=TrainConfig(data=["busi"], out=str(new)), active_model=str(old),
                cases_dir="", train_manifest="", heldout_manifest="", heldout_file="",
                base_data=["busi"], base_split="split.json", train_cases=[case_ids[2]],
                heldout_cases=[]).save()
    result.active_path = str(old.resolve())
    result.save(new / GATE_FILE)
    return old, new


@pytest.fixture
def failed_candidate(case_ids, tiny_model_dir) -> tuple[Path, Path]:
    """An active model and a finished retrained candidate whose gate result failed."""
    return candidate(case_ids, tiny_model_dir, compare(
        {"fixed_test": {"malignant_sensitivity": 0.2, "accuracy": 0.7}},
        {"fixed_test": {"malignant_sensitivity": 0.8, "accuracy": 0.7}}))


def test_failed_gate_needs_a_reason_then_roll_back(failed_candidate):
    old, new = failed_candidate
    at = opened_page("retrain")
    assert "worse than the active one" in texts(at)
    override = at.button(key="retrain_gate_override")
    assert override.disabled
    at.text_input(key="retrain_gate_reason").input("urgent: new probe").run()
    at.button(key="retrain_gate_override").click().run()
    assert not at.exception
    assert active_model_path() == new.resolve()
    entry = decision_log()[-1]
    assert (entry["action"], entry["who"], entry["override_reason"]) == (
        "overridden", "Dr Test", "urgent: new probe")
    assert "activated by override" in texts(at)

    assert at.selectbox(key="retrain_rollback_target").value == old.resolve()
    at.button(key="retrain_rollback").click().run()
    assert active_model_path() == old.resolve()
    assert decision_log()[-1]["action"] == "rolled back"
    assert new.is_dir()


def test_compare_from_the_page_then_activate(case_ids, tiny_model_dir, busi_dir, tmp_path):
    old, new = user_models_dir() / "old", user_models_dir() / "new"
    for folder in (old, new):
        shutil.copytree(tiny_model_dir, folder)
    set_active_model(old, who=ADMIN)
    records = load_records(busi_dir)
    split = save_split(make_split(records, seed=0, groups={r.id: r.id for r in records}),
                       tmp_path / "split.json")
    heldout = tmp_path / "heldout.csv"
    heldout.write_text("path,label,mask\n")
    RetrainPlan(config=TrainConfig(data=[str(busi_dir)], out=str(new)), active_model=str(old),
                cases_dir="", train_manifest="", heldout_manifest=str(heldout), heldout_file="",
                base_data=[str(busi_dir)], base_split=str(split), train_cases=[case_ids[2]],
                heldout_cases=[]).save()
    at = opened_page("retrain")
    at.button(key="retrain_gate_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if "Verdict" in d.value.columns)
    assert set(table["Verdict"]) <= {"ok", "not compared"}  # the same weights: not worse
    assert "no held-out new cases" in texts(at)
    at.button(key="retrain_gate_activate").click().run()
    assert active_model_path() == new.resolve()
    assert decision_log()[-1]["action"] == "activated"
    assert "Decision: activated by Dr Test" in texts(at)


def test_retraining_refuses_data_outside_the_allowed_folders(case_ids, busi_dir, monkeypatch,
                                                             tiny_model_dir):
    monkeypatch.setenv("BUS_MODEL", str(tiny_model_dir))
    at = opened_page("retrain")
    at.text_input(key="retrain_data").set_value("/etc").run()
    at.button(key="retrain_start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "outside the folders the administrator allows" in " ".join(e.value for e in at.error)
    at.text_input(key="retrain_data").set_value(str(busi_dir))
    at.text_input(key="retrain_split").set_value("/etc/split.json")
    at.button(key="retrain_start").click().run()
    assert "outside the folders the administrator allows" in " ".join(e.value for e in at.error)
    assert not any(user_models_dir().glob("retrain-*"))


def test_the_gate_states_each_difference_with_its_interval(case_ids, tiny_model_dir):
    candidate(case_ids, tiny_model_dir, compare(
        {"fixed_test": {"malignant_sensitivity": 0.8, "accuracy": 0.85}},
        {"fixed_test": {"malignant_sensitivity": 0.8, "accuracy": 0.86}},
        differences={"fixed_test": {"accuracy": [-0.04, 0.02],
                                    "malignant_sensitivity": [-0.01, 0.01]}}))
    at = opened_page("retrain")
    assert "On the fixed test split: accuracy difference \u22120.01 [\u22120.04, +0.02]." in \
        texts(at)
    table = next(d.value for d in at.dataframe if "Verdict" in d.value.columns)
    assert "\u22120.01 [\u22120.04, +0.02]" in set(table["Difference [95% interval]"])
    assert "+0.00 [\u22120.01, +0.01]" in set(table["Difference [95% interval]"])
