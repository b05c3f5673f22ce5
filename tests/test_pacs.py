"""bus_core.pacs and `python -m bus_core pacs` against a real Orthanc (tests/orthanc.py):
find -> fetch -> predict -> send SC + SR -> find them again -> read the SR back, and the
messages for a wrong password, a server that is down, a study without ultrasound and a
compression nothing here decodes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bus_core import cli
from bus_core.errors import InvalidImageError
from bus_core.io import load_image
from bus_core.pacs import (
    CONFIG_ENV,
    PASSWORD_ENV,
    URL_ENV,
    USER_ENV,
    VERIFY_ENV,
    Endpoint,
    Finding,
    Pacs,
    PacsError,
    endpoint,
    endpoints,
    read_finding,
    send_result,
)
from bus_core.predict import Predictor
from bus_core.roles import PermissionDeniedError
from tests.conftest import person
from tests.orthanc import (  # noqa: F401 - the fixture
    PATIENT_ID,
    PATIENT_NAME,
    USER,
    Orthanc,
    no_ultrasound_study,
    orthanc_fixture,
    undecodable_study,
    us_study,
)


@pytest.fixture(scope="module")
def stored(orthanc: Orthanc) -> dict[str, str]:
    """The three studies in the archive: study UIDs by kind."""
    pacs = Pacs(orthanc.endpoint)
    studies = {"us": us_study(), "mpeg": undecodable_study(), "empty": no_ultrasound_study()}
    for datasets in studies.values():
        pacs.store(datasets, str(datasets[0].StudyInstanceUID))
    return {kind: str(datasets[0].StudyInstanceUID) for kind, datasets in studies.items()}


@pytest.fixture
def pacs_env(orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test Orthanc as the configured PACS, as an administrator sets it."""
    monkeypatch.setenv(URL_ENV, orthanc.endpoint.url)
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, orthanc.endpoint.password or "")
    monkeypatch.delenv(CONFIG_ENV, raising=False)


def png(width: int = 60, height: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_endpoints_from_the_environment_and_a_file(tmp_path: Path) -> None:
    config = tmp_path / "pacs.json"
    config.write_text(json.dumps({"endpoints": [{"name": "second", "url": "https://pacs2/",
                                                 "token": "tok-secret", "verify": "0"}]}))
    found = endpoints({URL_ENV: "https://pacs/dicom-web", USER_ENV: "u", PASSWORD_ENV: "pw-secret",
                       VERIFY_ENV: "/etc/ca.pem", CONFIG_ENV: str(config)})
    assert [(e.name, e.user, e.verify) for e in found] == [("default", "u", "/etc/ca.pem"),
                                                            ("second", None, False)]
    assert "pw-secret" not in repr(found) and "tok-secret" not in repr(found)


def test_no_pacs_configured_says_who_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(PacsError, match=URL_ENV):
        endpoint()


def test_find_lists_the_ultrasound_study_without_the_patient_name(orthanc, stored) -> None:
    studies = Pacs(orthanc.endpoint).find_studies(patient_id=PATIENT_ID, accession="ACC-1")
    assert [s.study_uid for s in studies] == [stored["us"]]
    assert studies[0].modalities == ("US",) and studies[0].instance_count == 3
    assert PATIENT_NAME not in repr(studies)
    import datetime as dt

    pacs = Pacs(orthanc.endpoint)
    assert pacs.find_studies(patient_id=PATIENT_ID, date_from=dt.date(2026, 1, 1)) == []
    assert stored["us"] in {s.study_uid for s in pacs.find_studies(
        date_from=dt.date(2025, 3, 1), date_to=dt.date(2025, 3, 31))}


def test_fetched_images_take_the_upload_path(orthanc, stored) -> None:
    """Single frame with an ultrasound region (cropped), multi-frame (frame choice), YBR."""
    pacs = Pacs(orthanc.endpoint)
    refs = pacs.ultrasound_instances(stored["us"])
    assert [r.frames for r in refs] == [1, 3, 1]
    single, multi, ybr = (pacs.fetch(r) for r in refs)
    assert load_image(single.data).shape == (108, 144, 3)  # the region, not 120 x 160
    assert load_image(multi.data, frame=2).shape == (96, 128, 3)
    colour = load_image(ybr.data)
    assert colour.shape == (100, 100, 3) and np.ptp(colour) > 100
    assert "PixelData" not in single.header and PATIENT_NAME not in single.ref.label
    assert pacs.thumbnail(refs[0]) is not None


def test_round_trip_predict_send_and_read_back(orthanc, stored, tiny_model_dir) -> None:
    pacs = Pacs(orthanc.endpoint)
    ref = pacs.ultrasound_instances(stored["us"])[0]
    fetched = pacs.fetch(ref)
    predictor = Predictor.from_path(tiny_model_dir, device="cpu-fp32")
    prediction = predictor.predict(load_image(fetched.data))
    finding = Finding(prediction.label, prediction.probabilities, prediction.model, "sha:1",
                      prediction.uncertain)
    sent = send_result(pacs, fetched.header, finding, png(), who=person())
    series = {s.series_uid: s for s in pacs.series(stored["us"])}
    assert series[sent.series_uids[0]].modality == "OT"
    assert series[sent.series_uids[1]].modality == "SR"
    sr = pacs.retrieve(stored["us"], sent.series_uids[1], sent.sop_uids[1])
    back = read_finding(sr)
    assert back.label == prediction.label and back.model == "tiny-test"
    assert back.probabilities == pytest.approx(prediction.probabilities)
    reference = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert reference.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]\
        .ReferencedSOPInstanceUID == ref.sop_uid
    sc = pacs.retrieve(stored["us"], sent.series_uids[0], sent.sop_uids[0])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ref.sop_uid
    assert sc.pixel_array.shape == (40, 60, 3) and "not a medical device" in sc.ImageComments
    assert str(sc.PatientID) == PATIENT_ID  # the SC belongs to the patient's study
    # the US images stay what the study offers to read
    assert len(pacs.ultrasound_instances(stored["us"])) == 3


