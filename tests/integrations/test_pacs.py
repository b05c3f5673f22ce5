"""bus_core.integrations.pacs.client and `python -m bus_core pacs` against a real Orthanc
(tests/orthanc.py): find -> fetch -> predict -> send SC + SR -> find them again -> read the SR back,
and the messages for a wrong password, a server that is down, a study without ultrasound and a
compression nothing here decodes."""

from __future__ import annotations

import io
import json
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import urllib3
from PIL import Image

import bus_core.cli.main as cli
from bus_core.clinic.cases import PacsSource, open_store
from bus_core.data import images as image_io
from bus_core.data.images import load_image
from bus_core.errors import InvalidImageError
from bus_core.inference.predict import Predictor
from bus_core.integrations.pacs.client import (
    SENT_ACTION,
    InstanceRef,
    Pacs,
    send_result,
    send_review,
)
from bus_core.integrations.pacs.dicom import Finding, read_finding
from bus_core.integrations.pacs.endpoints import (
    CONFIG_ENV,
    PASSWORD_ENV,
    SAVED_FILE,
    URL_ENV,
    USER_ENV,
    VERIFY_ENV,
    Endpoint,
    PacsError,
    delete_endpoint,
    endpoint,
    endpoint_from_form,
    endpoints,
    save_endpoint,
    saved_endpoints,
)
from bus_core.roles import PermissionDeniedError
from tests.conftest import ADMIN, person
from tests.data.test_images import deflated_dicom_bomb
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


def test_the_form_splits_three_service_urls_of_one_server(tmp_path: Path) -> None:
    same = endpoint_from_form(" main ", "https://pacs.example/dicom-web/")
    assert (same.name, same.url, same.qido_prefix, same.auth) == (
        "main", "https://pacs.example/dicom-web", None, "none")
    split = endpoint_from_form("split", "https://pacs.example:8443/dw/qido-rs",
                               "https://pacs.example:8443/dw/wado-rs",
                               "https://pacs.example:8443/dw/stow/rs", auth="bearer",
                               secret="tok-1", verify=False)
    assert (split.url, split.qido_prefix, split.wado_prefix, split.stow_prefix) == (
        "https://pacs.example:8443/dw", "qido-rs", "wado-rs", "stow/rs")
    assert [split.service_url(s) for s in ("qido", "wado", "stow")] == [
        "https://pacs.example:8443/dw/qido-rs", "https://pacs.example:8443/dw/wado-rs",
        "https://pacs.example:8443/dw/stow/rs"]
    assert (split.auth, split.token, split.user, split.verify) == ("bearer", "tok-1", None, False)
    # an empty secret keeps the saved one of the same kind; another kind needs its own
    kept = endpoint_from_form("split", split.service_url("qido"), auth="bearer", previous=split)
    assert kept.token == "tok-1"
    with pytest.raises(PacsError, match="needs a password"):
        endpoint_from_form("split", "https://pacs.example", auth="basic", user="u",
                           previous=split)
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert endpoint_from_form("ca", "https://p", verify=str(bundle)).verify == str(bundle)
    for args, kwargs, message in [
            (("", "https://p"), {}, "name"),
            (("x", "ftp://p/dw"), {}, "not a DICOMweb base URL"),
            (("x", "https://u:pw@p/dw"), {}, "without a query or credentials"),
            (("x", "https://p/dw?a=1"), {}, "without a query"),
            (("x", "https://p/dw", "https://q/dw"), {}, "on one server"),
            (("x", "https://p"), {"auth": "basic", "secret": "pw"}, "user name"),
            (("x", "https://p"), {"auth": "bearer"}, "token"),
            (("x", "https://p"), {"auth": "kerberos"}, "Unknown sign-in"),
            (("x", "https://p"), {"verify": str(tmp_path / "none.pem")}, "no CA bundle")]:
        with pytest.raises(PacsError, match=message):
            endpoint_from_form(*args, **kwargs)


