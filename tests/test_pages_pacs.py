"""The PACS in the app's pages (AppTest): a case saved from an image opened from the PACS keeps
its UIDs, the Review page shows them and sends the confirmed label (to the test Orthanc, and
as a sentence when the PACS is down), and administrators manage the endpoints on the Account
page without seeing secrets again."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from bus_core.clinic.cases import PacsSource, open_store
from bus_core.db import default_db_path
from bus_core.integrations.pacs.client import SENT_ACTION, Pacs
from bus_core.integrations.pacs.dicom import read_finding
from bus_core.integrations.pacs.endpoints import (
    CONFIG_ENV,
    PASSWORD_ENV,
    SAVED_FILE,
    URL_ENV,
    USER_ENV,
)
from bus_core.settings import data_dir
from tests.conftest import free_port, person, signed_in_app, synthetic_image, texts
from tests.orthanc import USER, orthanc_fixture, us_study  # noqa: F401 - the fixture
from ui.pacs import OPENED, Opened
from ui.uploads import decode_bytes


@pytest.fixture
def userdata(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty data folder; no PACS set on the server."""
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    for name in (URL_ENV, USER_ENV, PASSWORD_ENV, CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "userdata"




def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def test_a_case_saved_from_a_pacs_image_keeps_its_uids(userdata, monkeypatch,
                                                       tiny_model_dir) -> None:
    monkeypatch.setenv("BUS_MODEL", str(tiny_model_dir))
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{free_port()}/dicom-web")
    single = us_study()[0]
    buffer = io.BytesIO()
    single.save_as(buffer, enforce_file_format=True)
    upload = decode_bytes("PACS 1-1.dcm", buffer.getvalue())
    at = signed_in_app("clinician")
    at.session_state[OPENED] = {upload.key: Opened(upload, single, "default")}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    button(at, "Save as case").click().run()
    assert not at.exception and not at.error
    with open_store(default_db_path()) as store:
        (case,) = store.list_cases()
    assert case.pacs == PacsSource("default", str(single.StudyInstanceUID),
                                   str(single.SeriesInstanceUID), str(single.SOPInstanceUID))


def saved_case(pacs: PacsSource | None, reviewed: bool = True) -> int:
    """A case (confirmed 'benign' by Dr Reviewer when `reviewed`) with that PACS source."""
    image, _ = synthetic_image("benign", np.random.default_rng(0))
    with open_store(default_db_path()) as store:
        case = store.save_case(image, image_name="PACS 1-1.dcm", model_name="tiny",
                               model_hash="0" * 64, probabilities={"benign": 0.9},
                               predicted_label="benign", who=person(), pacs=pacs)
        if reviewed:
            store.review_case(case.id, label="benign", who=person("Dr Reviewer"))
    return case.id


def review_page(*roles: str, name: str = "Dr Test") -> AppTest:
    """The Review page listing every case (reviewed ones too)."""
    at = signed_in_app(*roles, name=name)
    at.run()
    at.switch_page("pages/review.py").run()
    at.segmented_control(key="review_view").set_value("all").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_review_shows_the_uids_and_says_why_a_send_failed(userdata, monkeypatch) -> None:
    source = PacsSource("default", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    saved_case(source, reviewed=False)
    at = review_page()
    assert "study `1.2.3` · series `1.2.3.4` · image `1.2.3.4.5`" in texts(at)
    assert not [b for b in at.button if b.label == "Send label to PACS"]  # no PACS configured
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{free_port()}/dicom-web")
    at.run()
    assert not [b for b in at.button if b.label == "Send label to PACS"]  # not reviewed yet
    with open_store(default_db_path()) as store:
        store.review_case(1, label="malignant", who=person("Dr Reviewer"))
    at = review_page()
    button(at, "Send label to PACS").click().run()
    assert not at.exception
    assert "The label was not sent to the PACS" in texts(at) and "cannot be reached" in texts(at)
    monkeypatch.setenv(URL_ENV, "")
    monkeypatch.setenv(CONFIG_ENV, str(userdata / "missing.json"))
    at.run()
    assert "cannot be read" in texts(at) and not at.exception


def test_the_send_button_is_only_for_cases_from_the_pacs(userdata, monkeypatch) -> None:
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{free_port()}/dicom-web")
    saved_case(PacsSource("default", "1.2.3", "1.2.3.4", "1.2.3.4.5"))
    saved_case(None)
    at = review_page("clinician")
    at.selectbox(key="review_case").set_value(1).run()
    assert [b for b in at.button if b.label == "Send label to PACS"]
    at.selectbox(key="review_case").set_value(2).run()
    assert "From the PACS" not in texts(at)
    assert not [b for b in at.button if b.label == "Send label to PACS"]


def test_review_sends_the_confirmed_label_to_the_study(userdata, monkeypatch, orthanc) -> None:
    study = us_study(accession="ACC-REVIEW")
    pacs = Pacs(orthanc.endpoint)
    pacs.store(study, str(study[0].StudyInstanceUID))
    monkeypatch.setenv(URL_ENV, orthanc.endpoint.url)
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, orthanc.endpoint.password or "")
    single = study[0]
    case_id = saved_case(PacsSource("default", str(single.StudyInstanceUID),
                                    str(single.SeriesInstanceUID), str(single.SOPInstanceUID)))
    at = review_page("clinician", name="Dr Sender")
    button(at, "Send label to PACS").click().run()
    assert not at.exception and not at.error
    assert "The label benign was sent to the PACS" in texts(at)
    with open_store(default_db_path()) as store:
        last = store.history(case_id)[-1]
    assert (last.action, last.who, last.new_value) == (SENT_ACTION, "Dr Sender", "benign")
    sr = next(s for s in pacs.series(str(single.StudyInstanceUID)) if s.modality == "SR")
    (instance,) = pacs.instances(sr.study_uid, sr)
    back = read_finding(pacs.retrieve(sr.study_uid, sr.series_uid, instance.sop_uid))
    assert (back.label, back.confirmed_by) == ("benign", "Dr Reviewer")
    at = review_page("clinician")
    assert "was sent to the PACS by Dr Sender" in texts(at)
    assert [b for b in at.button if b.label == "Send label to PACS again"]


def test_admins_add_change_and_remove_a_pacs_on_the_account_page(userdata, tmp_path) -> None:
    at = signed_in_app("clinician", name="clin").run()
    at.switch_page("pages/account.py").run()
    assert "PACS archives" not in [s.value for s in at.subheader]

    at = signed_in_app("admin", name="root").run()
    at.switch_page("pages/account.py").run()
    assert "PACS archives" in [s.value for s in at.subheader]
    labels = [t.label for t in at.text_input]
    assert "User" not in labels and "Password" not in labels  # sign-in "None": no fields
    assert not any(label.startswith("CA bundle") for label in labels)
    next(r for r in at.radio if r.label == "Sign-in").set_value("basic").run()
    fields = {t.label: t for t in at.text_input}
    fields["Name"].input("ward")
    fields["QIDO-RS base URL (search)"].input("https://pacs.example/dw")
    fields["User"].input("bus")
    fields["Password"].input("pw-secret-1")
    button(at, "Save PACS").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    saved = json.loads((data_dir() / SAVED_FILE).read_text())["endpoints"]
    assert [(e["name"], e["url"], e["user"], e["password"]) for e in saved] == [
        ("ward", "https://pacs.example/dw", "bus", "pw-secret-1")]

    at.selectbox(key="pacs_settings_choice").set_value("ward").run()
    assert not at.exception
    fields = {t.label: t for t in at.text_input}
    assert fields["Password"].value == ""  # never shown again
    assert "pw-secret-1" not in repr([t.value for t in at.text_input]) + texts(at)
    tls = next(r for r in at.radio if r.label == "TLS certificates")
    tls.set_value(tls.options[1]).run()
    fields = {t.label: t for t in at.text_input}
    fields["Name"].input("ward A")
    fields["CA bundle (a file on the server)"].input(str(tmp_path / "missing.pem"))
    button(at, "Save PACS").click().run()
    assert "There is no CA bundle file" in texts(at) and not at.exception
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    next(t for t in at.text_input if t.label.startswith("CA bundle")).input(str(bundle))
    button(at, "Save PACS").click().run()
    assert not at.exception and not at.error
    saved = json.loads((data_dir() / SAVED_FILE).read_text())["endpoints"]
    assert [(e["name"], e["password"], e["verify"]) for e in saved] == [
        ("ward A", "pw-secret-1", str(bundle))]

    at.selectbox(key="pacs_settings_choice").set_value("ward A").run()
    button(at, "Remove ward A").click().run()
    assert not at.exception
    assert json.loads((data_dir() / SAVED_FILE).read_text())["endpoints"] == []
