"""The hospital archive over DICOMweb: find studies (QIDO-RS), fetch ultrasound instances
(WADO-RS) as DICOM Part 10 bytes for `images.load_image`, and store results back (STOW-RS) as a
Secondary Capture of the report image and a Comprehensive SR, each in a new series of the
source study and linked to the source instance.

Endpoints (bus_core.integrations.pacs.endpoints) are set by an administrator: one from the
environment (`BUS_DICOMWEB_URL`,
`BUS_DICOMWEB_USER` + `BUS_DICOMWEB_PASSWORD` or `BUS_DICOMWEB_TOKEN`, `BUS_DICOMWEB_VERIFY`:
'0' to skip TLS verification or the path of a CA bundle) and any number more from the JSON
file named by `BUS_DICOMWEB_CONFIG` (`{"endpoints": [{"name", "url", "user", "password",
"token", "verify", "qido_prefix", "wado_prefix", "stow_prefix"}]}`), and those an
administrator adds in the app (`save_endpoint`), kept in the same format in `SAVED_FILE` of
the data folder (readable by the server's user only).

Every failure of the server or the network raises `PacsError`, a sentence without the
patient's data. The patient's name is never read from a query answer. Answers are read with a
size cap (`MAX_JSON_BYTES` for query answers, `MAX_ANSWER_BYTES` for anything else, and
`images.MAX_INFLATED_BYTES` for a deflated DICOM file once inflated) and an overall deadline per
request (`DEADLINE_SECONDS`), and a query answer of the wrong shape is a `PacsError` too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from requests.auth import HTTPBasicAuth

from bus_core import roles
from bus_core.data import images as image_io
from bus_core.errors import InvalidImageError
from bus_core.integrations.pacs.dicom import (
    Finding,
    int_of,
    model_version,
    secondary_capture,
    structured_report,
    value_of,
)
from bus_core.integrations.pacs.endpoints import VERIFY_ENV, Endpoint, PacsError
from bus_core.roles import Identity

if TYPE_CHECKING:
    from bus_core.clinic.cases import Case, CaseStore

MAX_JSON_BYTES = 16 << 20
"""Largest query answer (JSON) read from a PACS: 16 MiB, thousands of studies."""
MAX_ANSWER_BYTES = 512 << 20
"""Largest answer of any other kind (an instance, a rendered thumbnail): 512 MiB."""
DEADLINE_SECONDS = 120.0
"""Longest one request may take from sending it to the last byte of its answer."""
SENT_ACTION = "sent to PACS"
"""The case audit action of a confirmed label sent to the case's PACS study."""

ULTRASOUND = "US"
US_IMAGE_STORAGE = ("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",
                    "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3")
"""Ultrasound Image and Ultrasound Multi-frame Image Storage (current and retired)."""


# --- what the archive holds ----------------------------------------------------------------

@dataclass(frozen=True)
class StudyInfo:
    """A study as QIDO-RS lists it (no patient name)."""

    study_uid: str
    patient_id: str
    accession: str
    date: str
    description: str
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int


@dataclass(frozen=True)
class SeriesInfo:
    """A series of a study."""

    study_uid: str
    series_uid: str
    modality: str
    number: int | None
    description: str
    instance_count: int