def test_admins_save_change_and_remove_endpoints_in_the_data_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(URL_ENV, "https://server.example/dw")
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    first = endpoint_from_form("ward", "https://pacs.example/dw", auth="basic", user="bus",
                               secret="pw-secret")
    with pytest.raises(PermissionDeniedError):
        save_endpoint(first, who=person(), folder=tmp_path)
    save_endpoint(first, who=ADMIN, folder=tmp_path)
    path = tmp_path / SAVED_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["endpoints"][0]["password"] == "pw-secret"
    assert [e.name for e in endpoints(folder=tmp_path)] == ["default", "ward"]
    with pytest.raises(PacsError, match="already a PACS called"):
        save_endpoint(first, who=ADMIN, folder=tmp_path)
    with pytest.raises(PacsError, match="set on the server"):
        save_endpoint(Endpoint("default", "https://x"), who=ADMIN, folder=tmp_path)
    renamed = endpoint_from_form("ward 2", "https://pacs.example/dw", auth="basic", user="bus",
                                 previous=first)
    save_endpoint(renamed, who=ADMIN, replacing="ward", folder=tmp_path)
    assert saved_endpoints(tmp_path) == [renamed] and renamed.password == "pw-secret"
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(PermissionDeniedError):
        delete_endpoint("ward 2", who=person(), folder=tmp_path)
    assert delete_endpoint("ward 2", who=ADMIN, folder=tmp_path) == []
    with pytest.raises(PacsError, match="no PACS called"):
        delete_endpoint("ward 2", who=ADMIN, folder=tmp_path)
    path.write_text("{not json")
    with pytest.raises(PacsError, match="cannot be read"):
        endpoints(folder=tmp_path)


@pytest.mark.parametrize("target, header, auth, verify", [
    (Endpoint("b", "https://pacs.example/dw", token="tok-9", verify=False),
     "Bearer tok-9", None, False),
    (Endpoint("u", "https://pacs.example/dw", user="bus", password="pw", verify="/etc/ca.pem"),
     None, ("bus", "pw"), "/etc/ca.pem"),
    (Endpoint("n", "https://pacs.example/dw"), None, None, "/env/ca.pem")])
def test_requests_carry_the_sign_in_and_the_tls_setting(monkeypatch: pytest.MonkeyPatch,
                                                        target, header, auth, verify) -> None:
    """What the DICOMweb session sends, without a network: the bearer header or basic
    credentials, and the endpoint's TLS setting (off or its CA bundle) even when the
    environment names a CA bundle, which is used when the endpoint just verifies."""
    import base64

    import requests

    sent: list[tuple[requests.PreparedRequest, object]] = []

    def send(session, request, **kwargs):
        sent.append((request, kwargs.get("verify")))
        response = requests.Response()
        response.status_code = 200
        response.raw = urllib3.HTTPResponse(io.BytesIO(b"[]"), preload_content=False)
        response.headers["content-type"] = "application/dicom+json"
        response.request, response.url = request, request.url
        return response

    monkeypatch.setattr(requests.Session, "send", send)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/env/ca.pem")
    assert Pacs(target).find_studies(patient_id="P1") == []
    request, used = sent[0]
    assert request.url.startswith("https://pacs.example/dw/studies?") and used == verify
    if header:
        assert request.headers["Authorization"] == header
    elif auth:
        token = base64.b64encode(":".join(auth).encode()).decode()
        assert request.headers["Authorization"] == f"Basic {token}"
    else:
        assert "Authorization" not in request.headers


class Misbehaving(BaseHTTPRequestHandler):
    """A DICOMweb server gone wrong: GET /<kind>/studies answers as `ANSWERS[kind]` says."""

    bomb = b""

    def do_GET(self) -> None:
        kind = self.path.strip("/").split("/")[0]
        self.send_response(200)
        if kind == "bomb":  # WADO-RS: one deflated DICOM file that inflates to 64 MiB
            self.send_header("Content-Type",
                             'multipart/related; type="application/dicom"; boundary=part')
            self.end_headers()
            self.wfile.write(b"--part\r\nContent-Type: application/dicom\r\n\r\n" + self.bomb
                             + b"\r\n--part--\r\n")
            return
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        if kind == "trickle":  # one byte at a time, for far longer than the deadline
            for byte in b'[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]':
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.wfile.write(ANSWERS[kind])

    def log_message(self, *args: object) -> None:
        pass


ANSWERS = {
    "huge": b"[" + b",".join([b"{}"] * 100_000) + b"]",
    "text": b'"studies"',
    "null": b"null",
    "numbers": b"[1, 2, 3]",
    "no-uid": b'[{"00080020": {"vr": "DA", "Value": ["20260101"]}}]',
    "not-dicom": b'[{"hello": "world"}]',
}


