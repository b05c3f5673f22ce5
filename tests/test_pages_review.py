"""The Review cases page through the whole app (AppTest): listing, reviewing, exporting, and the
gate's decisions with roll back."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from bus_core.clinic.accounts import new_session
from bus_core.clinic.cases import open_store
from bus_core.clinic.gate import GATE_FILE, compare, decision_log
from bus_core.clinic.retraining import RetrainPlan
from bus_core.data.dataset import load_records
from bus_core.data.splits import make_split, save_split
from bus_core.db import default_db_path
from bus_core.inference.predict import Predictor
from bus_core.models.registry import active_model_path, set_active_model
from bus_core.settings import user_models_dir
from bus_core.training.train import TrainConfig
from tests.conftest import ADMIN, person, signed_in_app, synthetic_image
from ui.cases import save_prediction_as_case
from ui.common import SESSION_KEY

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture
def case_ids(monkeypatch, tmp_path) -> list[int]:
    """Three saved cases; the third was corrected (normal -> benign) by Dr Old."""
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    rng = np.random.default_rng(0)
    ids = []
    with open_store(default_db_path()) as store:
        for label in ("benign", "malignant", "normal"):
            image, mask = synthetic_image(label, rng)
            case = store.save_case(image, image_name=f"{label}.png",
                                   masks=[mask] if mask.any() else [], model_name="tiny",
                                   model_hash="0" * 64, probabilities={label: 0.9},
                                   predicted_label=label, who=person("Dr New"))
            ids.append(case.id)
        store.review_case(ids[2], label="benign", who=person("Dr Old"))
    return ids


def open_page() -> AppTest:
    at = signed_in_app(timeout=60)
    at.run()
    at.switch_page("pages/review.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    return " ".join(str(e.value) for kind in ("markdown", "caption", "error", "success",
                                              "warning", "info") for e in at.get(kind))


def test_lists_cases_and_highlights_disagreement(case_ids):
    at = open_page()
    table = at.dataframe[0].value
    assert sorted(table["Case"]) == sorted(case_ids)
    assert list(table.columns)[:5] == ["Case", "Agreement", "Model's reading", "Confirmed",
                                       "Notes"]  # what a narrow window still shows
    row = table[table["Case"] == case_ids[2]].iloc[0]
    assert row["Agreement"] == "disagrees" and row["Reviewer"] == "Dr Old"
    assert "1 where the reviewer disagreed" in texts(at)
    at.selectbox(key="review_f_status").set_value("unreviewed").run()
    assert sorted(at.dataframe[0].value["Case"]) == sorted(case_ids[:2])
    assert "not redrawn here" in texts(at)  # no active model: the CAM is not recomputed


def test_review_changes_status_and_history(case_ids):
    at = open_page()
    target = case_ids[0]
    at.selectbox(key="review_case").set_value(target).run()
    assert not [t for t in at.text_input if "Your name" in t.label]  # the signed-in user signs
    at.radio(key=f"review_label_{target}").set_value("malignant")
    at.text_area(key=f"review_notes_{target}").input("spiculated margin")
    at.button[[b.label for b in at.button].index("Save review")].click().run()
    assert not at.exception
    assert f"Case {target} corrected as malignant." in texts(at)
    with open_store(default_db_path()) as store:
        case = store.get_case(target)
        assert (case.status, case.confirmed_label, case.reviewer) == ("corrected", "malignant",
                                                                      "Dr Test")
        assert case.notes == "spiculated margin"
    history = next(d.value for d in at.dataframe if "Action" in d.value.columns)
    assert "Dr Test" in set(history["Who"]) and "corrected" in set(history["Action"])
    # plain words for the fields, not the database's column names
    assert {"model's reading", "confirmed class"} <= set(history["Field"])
    assert not {"predicted_label", "confirmed_label"} & set(history["Field"])


def test_export_zip_has_busi_layout(case_ids):
    at = open_page()
    at.button(key="review_export_build").click().run()
    with zipfile.ZipFile(io.BytesIO(at.session_state["review_export"])) as archive:
        names = set(archive.namelist())
        csv = archive.read("bus-cases/cases.csv").decode()
    assert names == {"bus-cases/cases.csv", f"bus-cases/benign/case-{case_ids[2]}.png"}
    assert f"{case_ids[2]},benign/case-{case_ids[2]}.png,benign" in csv
    assert at.get("download_button")
    at.toggle(key="review_export_only").set_value(False).run()
    at.button(key="review_export_build").click().run()
    with zipfile.ZipFile(io.BytesIO(at.session_state["review_export"])) as archive:
        names = set(archive.namelist())
    assert {f"bus-cases/benign/case-{case_ids[0]}.png",
            f"bus-cases/benign/case-{case_ids[0]}_mask.png",
            f"bus-cases/malignant/case-{case_ids[1]}.png"} <= names


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
    at = open_page()
    assert "worse than the active one" in texts(at)
    override = at.button(key="review_gate_override")
    assert override.disabled
    at.text_input(key="review_gate_reason").input("urgent: new probe").run()
    at.button(key="review_gate_override").click().run()
    assert not at.exception
    assert active_model_path() == new.resolve()
    entry = decision_log()[-1]
    assert (entry["action"], entry["who"], entry["override_reason"]) == (
        "overridden", "Dr Test", "urgent: new probe")
    assert "activated by override" in texts(at)

    assert at.selectbox(key="review_rollback_target").value == old.resolve()
    at.button(key="review_rollback").click().run()
    assert active_model_path() == old.resolve()
    assert decision_log()[-1]["action"] == "rolled back"
    assert new.is_dir()


def test_case_saved_from_a_prediction_gets_its_cam_redrawn(monkeypatch, tmp_path,
                                                           tiny_model_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    set_active_model(tiny_model_dir, who=ADMIN)
    predictor = Predictor.from_path(tiny_model_dir, device="cpu-fp32")
    image, mask = synthetic_image("malignant", np.random.default_rng(1), size=(140, 160))
    prediction = predictor.predict(image)
    with open_store(default_db_path()) as store:
        case = save_prediction_as_case(store, image, "scan.png", [mask], "weighted", predictor,
                                       prediction, {"target": "benign", "method": "Grad-CAM",
                                                    "opacity": 0.3}, who=ADMIN)
    assert (case.model_name, case.model_hash) == ("tiny-test", predictor.card.weights_sha256)
    assert case.predicted_label == prediction.label and case.cam_settings["target"] == "benign"
    with open_store(default_db_path()) as store:
        store.review_case(case.id, label="malignant", who=ADMIN, notes="Biopsy booked")
    import pypdfium2 as pdfium

    import bus_core.inference.pdf_report

    made = []
    original = bus_core.inference.pdf_report.render_study_pdf
    monkeypatch.setattr(bus_core.inference.pdf_report, "render_study_pdf",
                        lambda report: made.append(report) or original(report))
    at = open_page()
    captions = [c for image in at.get("image") for c in image.captions]
    assert any("Grad-CAM for 'benign'" in c for c in captions)
    assert "not redrawn" not in texts(at)
    # the case's PDF report carries the review and no file name
    button = next(b for b in at.get("download_button") if b.proto.label == "Report (PDF)")
    assert "scan" not in str(button.proto)
    (report,) = made
    doc = pdfium.PdfDocument(original(report))
    try:
        text = " ".join(" ".join(page.get_textpage().get_text_range() for page in doc).split())
    finally:
        doc.close()
    assert f"Case {case.id} |" in text and "confirmed malignant" in text
    assert "Notes: Biopsy booked" in text and "Grad-CAM for 'benign'" in text
    assert "scan.png" not in text


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
    at = open_page()
    at.button(key="review_gate_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if "Verdict" in d.value.columns)
    assert set(table["Verdict"]) <= {"ok", "not compared"}  # the same weights: not worse
    assert "no held-out new cases" in texts(at)
    at.button(key="review_gate_activate").click().run()
    assert active_model_path() == new.resolve()
    assert decision_log()[-1]["action"] == "activated"
    assert "Decision: activated by Dr Test" in texts(at)


def test_retraining_refuses_data_outside_the_allowed_folders(case_ids, busi_dir, monkeypatch,
                                                             tiny_model_dir):
    monkeypatch.setenv("BUS_MODEL", str(tiny_model_dir))
    at = open_page()
    at.text_input(key="review_rt_data").set_value("/etc").run()
    at.button(key="review_rt_start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "outside the folders the administrator allows" in " ".join(e.value for e in at.error)
    at.text_input(key="review_rt_data").set_value(str(busi_dir))
    at.text_input(key="review_rt_split").set_value("/etc/split.json")
    at.button(key="review_rt_start").click().run()
    assert "outside the folders the administrator allows" in " ".join(e.value for e in at.error)
    assert not any(user_models_dir().glob("retrain-*"))


def test_unusable_data_folder_is_explained(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("BUS_DATA_DIR", str(blocker))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    at = AppTest.from_file(APP, default_timeout=60).run()  # nobody can sign in without it
    assert "The case database cannot be used" in " ".join(e.value for e in at.error)
    assert not at.dataframe


def _save_button_script() -> None:
    import os

    import numpy as np

    from bus_core.inference.predict import Predictor
    from ui.cases import save_case_button

    predictor = Predictor.from_path(os.environ["TINY_MODEL"], device="cpu-fp32")
    image = np.full((140, 160, 3), 90, np.uint8)
    save_case_button(image, "scan.png", [], None, predictor, predictor.predict(image),
                     {"target": "normal"}, key="k1")


def test_save_case_button_saves_once(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("TINY_MODEL", str(tiny_model_dir))
    at = AppTest.from_function(_save_button_script, default_timeout=60)
    at.session_state[SESSION_KEY] = new_session(person("Dr D"))
    at.run()
    at.button(key="save_case_k1").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Saved as case 1" in at.success[0].value
    at.run()
    assert not at.button and "Saved as case 1" in at.success[0].value
    with open_store(default_db_path()) as store:
        (case,) = store.list_cases()
        assert case.model_name == "tiny-test" and store.history(case.id)[0].who == "Dr D"


def test_markdown_in_user_text_is_escaped():
    from ui.common import md_escape

    hostile = "![x](http://evil/pixel.png) **bold** [link](javascript:alert(1))"
    escaped = md_escape(hostile)
    assert "![" not in escaped and "](" not in escaped and "**" not in escaped
    assert escaped.replace("\\", "") == hostile


def test_saving_the_same_image_again_asks_first(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("TINY_MODEL", str(tiny_model_dir))
    at = AppTest.from_function(_save_button_script, default_timeout=60)
    at.session_state[SESSION_KEY] = new_session(person("Dr D"))
    at.run()
    at.button(key="save_case_k1").click().run()
    at.session_state["_saved_cases"] = {}  # a new session sees the same image
    at.run()
    assert "already saved as case 1" in at.warning[0].value
    assert at.button(key="save_case_k1").label == "Save again as a new case"
    at.button(key="save_case_k1").click().run()
    assert "Saved as case 2" in at.success[0].value
    with open_store(default_db_path()) as store:
        assert [c.id for c in store.list_cases(order_by="id", descending=False)] == [1, 2]


def test_the_gate_states_each_difference_with_its_interval(case_ids, tiny_model_dir):
    candidate(case_ids, tiny_model_dir, compare(
        {"fixed_test": {"malignant_sensitivity": 0.8, "accuracy": 0.85}},
        {"fixed_test": {"malignant_sensitivity": 0.8, "accuracy": 0.86}},
        differences={"fixed_test": {"accuracy": [-0.04, 0.02],
                                    "malignant_sensitivity": [-0.01, 0.01]}}))
    at = open_page()
    assert "On the fixed test split: accuracy difference \u22120.01 [\u22120.04, +0.02]." in \
        texts(at)
    table = next(d.value for d in at.dataframe if "Verdict" in d.value.columns)
    assert "\u22120.01 [\u22120.04, +0.02]" in set(table["Difference [95% interval]"])
    assert "+0.00 [\u22120.01, +0.01]" in set(table["Difference [95% interval]"])
