"""The Review cases page through the whole app (AppTest): the worklist, reviewing (also one key
per class), studies, exporting, saving cases."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from bus_core.clinic.accounts import new_session
from bus_core.clinic.cases import open_store
from bus_core.db import default_db_path
from bus_core.inference.predict import Predictor
from bus_core.models.registry import set_active_model
from tests.conftest import ADMIN, opened_page, person, synthetic_image, texts
from ui.cases import reading_as_case
from ui.common import SESSION_KEY

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def test_the_worklist_counts_filters_and_sorts(case_ids):
    at = opened_page("review")
    views = at.segmented_control(key="review_view")
    assert views.value == "to_review"
    # the counts at the top
    assert {m.label: m.value for m in at.metric} == {
        "To review": "2", "Flagged": "0", "Uncertain": "0", "Disagreed": "1", "All": "3"}
    table = at.dataframe[0].value
    assert list(table["Case"]) == [case_ids[1], case_ids[0]]  # most suspicious first
    assert list(table.columns)[:5] == ["Case", "Agreement", "Model's reading", "Flag",
                                       "Malignant"]  # what a narrow window still shows
    assert "Cases 1–2 of 2" in texts(at)
    assert "not redrawn here" in texts(at)  # no active model: the CAM is not recomputed
    views.set_value("disagreements").run()
    row = at.dataframe[0].value.iloc[0]
    assert (row["Case"], row["Agreement"], row["Reviewer"]) == (case_ids[2], "disagrees",
                                                                "Dr Old")
    views.set_value("all").run()
    at.selectbox(key="review_f_sort").set_value("oldest").run()
    assert list(at.dataframe[0].value["Case"]) == case_ids
    at.selectbox(key="review_f_owner").set_value("Dr New").run()
    assert len(at.dataframe[0].value) == 3
    at.selectbox(key="review_f_reviewer").set_value("Dr Old").run()
    assert list(at.dataframe[0].value["Case"]) == [case_ids[2]]
    assert at.metric[-1].value == "1"  # the counts follow the filters below them


def test_one_key_labels_the_case_and_opens_the_next(case_ids):
    at = opened_page("review")
    first, second = case_ids[1], case_ids[0]
    assert at.selectbox(key="review_case").value == first
    buttons = {b.key: b for b in at.button}
    assert buttons["review_quick_benign"].proto.shortcut == "2"
    assert buttons["review_next"].proto.shortcut.upper() == "N"
    assert buttons["review_previous"].disabled
    at.button(key="review_quick_malignant").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert f"Case {first} confirmed as malignant. Now case {second}." in texts(at)
    assert at.selectbox(key="review_case").value == second
    with open_store(default_db_path()) as store:
        assert store.get_case(first).reviewer == "Dr Test"
    # a reviewed case leaves the list of cases to review
    assert at.button(key="review_previous").disabled and at.button(key="review_next").disabled
    assert list(at.dataframe[0].value["Case"]) == [second]
    at.button(key="review_quick_normal").click().run()
    assert f"Case {second} corrected as normal. That was the last case" in texts(at)
    # both reviewed: the worklist of cases to review is empty
    assert "No case matches these filters." in texts(at)


def test_a_case_of_a_study_shows_the_study_and_lists_its_cases(case_ids):
    from bus_core.clinic.cases import NewCase, StudyReadingRecord

    rng = np.random.default_rng(5)
    probabilities = {"normal": 0.1, "benign": 0.3, "malignant": 0.6}
    items = [NewCase(image=synthetic_image("malignant", rng)[0], image_name=f"view{i}.png",
                     model_name="tiny", model_hash="0" * 64, probabilities=probabilities,
                     predicted_label="malignant", flagged=True) for i in range(2)]
    with open_store(default_db_path()) as store:
        study = store.save_study(items, StudyReadingRecord(
            "least-normal", probabilities, "malignant", False, True), who=person("Dr New"))
    at = opened_page("review")
    at.selectbox(key="review_case").set_value(study.case_ids[0]).run()
    assert (f"Study {study.id} · 2 images (cases {study.case_ids[0]}, {study.case_ids[1]}) · "
            "study reading malignant · flagged malignant") in texts(at).replace("*", "")
    at.button(key=f"review_study_{study.id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert sorted(at.dataframe[0].value["Case"]) == sorted(study.case_ids)
    assert f"Only the cases of study {study.id}." in texts(at)
    at.button(key="review_study_clear").click().run()
    assert len(at.dataframe[0].value) == 5  # every case again (the view stays 'All')


def test_a_study_read_by_the_active_model_has_its_pdf_report(monkeypatch, tmp_path,
                                                             tiny_model_dir):
    import pypdfium2 as pdfium

    import bus_core.inference.pdf_report
    from bus_core.inference.study import combine_predictions

    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    set_active_model(tiny_model_dir, who=ADMIN)
    predictor = Predictor.from_path(tiny_model_dir, device="cpu-fp32")
    rng = np.random.default_rng(3)
    images = [synthetic_image("benign", rng, size=(140, 160))[0] for _ in range(2)]
    predictions = [predictor.predict(image) for image in images]
    items = [reading_as_case(image, f"Jane Doe {i}.png", [], None, predictor, prediction,
                             {"target": prediction.label})
             for i, (image, prediction) in enumerate(zip(images, predictions))]
    combined = combine_predictions(predictions)
    from bus_core.clinic.cases import StudyReadingRecord

    with open_store(default_db_path()) as store:
        study = store.save_study(items, StudyReadingRecord(
            combined.rule, combined.probabilities, combined.label, combined.uncertain,
            bool(combined.flag)), who=person("Dr New"))
        for case_id in study.case_ids:
            store.review_case(case_id, label="benign", who=person("Dr Rev"))
    made = []
    original = bus_core.inference.pdf_report.render_study_pdf
    monkeypatch.setattr(bus_core.inference.pdf_report, "render_study_pdf",
                        lambda report: made.append(report) or original(report))
    at = opened_page("review")
    at.segmented_control(key="review_view").set_value("all").run()
    assert any(b.proto.label == "Study report (PDF)" for b in at.get("download_button"))
    report = next(r for r in made if len(r.images) == 2)
    assert report.name == f"Study {study.id}" and report.combined is not None
    assert report.review is not None and report.review.reviewer == "Dr Rev"
    doc = pdfium.PdfDocument(original(report))
    try:
        text = " ".join(" ".join(page.get_textpage().get_text_range() for page in doc).split())
    finally:
        doc.close()
    assert f"Study {study.id}" in text and "Study reading:" in text and "Jane" not in text
    assert "Dr Rev" in text


def test_five_thousand_cases_open_one_page_at_a_time(case_ids):
    """The worklist reads one page (50 cases) of 5,000, with the counts of all of them."""
    from sqlalchemy import insert

    from bus_core.clinic.schema import cases

    with open_store(default_db_path()) as store:
        row = {k: v for k, v in store.engine.connect().execute(
            cases.select().where(cases.c.id == case_ids[0])).mappings().one().items()
            if k != "id"}
        with store.transaction(write=True) as conn:
            conn.execute(insert(cases), [dict(row, p_malignant=i / 5000) for i in range(4997)])
    at = opened_page("review")
    assert len(at.dataframe[0].value) == 50
    assert "Cases 1–50 of 4999 · page 1 of 100" in texts(at)
    assert at.dataframe[0].value["Case"].iloc[0] == 3 + 4997  # the most suspicious copy
    key = next(w.key for w in at.get("pagination"))
    at.session_state[key] = 100
    at.run()
    assert "Cases 4951–4999 of 4999 · page 100 of 100" in texts(at)
    assert len(at.dataframe[0].value) == 49


def test_review_changes_status_and_history(case_ids):
    at = opened_page("review")
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
    at = opened_page("review")
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


def test_case_saved_from_a_prediction_gets_its_cam_redrawn(monkeypatch, tmp_path,
                                                           tiny_model_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    set_active_model(tiny_model_dir, who=ADMIN)
    predictor = Predictor.from_path(tiny_model_dir, device="cpu-fp32")
    image, mask = synthetic_image("malignant", np.random.default_rng(1), size=(140, 160))
    prediction = predictor.predict(image)
    with open_store(default_db_path()) as store:
        case = store.add_case(reading_as_case(
            image, "scan.png", [mask], "weighted", predictor, prediction,
            {"target": "benign", "method": "Grad-CAM", "opacity": 0.3}), who=ADMIN)
    assert (case.model_name, case.model_hash) == ("tiny-test", predictor.card.weights_sha256)
    assert case.predicted_label == prediction.label and case.cam_settings["target"] == "benign"
    assert case.flagged == prediction.malignant_flag
    with open_store(default_db_path()) as store:
        store.review_case(case.id, label="malignant", who=ADMIN, notes="Biopsy booked")
    import pypdfium2 as pdfium

    import bus_core.inference.pdf_report

    made = []
    original = bus_core.inference.pdf_report.render_study_pdf
    monkeypatch.setattr(bus_core.inference.pdf_report, "render_study_pdf",
                        lambda report: made.append(report) or original(report))
    at = opened_page("review")
    assert "No case matches" in texts(at)  # reviewed: not among the cases to review
    at.segmented_control(key="review_view").set_value("all").run()
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
    from ui.cases import reading_as_case, save_case_button

    predictor = Predictor.from_path(os.environ["TINY_MODEL"], device="cpu-fp32")
    image = np.full((140, 160, 3), 90, np.uint8)
    save_case_button(reading_as_case(image, "scan.png", [], None, predictor,
                                     predictor.predict(image), {"target": "normal"}), key="k1")


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
    assert at.button(key="save_case_again_k1").label == "Save again as a new case"
    at.button(key="save_case_again_k1").click().run()
    assert "Saved as case 2" in at.success[0].value
    with open_store(default_db_path()) as store:
        assert [c.id for c in store.list_cases(order_by="id", descending=False)] == [1, 2]


def test_a_save_button_drawn_before_the_image_was_saved_elsewhere_does_not_save_it_twice(
        monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("TINY_MODEL", str(tiny_model_dir))
    at = AppTest.from_function(_save_button_script, default_timeout=60)
    at.session_state[SESSION_KEY] = new_session(person("Dr D"))
    at.run()
    stale = at.button(key="save_case_k1")
    with open_store(default_db_path()) as store:  # meanwhile saved as part of a study
        store.save_case(np.full((140, 160, 3), 90, np.uint8), image_name="scan.png", masks=[],
                        model_name="tiny", model_hash="0" * 64, probabilities={"normal": 1.0},
                        predicted_label="normal", who=person("Dr D"))
    stale.click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "already saved as case 1" in at.warning[0].value
    with open_store(default_db_path()) as store:
        assert store.count_cases() == 1