@pytest.fixture(scope="module")
def misbehaving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a `Misbehaving` server on 127.0.0.1."""
    Misbehaving.bomb = deflated_dicom_bomb(tmp_path_factory.mktemp("bomb") / "bomb.dcm",
                                           64 << 20).read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_huge_answer_is_cut_off_at_its_cap(misbehaving: str) -> None:
    pacs = Pacs(Endpoint("huge", f"{misbehaving}/huge"), max_json_bytes=64 << 10)
    with pytest.raises(PacsError, match="larger than 65,536 bytes"):
        pacs.find_studies()


def test_a_deflated_dicom_bomb_is_refused_before_it_inflates(
        misbehaving: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_io, "MAX_INFLATED_BYTES", 16 << 20)
    pacs = Pacs(Endpoint("bomb", f"{misbehaving}/bomb"))
    tracemalloc.start()
    try:
        with pytest.raises(PacsError, match="larger than 16,777,216 bytes"):
            pacs.fetch(InstanceRef("1.2", "1.2.3", "1.2.3.4"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20


def test_a_trickling_answer_is_cut_off_at_its_deadline(misbehaving: str) -> None:
    pacs = Pacs(Endpoint("trickle", f"{misbehaving}/trickle"), timeout=2, deadline=0.5)
    with pytest.raises(PacsError, match="did not finish answering about studies within 0.5 s"):
        pacs.find_studies()


@pytest.mark.parametrize("kind", ["text", "null", "numbers", "no-uid", "not-dicom"])
def test_an_answer_of_the_wrong_shape_is_a_sentence(misbehaving: str, kind: str) -> None:
    with pytest.raises(PacsError, match="about studies could not be read"):
        Pacs(Endpoint(kind, f"{misbehaving}/{kind}")).find_studies()


def test_a_malformed_address_is_a_sentence() -> None:
    with pytest.raises(PacsError, match="is not a URL"):
        Pacs(Endpoint("bad", "pacs.example/dicom-web"))


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


def test_a_reviewed_case_from_the_pacs_sends_its_label(orthanc, stored, tmp_path) -> None:
    pacs = Pacs(orthanc.endpoint)
    header = pacs.fetch(pacs.ultrasound_instances(stored["us"])[0]).header
    source = PacsSource(orthanc.endpoint.name, str(header.StudyInstanceUID),
                        str(header.SeriesInstanceUID), str(header.SOPInstanceUID))
    with open_store(tmp_path / "cases.sqlite") as store:
        image = np.zeros((16, 16, 3), np.uint8)
        case = store.save_case(image, image_name="PACS 2-1.dcm", model_name="tiny-test",
                               model_hash="ab" * 32, probabilities={"benign": 1.0},
                               predicted_label="benign", who=person(), pacs=source)
        other = store.save_case(image + 1, image_name="scan.png", model_name="tiny-test",
                                model_hash="ab" * 32, probabilities={"benign": 1.0},
                                predicted_label="benign", who=person())
        with pytest.raises(PacsError, match="no confirmed label yet"):
            send_review(pacs, store, case, who=person())
        case = store.review_case(case.id, label="malignant", who=person("Dr Reviewer"))
        other = store.review_case(other.id, label="benign", who=person("Dr Reviewer"))
        with pytest.raises(PacsError, match="not opened from a PACS"):
            send_review(pacs, store, other, who=person())
        with pytest.raises(PermissionDeniedError):
            send_review(pacs, store, case, who=person("Teacher", "educator"))
        sent = send_review(pacs, store, case, who=person("Dr Sender"))
        back = read_finding(pacs.retrieve(source.study_uid, sent.series_uids[0],
                                          sent.sop_uids[0]))
        assert (back.label, back.confirmed_by, back.model) == (
            "malignant", "Dr Reviewer", "tiny-test")
        assert back.model_version == "sha256:" + "ab" * 8
        last = store.history(case.id)[-1]
        assert (last.action, last.who, last.new_value) == (SENT_ACTION, "Dr Sender",
                                                           "malignant")
        missing = store.save_case(image + 2, image_name="x.dcm", model_name="m",
                                  model_hash="ab" * 32, probabilities={"benign": 1.0},
                                  predicted_label="benign", who=person(),
                                  pacs=PacsSource("x", "1.2.3", "1.2.3.4", "1.2.3.4.5"))
        missing = store.review_case(missing.id, label="benign", who=person())
        with pytest.raises(PacsError, match="does not have"):
            send_review(pacs, store, missing, who=person())
        assert store.history(missing.id)[-1].action != SENT_ACTION


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