def test_a_confirmed_review_label_is_sent_as_an_sr(orthanc, stored) -> None:
    pacs = Pacs(orthanc.endpoint)
    fetched = pacs.fetch(pacs.ultrasound_instances(stored["us"])[2])
    review = Finding("malignant", {}, "tiny-test", "sha:1", confirmed_by="Dr Test")
    sent = send_result(pacs, fetched.header, review, None, who=person())
    back = read_finding(pacs.retrieve(stored["us"], sent.series_uids[0], sent.sop_uids[0]))
    assert (back.label, back.confirmed_by, back.probabilities) == ("malignant", "Dr Test", {})


def test_sending_needs_the_save_case_role(orthanc, stored) -> None:
    pacs = Pacs(orthanc.endpoint)
    fetched = pacs.fetch(pacs.ultrasound_instances(stored["us"])[0])
    with pytest.raises(PermissionDeniedError):
        send_result(pacs, fetched.header, Finding("benign", {}, "m", "v"), None,
                    who=person("Teacher", "educator"))


def test_wrong_password_is_a_sentence(orthanc) -> None:
    with pytest.raises(PacsError, match="refused the credentials"):
        Pacs(orthanc.with_password("wrong")).find_studies(patient_id=PATIENT_ID)


def test_server_down_is_a_sentence(orthanc) -> None:
    from tests.conftest import free_port

    down = Endpoint("down", f"http://127.0.0.1:{free_port()}/dicom-web", USER, "x")
    with pytest.raises(PacsError, match="cannot be reached"):
        Pacs(down, timeout=3).find_studies()


def test_a_study_without_ultrasound_is_a_sentence(orthanc, stored) -> None:
    with pytest.raises(PacsError, match="no ultrasound images"):
        Pacs(orthanc.endpoint).ultrasound_instances(stored["empty"])


def test_a_compression_we_cannot_decode_is_named(orthanc, stored) -> None:
    pacs = Pacs(orthanc.endpoint)
    fetched = pacs.fetch(pacs.ultrasound_instances(stored["mpeg"])[0])
    with pytest.raises(InvalidImageError, match="MPEG-4"):
        load_image(fetched.data, name=fetched.ref.label)


def test_cli_find_predict_send(orthanc, stored, pacs_env, tiny_model_dir, tmp_path,
                               capsys) -> None:
    assert cli.main(["pacs", "find", "--patient-id", PATIENT_ID, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert stored["us"] in {s["study_uid"] for s in found}
    out = tmp_path / "results.json"
    assert cli.main(["pacs", "predict", "--study", stored["us"], "--model",
                     str(tiny_model_dir), "--device", "cpu-fp32", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert len(results["images"]) == 3 and all("label" in r for r in results["images"])
    capsys.readouterr()
    instance = results["images"][0]["sop_uid"]
    assert cli.main(["pacs", "send", "--study", stored["us"], "--instance", instance,
                     "--model", str(tiny_model_dir), "--device", "cpu-fp32"]) == 0
    assert "sent to the PACS" in capsys.readouterr().out


def test_cli_errors_are_one_line(orthanc, stored, pacs_env, tiny_model_dir, monkeypatch,
                                 capsys) -> None:
    assert cli.main(["pacs", "predict", "--study", stored["empty"], "--model",
                     str(tiny_model_dir)]) == 2
    assert "no ultrasound images" in capsys.readouterr().err
    assert cli.main(["pacs", "predict", "--study", stored["mpeg"], "--model",
                     str(tiny_model_dir)]) == 2
    assert "MPEG-4" in capsys.readouterr().out
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    assert cli.main(["pacs", "find", "--patient-id", PATIENT_ID]) == 2
    err = capsys.readouterr().err
    assert "refused the credentials" in err and "Traceback" not in err