@dataclass(frozen=True)
class InstanceRef:
    """One instance of a series: its UIDs, number and number of frames."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str = ""
    number: int | None = None
    frames: int = 1
    series_number: int | None = None

    @property
    def label(self) -> str:
        """A name for the image that says nothing about the patient, e.g. 'PACS 2-1.dcm'."""
        series = "?" if self.series_number is None else self.series_number
        number = self.number if self.number is not None else self.sop_uid.rsplit(".", 1)[-1]
        return f"PACS {series}-{number}.dcm"


@dataclass(frozen=True)
class Fetched:
    """A retrieved instance: its DICOM Part 10 bytes (for `images.load_image`) and its header."""

    ref: InstanceRef
    data: bytes
    header: Dataset = field(repr=False)


@dataclass(frozen=True)
class Sent:
    """What STOW-RS stored: the SOP instance UIDs and series UIDs of the new objects."""

    study_uid: str
    sop_uids: tuple[str, ...]
    series_uids: tuple[str, ...]


def _datasets(answer: Any, *required: str) -> list[Dataset]:
    """The datasets of a QIDO-RS answer; `ValueError` unless it is a list of DICOM JSON objects
    that each have the `required` attributes."""
    if not isinstance(answer, list) or not all(isinstance(item, Mapping) for item in answer):
        raise ValueError("a QIDO-RS answer is a list of DICOM JSON objects")
    try:
        found = [Dataset.from_json(dict(item)) for item in answer]
    except (TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"not DICOM JSON: {exc}") from exc
    if any(not ds.get(keyword) for ds in found for keyword in required):
        raise ValueError(f"an answer item lacks one of {', '.join(required)}")
    return found


def _date(value: dt.date | None) -> str:
    return "" if value is None else value.strftime("%Y%m%d")


# --- the client ----------------------------------------------------------------------------

class AnswerTooLarge(Exception):
    """A PACS answer passed its size cap (the cap in bytes is the argument)."""


class AnswerTooSlow(Exception):
    """A PACS answer did not end within its deadline (the deadline in seconds is the argument)."""


def _bounded_session(max_json_bytes: int, max_bytes: int, deadline: float) -> Any:
    """A requests session that reads each answer itself: at most `max_json_bytes` of JSON and
    `max_bytes` of anything else, done within `deadline` seconds of sending the request (each
    read waits at most the request's timeout, so a trickling server is cut off soon after)."""
    class BoundedSession(requests.Session):
        def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            started = time.monotonic()
            kwargs["stream"] = True
            response = super().send(request, **kwargs)
            try:
                is_json = "json" in response.headers.get("Content-Type", "")
                _read_bounded(response, max_json_bytes if is_json else max_bytes,
                              started + deadline, deadline)
            except BaseException:
                response.close()
                raise
            return response

    return BoundedSession()


def _read_bounded(response: Any, limit: int, until: float, deadline: float) -> None:
    """Read the body of a streamed `response` into its content, up to `limit` bytes and
    `until` (a time.monotonic() value)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise AnswerTooLarge(limit)
    body = bytearray()
    while chunk := response.raw.read1(1 << 16, decode_content=True):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(limit)
        if time.monotonic() > until:
            raise AnswerTooSlow(deadline)
    if DeflatedExplicitVRLittleEndian.encode() in body:
        _check_deflated_files(body)
    response._content, response._content_consumed = bytes(body), True
    response.raw.release_conn()


def _check_deflated_files(body: bytes | bytearray) -> None:
    """Refuse an answer holding a deflated DICOM file that inflates past
    `images.MAX_INFLATED_BYTES` (dicomweb-client has pydicom inflate it whole)."""
    start = body.find(b"DICM", 128)
    while start != -1:
        try:
            image_io.check_inflated_size(io.BytesIO(body[start - 128:]), "An image")
        except InvalidImageError as exc:
            raise AnswerTooLarge(image_io.MAX_INFLATED_BYTES) from exc
        start = body.find(b"DICM", start + 4)


class Pacs:
    """A DICOMweb client for one endpoint (dicomweb-client over a requests session)."""

    def __init__(self, target: Endpoint, timeout: float = 20, *,
                 max_json_bytes: int = MAX_JSON_BYTES, max_answer_bytes: int = MAX_ANSWER_BYTES,
                 deadline: float = DEADLINE_SECONDS) -> None:
        self.endpoint = target
        session = _bounded_session(max_json_bytes, max_answer_bytes, deadline)
        if target.user:
            session.auth = HTTPBasicAuth(target.user, target.password or "")
        session.verify = target.verify
        if target.verify is not True:
            # else requests puts REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the setting's place;
            # proxies still come from the environment
            session.trust_env = False
            session.proxies = requests.utils.get_environ_proxies(target.url)
        headers = {"Authorization": f"Bearer {target.token}"} if target.token else None
        try:
            self.client = DICOMwebClient(target.url, session=session, headers=headers,
                                         qido_url_prefix=target.qido_prefix,
                                         wado_url_prefix=target.wado_prefix,
                                         stow_url_prefix=target.stow_prefix, timeout=timeout)
        except ValueError as exc:
            raise PacsError(f"The address of the PACS '{target.name}' ({target.url}) is not "
                            "a URL: ask an administrator.") from exc
        self.client.set_http_retry_params(retry=False)

    @contextlib.contextmanager
    def _asking(self, what: str) -> Iterator[None]:
        """Turn the errors of one request about `what` into `PacsError` sentences."""
        where = f"the PACS '{self.endpoint.name}' ({self.endpoint.url})"
        try:
            yield
        except AnswerTooLarge as exc:
            raise PacsError(f"The answer of {where} about {what} is larger than "
                            f"{exc.args[0]:,} bytes, more than this app reads: narrow the "
                            "search, or ask an administrator to check the PACS.") from exc
        except AnswerTooSlow as exc:
            raise PacsError(f"{where[0].upper()}{where[1:]} did not finish answering about "
                            f"{what} within {exc.args[0]:g} seconds: try again later.") from exc
        except requests.exceptions.SSLError as exc:
            raise PacsError(f"The TLS certificate of {where} could not be verified: ask an "
                            f"administrator to set {VERIFY_ENV} to the hospital's CA bundle."
                            ) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise PacsError(f"{where[0].upper()}{where[1:]} cannot be reached: check the "
                            "address and the network, or try again later.") from exc
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                raise PacsError(f"{where[0].upper()}{where[1:]} refused the credentials: ask "
                                "an administrator to check the user name and password or "
                                "token.") from exc
            if status == 404:
                raise PacsError(f"{where[0].upper()}{where[1:]} does not have {what}.") from exc
            raise PacsError(f"{where[0].upper()}{where[1:]} answered HTTP {status} when asked "
                            f"for {what}.") from exc
        except (requests.exceptions.RequestException, ValueError, KeyError,
                pydicom.errors.InvalidDicomError) as exc:
            raise PacsError(f"The answer of {where} about {what} could not be read.") from exc

    def find_studies(self, *, patient_id: str = "", accession: str = "",
                     date_from: dt.date | None = None, date_to: dt.date | None = None,
                     modality: str = ULTRASOUND, limit: int = 100) -> list[StudyInfo]:
        """The studies matching every given criterion, newest first (at most `limit`)."""
        filters: dict[str, Any] = {}
        if patient_id.strip():
            filters["PatientID"] = patient_id.strip()
        if accession.strip():
            filters["AccessionNumber"] = accession.strip()
        if date_from or date_to:
            filters["StudyDate"] = f"{_date(date_from)}-{_date(date_to)}"
        if modality:
            filters["ModalitiesInStudy"] = modality
        fields = ["StudyDescription", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances", "ModalitiesInStudy"]
        with self._asking("studies"):
            found = _datasets(self.client.search_for_studies(
                search_filters=filters, fields=fields, limit=limit), "StudyInstanceUID")
        studies = [StudyInfo(str(ds.StudyInstanceUID), str(value_of(ds, "PatientID")),
                             str(value_of(ds, "AccessionNumber")), str(value_of(ds, "StudyDate")),
                             str(value_of(ds, "StudyDescription")),
                             tuple(str(m) for m in _modalities(ds)),
                             int_of(ds, "NumberOfStudyRelatedSeries") or 0,
                             int_of(ds, "NumberOfStudyRelatedInstances") or 0)
                   for ds in found]
        return sorted(studies, key=lambda s: s.date, reverse=True)

    def series(self, study_uid: str) -> list[SeriesInfo]:
        """The series of a study, by series number."""
        with self._asking("this study"):
            answer = _datasets(self.client.search_for_series(
                study_uid, fields=["SeriesDescription", "NumberOfSeriesRelatedInstances"]),
                "SeriesInstanceUID")
        found = [SeriesInfo(study_uid, str(ds.SeriesInstanceUID), str(value_of(ds, "Modality")),
                            int_of(ds, "SeriesNumber"), str(value_of(ds, "SeriesDescription")),
                            int_of(ds, "NumberOfSeriesRelatedInstances") or 0)
                 for ds in answer]
        return sorted(found, key=lambda s: (s.number is None, s.number or 0))

    def instances(self, study_uid: str, series: SeriesInfo | str) -> list[InstanceRef]:
        """The instances of a series, by instance number."""
        series_uid = series if isinstance(series, str) else series.series_uid
        number = None if isinstance(series, str) else series.number
        with self._asking("this series"):
            answer = _datasets(self.client.search_for_instances(
                study_uid, series_uid, fields=["NumberOfFrames"]), "SOPInstanceUID")
        found = [InstanceRef(study_uid, series_uid, str(ds.SOPInstanceUID),
                             str(value_of(ds, "SOPClassUID")), int_of(ds, "InstanceNumber"),
                             int_of(ds, "NumberOfFrames") or 1, number)
                 for ds in answer]
        return sorted(found, key=lambda i: (i.number is None, i.number or 0))

    def ultrasound_instances(self, study_uid: str) -> list[InstanceRef]:
        """Every ultrasound image of a study; `PacsError` when it has none."""
        found = [instance for series in self.series(study_uid)
                 if series.modality == ULTRASOUND
                 for instance in self.instances(study_uid, series) if is_ultrasound(instance)]
        if not found:
            raise PacsError("This study has no ultrasound images (modality US) to read.")
        return found

    def fetch(self, ref: InstanceRef) -> Fetched:
        """The instance as stored (any transfer syntax), as DICOM Part 10 bytes; whether its
        pixels can be decoded is `images.load_image`'s to say."""
        with self._asking("this image"):
            dataset = self.client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        header = Dataset({element.tag: element for element in dataset
                          if element.keyword != "PixelData"})
        return Fetched(ref, buffer.getvalue(), header)

    def thumbnail(self, ref: InstanceRef) -> bytes | None:
        """A small JPEG rendered by the server, or None when it renders none."""
        try:
            with self._asking("a thumbnail"):
                return bytes(self.client.retrieve_instance_rendered(
                    ref.study_uid, ref.series_uid, ref.sop_uid, media_types=("image/jpeg",)))
        except PacsError:
            return None

    def store(self, datasets: Sequence[Dataset], study_uid: str) -> Sent:
        """Store new objects in the study `study_uid` (STOW-RS); `PacsError` when the server
        refuses any of them. Each is sent as a DICOM file (preamble and 'DICM' prefix), which
        is how archives give it back."""
        for dataset in datasets:
            if not getattr(dataset, "preamble", None):
                dataset.preamble = b"\x00" * 128
        with self._asking("new objects of this study"):
            answer = self.client.store_instances(list(datasets), study_uid)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise PacsError(f"The PACS refused {len(failed)} of the {len(datasets)} objects "
                            "sent (failure reason "
                            f"{failed[0].get('FailureReason', 'not given')}).")
        return Sent(study_uid, tuple(str(ds.SOPInstanceUID) for ds in datasets),
                    tuple(str(ds.SeriesInstanceUID) for ds in datasets))

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
        """An instance as a pydicom dataset (e.g. a stored SR to read back)."""
        with self._asking("this object"):
            return self.client.retrieve_instance(study_uid, series_uid, sop_uid)


def _modalities(ds: Dataset) -> list[str]:
    value = ds.get("ModalitiesInStudy")
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


# --- what is sent back ---------------------------------------------------------------------


def send_result(pacs: Pacs, source: Dataset, finding: Finding, report_png: bytes | None,
                *, who: Identity) -> Sent:
    """Store `finding` for the image `source` in its study: the report image as a Secondary
    Capture (when given) and the SR, each in a new series. Needs the 'save_case' action."""
    roles.require(who, "save_case")
    objects = [structured_report(source, finding)]
    if report_png is not None:
        objects.insert(0, secondary_capture(source, report_png))
    return pacs.store(objects, str(source.StudyInstanceUID))


def send_review(pacs: Pacs, store: CaseStore, case: Case, *, who: Identity) -> Sent:
    """Store the confirmed label of `case` (opened from this archive) as a Comprehensive SR
    in a new series of its study, naming its reviewer and the model, and add a `SENT_ACTION`
    entry signed by `who` to the case's audit log. Needs the 'review' action; `PacsError` for a
    case without a PACS image or a confirmed label, or a PACS that does not have the image."""
    roles.require(who, "review")
    if case.pacs is None:
        raise PacsError(f"Case {case.id} was not opened from a PACS: there is no study to "
                        "send its label to.")
    if case.confirmed_label is None:
        raise PacsError(f"Case {case.id} has no confirmed label yet: review it first.")
    source = pacs.fetch(InstanceRef(case.pacs.study_uid, case.pacs.series_uid,
                                    case.pacs.sop_uid)).header
    finding = Finding(case.confirmed_label, {}, case.model_name, model_version(case.model_hash),
                      case.uncertain, confirmed_by=case.reviewer)
    sent = pacs.store([structured_report(source, finding)], case.pacs.study_uid)
    store.log_action(case.id, SENT_ACTION, "confirmed_label", case.confirmed_label, who=who)
    return sent


def is_ultrasound(ref: InstanceRef) -> bool:
    """Whether an instance is an ultrasound image by its SOP class (unknown counts as yes)."""
    return not ref.sop_class_uid or UID(ref.sop_class_uid) in US_IMAGE_STORAGE
