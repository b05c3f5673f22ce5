"""The safety gate: comparisons, evaluation of biased models, activation, log and roll back."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from bus_core.clinic.gate import (
    FIXED_TEST,
    NEW_CASES,
    GateError,
    GateResult,
    activate_if_passed,
    activation_warnings,
    compare,
    decision_log,
    decisions_path,
    earlier_models,
    evaluate_candidate,
    reject,
    rollback,
)
from bus_core.constants import CLASSES
from bus_core.data.dataset import load_records
from bus_core.db import default_db_path
from bus_core.models.build import load_model, save_model
from bus_core.models.registry import active_model_path, set_active_model
from tests.conftest import ADMIN, person


def admin(name: str):
    return person(name, "admin")


def metrics(sens: float | None, acc: float | None) -> dict:
    return {"malignant_sensitivity": sens, "accuracy": acc, "n": 10}


def both(sens, acc, new_sens=None, new_acc=None) -> dict:
    return {FIXED_TEST: metrics(sens, acc),
            NEW_CASES: metrics(sens if new_sens is None else new_sens,
                               acc if new_acc is None else new_acc)}


@pytest.fixture
def data_dir(monkeypatch, tmp_path) -> Path:
    folder = tmp_path / "userdata"
    monkeypatch.setenv("BUS_DATA_DIR", str(folder))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    return folder


def copy_model(source: Path, out: Path) -> Path:
    """Another model folder (same weights)."""
    return Path(shutil.copytree(source, out))


def always(label: str, tiny_model_dir: Path, out: Path) -> Path:
    """A copy of the tiny model whose head ignores the image and always predicts `label`."""
    loaded = load_model(tiny_model_dir)
    head = loaded.model.classifier
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([10.0 if c == label else 0.0 for c in CLASSES]))
    loaded.card.name = out.name
    return save_model(loaded.model, loaded.card, out)


# --- compare ---------------------------------------------------------------------------------

def test_equal_or_better_passes():
    assert compare(both(0.8, 0.7), both(0.8, 0.7)).passed
    result = compare(both(0.9, 0.75), both(0.8, 0.7))
    assert result.passed and result.reasons == []


def test_worse_beyond_tolerance_fails_with_a_reason():
    result = compare(both(0.8, 0.7, new_sens=0.5), both(0.8, 0.7))
    assert not result.passed
    assert len(result.reasons) == 1 and "held-out new cases" in result.reasons[0]
    assert "0.500" in result.reasons[0] and "0.800" in result.reasons[0]
    assert not compare(both(0.8, 0.67), both(0.8, 0.7)).passed  # fixed split, accuracy


def test_within_tolerance_passes_and_tolerance_is_configurable():
    assert compare(both(0.79, 0.69), both(0.8, 0.7), tolerance=0.02).passed
    assert not compare(both(0.79, 0.69), both(0.8, 0.7), tolerance=0.0).passed
    with pytest.raises(ValueError):
        compare(both(0.8, 0.7), both(0.8, 0.7), tolerance=-0.1)


def test_missing_metrics_skipped_on_both_sides_failed_on_candidate_only():
    skipped = compare(both(None, 0.7), both(None, 0.7))
    assert skipped.passed and any("not defined" in r for r in skipped.reasons)
    failed = compare(both(None, 0.7), both(0.8, 0.7))
    assert not failed.passed and any("has no malignant sensitivity" in r
                                     for r in failed.reasons)
    assert compare(both(0.5, 0.7), both(None, 0.7)).passed  # nothing to be worse than
    no_new_cases = compare({FIXED_TEST: metrics(0.8, 0.7)}, {FIXED_TEST: metrics(0.8, 0.7)})
    assert no_new_cases.passed
    nothing = compare({}, {})
    assert not nothing.passed and "No metric could be compared" in nothing.reasons[-1]


def test_custom_keys_and_table_rows():
    candidate = {FIXED_TEST: {"macro_f1": 0.5}, NEW_CASES: {"macro_f1": 0.6}}
    active = {FIXED_TEST: {"macro_f1": 0.6}, NEW_CASES: {"macro_f1": 0.6}}
    result = compare(candidate, active, keys=("macro_f1",))
    assert not result.passed
    rows = result.rows()
    assert [(r["subset"], r["ok"]) for r in rows] == [(FIXED_TEST, False), (NEW_CASES, True)]
    assert rows[0]["difference"] == pytest.approx(-0.1)


def test_the_worse_end_of_the_difference_interval_must_be_within_the_tolerance():
    spread = {FIXED_TEST: {"accuracy": [-0.06, 0.02]}}
    result = compare(both(0.8, 0.7), both(0.8, 0.7), differences=spread)
    assert not result.passed  # the same point figures, but 0.06 worse cannot be ruled out
    assert len(result.reasons) == 1 and "fixed test split" in result.reasons[0]
    assert "[-0.060, +0.020]" in result.reasons[0]
    rows = {(r["subset"], r["metric"]): r for r in result.rows()}
    assert rows[FIXED_TEST, "accuracy"]["difference_ci95"] == [-0.06, 0.02]
    assert rows[FIXED_TEST, "accuracy"]["ok"] is False
    assert rows[NEW_CASES, "accuracy"]["difference_ci95"] is None  # judged by its difference
    narrow = {FIXED_TEST: {"accuracy": [-0.015, 0.03]}}
    assert compare(both(0.8, 0.7), both(0.8, 0.7), differences=narrow).passed
    # a lower-is-better figure: the upper end is the worse one
    calibration = ({FIXED_TEST: {"ece": 0.05}}, {FIXED_TEST: {"ece": 0.05}})
    assert not compare(*calibration, keys=("ece",),
                       differences={FIXED_TEST: {"ece": [-0.01, 0.03]}}).passed
    assert compare(*calibration, keys=("ece",),
                   differences={FIXED_TEST: {"ece": [-0.03, 0.01]}}).passed


def test_result_round_trips_through_json(tmp_path):
    result = compare(both(0.9, 0.7), both(0.8, 0.7),
                     differences={FIXED_TEST: {"accuracy": [-0.01, 0.02]}})
    result.candidate_path = "/models/new"
    path = result.save(tmp_path / "gate.json")
    again = GateResult.load(path)
    assert again == result
    assert GateResult.load(tmp_path / "missing.json") is None
    earlier = result.to_dict()
    del earlier["differences"]  # saved before the intervals
    assert GateResult.from_dict(earlier).differences == {}


# --- evaluation ------------------------------------------------------------------------------

def test_evaluate_candidate_blocks_a_model_that_never_says_malignant(busi_dir, tiny_model_dir,
                                                                    tmp_path):
    records = load_records(busi_dir)
    good = always("malignant", tiny_model_dir, tmp_path / "malignant")
    bad = always("normal", tiny_model_dir, tmp_path / "normal")
    fixed, new = records[::6], records[3::6]  # one image per class each
    blocked = evaluate_candidate(bad, good, fixed, new, device="cpu-fp32")
    assert not blocked.passed
    assert blocked.candidate[FIXED_TEST]["malignant_sensitivity"] == 0.0
    assert blocked.active[NEW_CASES]["malignant_sensitivity"] == 1.0
    assert blocked.candidate_path == str(bad.resolve())
    assert blocked.differences[FIXED_TEST]["malignant_sensitivity"] == [-1.0, -1.0]
    assert "[-1.000, -1.000]" in " ".join(blocked.reasons)
    same = evaluate_candidate(good, good, fixed, [], device="cpu-fp32")
    assert same.passed and any("no held-out new cases" in r for r in same.reasons)
    assert same.differences[FIXED_TEST] == {"malignant_sensitivity": [0.0, 0.0],
                                            "accuracy": [0.0, 0.0]}
    assert same.candidate[NEW_CASES]["n"] is None


# --- decisions -------------------------------------------------------------------------------

def test_activation_only_when_passed_or_overridden(data_dir, tiny_model_dir, tmp_path):
    old = copy_model(tiny_model_dir, tmp_path / "old")
    new = copy_model(tiny_model_dir, tmp_path / "new")
    set_active_model(old, who=ADMIN)
    failed = compare(both(0.1, 0.7), both(0.8, 0.7))
    assert activate_if_passed(failed, new, who=admin("Dr A")) is False
    assert active_model_path() == old.resolve()
    assert activate_if_passed(failed, new, override_reason="   ", who=admin("Dr A")) is False
    with pytest.raises(GateError):
        activate_if_passed(failed, new, override_reason="urgent", who=admin(" "))
    failed.candidate_path = str(old.resolve())
    with pytest.raises(GateError, match="made for old"):
        activate_if_passed(failed, new, override_reason="new probe", who=admin("Dr B"))
    failed.candidate_path = str(new.resolve())
    assert activate_if_passed(failed, new, override_reason="new probe", who=admin("Dr B")) is True
    assert active_model_path() == new.resolve()
    log = decision_log()
    assert [e["action"] for e in log] == ["blocked", "blocked", "overridden"]
    assert log[-1]["override_reason"] == "new probe" and log[-1]["who"] == "Dr B"
    assert log[-1]["active"] == str(old.resolve()) and log[-1]["candidate"] == str(new.resolve())
    assert log[-1]["passed"] is False and log[-1]["metrics"]["candidate"][FIXED_TEST]
    passed = compare(both(0.8, 0.7), both(0.8, 0.7),
                     differences={FIXED_TEST: {"accuracy": [-0.01, 0.02]}})
    assert activate_if_passed(passed, old, who=admin("Dr A")) is True
    assert decision_log()[-1]["action"] == "activated"
    assert decision_log()[-1]["metrics"]["differences_ci95"][FIXED_TEST]["accuracy"] == [
        -0.01, 0.02]


def test_log_is_append_only_and_keeps_the_earlier_file(data_dir, tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    earlier = {"time": "2026-01-01T00:00:00+00:00", "action": "rolled back", "who": "Dr Old",
               "candidate": str(model.resolve()), "active": None}
    decisions_path().parent.mkdir(parents=True, exist_ok=True)
    decisions_path().write_text(json.dumps(earlier) + '\n{"action": "activ')  # cut short
    result = compare(both(0.8, 0.7), both(0.8, 0.7))
    activate_if_passed(result, model, who=admin("Dr A"))
    reject(result, model, who=admin("Dr B"), reason="too few new cases")
    entries = decision_log()
    assert [e["action"] for e in entries] == ["rolled back", "activated", "rejected"]
    assert entries[2]["override_reason"] == "too few new cases" and entries[1]["who"] == "Dr A"
    assert decisions_path().read_text().count("\n") == 1  # the earlier file is never written
    with sqlite3.connect(default_db_path()) as conn, \
            pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM model_decisions")


def test_rollback_restores_an_earlier_model_and_is_logged(data_dir, tiny_model_dir, tmp_path):
    first = copy_model(tiny_model_dir, tmp_path / "first")
    second = copy_model(tiny_model_dir, tmp_path / "second")
    set_active_model(first, who=ADMIN)
    activate_if_passed(compare(both(0.8, 0.7), both(0.8, 0.7)), second, who=admin("Dr A"))
    assert earlier_models() == [first.resolve()]
    rollback(first, admin("Dr C"), reason="more false alarms")
    assert active_model_path() == first.resolve()
    entry = decision_log()[-1]
    assert entry["action"] == "rolled back" and entry["who"] == "Dr C"
    assert entry["candidate"] == str(first.resolve()) and entry["active"] == str(second.resolve())
    assert earlier_models() == [second.resolve()]
    assert second.is_dir() and first.is_dir()  # nothing is deleted
    with pytest.raises(GateError):
        rollback(second, admin(""))


def test_a_model_made_active_by_hand_needs_a_reason_and_is_logged_with_its_warnings(
        data_dir, tiny_model_dir, tmp_path):
    from bus_core.clinic.gate import make_active
    from bus_core.models.card import read_card
    from tests.conftest import copy_model as copy_with_card

    data = {"data_hash": "abc"}
    old = copy_with_card(tiny_model_dir, tmp_path / "old", metrics={"test": {
        "n": 400, "accuracy": 0.8, "malignant_sensitivity": 0.9, "data": data}})
    new = copy_with_card(tiny_model_dir, tmp_path / "new", metrics={"test": {
        "n": 40, "accuracy": 0.85, "malignant_sensitivity": 0.7, "data": data}})
    set_active_model(old, who=ADMIN)
    warnings = activation_warnings(read_card(new), read_card(old))
    assert any("only 40 images" in w for w in warnings)
    assert any("malignant sensitivity on its test images is 0.700" in w for w in warnings)
    assert not any("accuracy" in w for w in warnings)  # higher: no warning
    with pytest.raises(GateError, match="Say why"):
        make_active(new, who=admin("ann"), reason="  ")
    assert active_model_path() == old.resolve()
    make_active(new, who=admin("ann"), reason="site validation")
    assert active_model_path() == new.resolve()
    entry = decision_log()[-1]
    assert (entry["action"], entry["who"], entry["override_reason"]) == (
        "made active", "ann", "site validation")
    assert entry["active"] == str(old.resolve()) and len(entry["reasons"]) == 2
    assert old.resolve() in earlier_models()  # a roll back can return to it
