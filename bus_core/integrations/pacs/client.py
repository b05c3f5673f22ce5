"""The hospital archive over DICOMweb: find studies (QIDO-RS), fetch ultrasound instances
(WADO-RS) as DICOM Part 10 bytes for `images.load_image`, and store results back (STOW-RS) as a
Secondary Capture of the report image and a Comprehensive SR, each in a new series of the
source study and linked to the source instance.

Endpoints are set by an administrator: one from the environment (`BUS_DICOMWEB_URL`,
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
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from highdicom.sc import SCImage
from highdicom.sr import (
    CodeContentItem,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    PnameContentItem,
    TextContentItem,
)
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid
from requests.auth import HTTPBasicAuth

from bus_core import atomic, roles
from bus_core.data import images as image_io
from bus_core.errors import BusError, InvalidImageError
from bus_core.roles import Identity
from bus_core.settings import data_dir

if TYPE_CHECKING:
    from bus_core.clinic.cases import Case, CaseStore
    from bus_core.inference.predict import Prediction

URL_ENV, USER_ENV = "BUS_DICOMWEB_URL", "BUS_DICOMWEB_USER"
PASSWORD_ENV, TOKEN_ENV = "BUS_DICOMWEB_PASSWORD", "BUS_DICOMWEB_TOKEN"
VERIFY_ENV, CONFIG_ENV = "BUS_DICOMWEB_VERIFY", "BUS_DICOMWEB_CONFIG"
SAVED_FILE = "pacs_endpoints.json"
"""The endpoints administrators add in the app, in the data folder."""
AUTH_KINDS: tuple[str, ...] = ("none", "basic", "bearer")
"""How the app signs in to a PACS: not at all, HTTP basic (user + password), a bearer token."""
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
MANUFACTURER = "bus-classifier (research use, not a medical device)"
RESEARCH_NOTE = ("Research use only. This software is not a medical device: the result "
                 "supports, and never replaces, the reading of a qualified radiologist.")
SC_SERIES_DESCRIPTION = "AI report (research use)"
SR_SERIES_DESCRIPTION = "AI result (research use)"
REVIEW_SERIES_DESCRIPTION = "Confirmed label (research use)"

SCHEME = "99BUSAI"
"""The local coding scheme of the concepts below (DICOM has no codes for them)."""
TITLE = Code("report", SCHEME, "Breast ultrasound AI classification")
REVIEW_TITLE = Code("review", SCHEME, "Breast ultrasound confirmed label")
PREDICTED = Code("predicted", SCHEME, "Predicted class")
CONFIRMED = Code("confirmed", SCHEME, "Confirmed class")
UNCERTAIN = Code("uncertain", SCHEME, "Below the model's certainty threshold")
PROBABILITY = "p"
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
SOURCE = Code("121112", "DCM", "Source of Measurement")
COMMENT = Code("121106", "DCM", "Comment")
OBSERVER = Code("121008", "DCM", "Person Observer Name")
NO_UNITS = Code("1", "UCUM", "no units")
YES, NO = Code("373066001", "SCT", "Yes"), Code("373067005", "SCT", "No")


class PacsError(BusError):
    """The archive cannot be used: unreachable, credentials refused, nothing to read there, or
    an answer that cannot be read."""


# --- settings ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb service: base URL, optional QIDO / WADO / STOW path prefixes below it, HTTP
    basic credentials or a bearer token, and TLS verification (True, False or a CA bundle)."""

    name: str
    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    verify: bool | str = True
    qido_prefix: str | None = None
    wado_prefix: str | None = None
    stow_prefix: str | None = None

    @property
    def auth(self) -> str:
        """How the app signs in (one of `AUTH_KINDS`)."""
        return "bearer" if self.token else "basic" if self.user else "none"

    def service_url(self, service: str) -> str:
        """The base URL of the 'qido', 'wado' or 'stow' service (the URL and its prefix)."""
        prefix = getattr(self, f"{service}_prefix")
        return self.url.rstrip("/") + (f"/{prefix}" if prefix else "")


def _verify(value: Any) -> bool | str:
    """A verify setting: booleans and '0' / 'false' / 'no' / '1' ..., else a CA bundle path."""
    if isinstance(value, bool) or value is None:
        return value is not False
    text = str(value).strip()
    if text.lower() in ("", "1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    return text


def _read_endpoints(path: Path, what: str) -> list[Endpoint]:
    """The endpoints of a settings file (`{"endpoints": [...]}`); `PacsError` naming `what`
    when it cannot be read."""
    try:
        entries = json.loads(path.read_text())["endpoints"]
        return [Endpoint(**{**entry, "verify": _verify(entry.get("verify"))})
                for entry in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PacsError(f"The PACS settings file {what} cannot be read "
                        f"({type(exc).__name__}): ask an administrator.") from exc


def server_endpoints(env: Mapping[str, str] | None = None) -> list[Endpoint]:
    """The endpoints set on the server: the environment's ('default') first, then those of
    the file named by `CONFIG_ENV`. Raises `PacsError` for a file that cannot be read."""
    env = os.environ if env is None else env
    found = []
    if env.get(URL_ENV, "").strip():
        found.append(Endpoint("default", env[URL_ENV].strip(), env.get(USER_ENV) or None,
                              env.get(PASSWORD_ENV) or None, env.get(TOKEN_ENV) or None,
                              _verify(env.get(VERIFY_ENV))))
    config = env.get(CONFIG_ENV, "").strip()
    if config:
        found += _read_endpoints(Path(config), f"named by {CONFIG_ENV}")
    return found


def saved_endpoints(folder: Path | None = None) -> list[Endpoint]:
    """The endpoints administrators added in the app (`SAVED_FILE` of the data folder, or of
    `folder`); `PacsError` when the file cannot be read."""
    path = (data_dir() if folder is None else folder) / SAVED_FILE
    return _read_endpoints(path, f"{path}") if path.exists() else []


def endpoints(env: Mapping[str, str] | None = None,
              folder: Path | None = None) -> list[Endpoint]:
    """Every configured endpoint: the server's (`server_endpoints`), then those added in the
    app (`saved_endpoints`). Raises `PacsError` for a settings file that cannot be read."""
    return server_endpoints(env) + saved_endpoints(folder)


def endpoint_from_form(name: str, qido_url: str, wado_url: str = "", stow_url: str = "", *,
                       auth: str = "none", user: str = "", secret: str = "",
                       verify: bool | str = True, previous: Endpoint | None = None) -> Endpoint:
    """An endpoint from an administrator's form: the QIDO-RS, WADO-RS and STOW-RS base URLs
    (blank WADO / STOW: the QIDO one), which must be on one server (scheme, host and port);
    `auth` one of `AUTH_KINDS` with the user and the password or token in `secret` (blank: the
    `previous` endpoint's secret of that kind, so that a form never shows it); `verify`: True,
    False or the path of a CA bundle. Raises `PacsError` for a value that cannot work."""
    name = name.strip()
    if not name:
        raise PacsError("Give the PACS a name.")
    urls = [u.strip().rstrip("/") for u in (qido_url, wado_url or qido_url, stow_url or qido_url)]
    parts = [urlsplit(u) for u in urls]
    for url, part in zip(urls, parts):
        if part.scheme not in ("http", "https") or not part.hostname or part.query \
                or part.fragment or part.username:
            raise PacsError(f"'{url}' is not a DICOMweb base URL: write it as "
                            "https://host[:port]/path, without a query or credentials.")
    if len({(p.scheme, p.netloc.lower()) for p in parts}) > 1:
        raise PacsError("The QIDO-RS, WADO-RS and STOW-RS addresses must be on one server "
                        "(the same scheme, host and port).")
    paths = [[s for s in p.path.split("/") if s] for p in parts]
    common = 0
    while all(len(p) > common and p[common] == paths[0][common] for p in paths):
        common += 1
    base = f"{parts[0].scheme}://{parts[0].netloc}" + "".join(f"/{s}"
                                                              for s in paths[0][:common])
    qido, wado, stow = ("/".join(p[common:]) or None for p in paths)
    if auth not in AUTH_KINDS:
        raise PacsError(f"Unknown sign-in kind '{auth}': choose {', '.join(AUTH_KINDS)}.")
    if not secret and previous is not None and previous.auth == auth:
        secret = (previous.password if auth == "basic" else previous.token) or ""
    if auth == "basic" and not user.strip():
        raise PacsError("Basic sign-in needs a user name.")
    if auth != "none" and not secret:
        raise PacsError("Basic sign-in needs a password." if auth == "basic"
                        else "Bearer sign-in needs a token.")
    if isinstance(verify, str) and not Path(verify).is_file():
        raise PacsError(f"There is no CA bundle file at '{verify}' on the server.")
    return Endpoint(name, base, user.strip() if auth == "basic" else None,
                    secret if auth == "basic" else None, secret if auth == "bearer" else None,
                    verify, qido, wado, stow)


def save_endpoint(new: Endpoint, *, who: Identity, replacing: str | None = None,
                  folder: Path | None = None) -> list[Endpoint]:
    """Add `new` to the endpoints saved in the app, or put it in place of the one called
    `replacing`; needs the 'manage_pacs' action. The file is written atomically and readable
    by the server's user only. Returns the saved endpoints."""
    roles.require(who, "manage_pacs")
    if new.name in {e.name for e in server_endpoints()}:
        raise PacsError(f"'{new.name}' is the name of a PACS set on the server: choose another "
                        "name.")
    saved = saved_endpoints(folder)
    if new.name != replacing and new.name in {e.name for e in saved}:
        raise PacsError(f"There is already a PACS called '{new.name}'.")
    names = [e.name for e in saved]
    if replacing is not None and replacing not in names:
        raise PacsError(f"There is no PACS called '{replacing}' saved in the app.")
    if replacing is None:
        saved.append(new)
    else:
        saved[names.index(replacing)] = new
    return _write_saved(saved, folder)


def delete_endpoint(name: str, *, who: Identity, folder: Path | None = None) -> list[Endpoint]:
    """Remove the endpoint called `name` from those saved in the app ('manage_pacs')."""
    roles.require(who, "manage_pacs")
    saved = saved_endpoints(folder)
    if name not in {e.name for e in saved}:
        raise PacsError(f"There is no PACS called '{name}' saved in the app.")
    return _write_saved([e for e in saved if e.name != name], folder)


def _write_saved(saved: list[Endpoint], folder: Path | None) -> list[Endpoint]:
    path = (data_dir() if folder is None else folder) / SAVED_FILE
    entries = [{k: v for k, v in asdict(e).items() if v is not None} for e in saved]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # the secrets: created private, and replaced with that mode
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        atomic.write_text(path, json.dumps({"endpoints": entries}, indent=2))
    except OSError as exc:
        raise PacsError(f"The PACS settings cannot be saved in {path.parent}: "
                        f"{exc.strerror or exc}.") from exc
    return saved


def endpoint(name: str | None = None) -> Endpoint:
    """The endpoint called `name` (default: the first configured); `PacsError` if none."""
    configured = endpoints()
    if not configured:
        raise PacsError(f"No PACS is configured: an administrator sets {URL_ENV} (and "
                        f"{USER_ENV} / {PASSWORD_ENV} or {TOKEN_ENV}) or {CONFIG_ENV}.")
    for candidate in configured:
        if name is None or candidate.name == name:
            return candidate
    names = ", ".join(e.name for e in configured)
    raise PacsError(f"There is no PACS called '{name}'; configured: {names}.")


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
class Finding:
    """What is sent back or read back: a class, its calibrated probabilities (none for a
    review), whether the model was uncertain, the model's name and version, and for a
    confirmed review label the reviewer's name."""

    label: str
    probabilities: Mapping[str, float]
    model: str
    model_version: str
    uncertain: bool = False
    confirmed_by: str | None = None


@dataclass(frozen=True)
class Sent:
    """What STOW-RS stored: the SOP instance UIDs and series UIDs of the new objects."""

    study_uid: str
    sop_uids: tuple[str, ...]
    series_uids: tuple[str, ...]


def _value(ds: Dataset, keyword: str, default: Any = "") -> Any:
    value = ds.get(keyword)
    return default if value is None or value == "" else value


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None


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
        studies = [StudyInfo(str(ds.StudyInstanceUID), str(_value(ds, "PatientID")),
                             str(_value(ds, "AccessionNumber")), str(_value(ds, "StudyDate")),
                             str(_value(ds, "StudyDescription")),
                             tuple(str(m) for m in _modalities(ds)),
                             _int(ds, "NumberOfStudyRelatedSeries") or 0,
                             _int(ds, "NumberOfStudyRelatedInstances") or 0)
                   for ds in found]
        return sorted(studies, key=lambda s: s.date, reverse=True)

    def series(self, study_uid: str) -> list[SeriesInfo]:
        """The series of a study, by series number."""
        with self._asking("this study"):
            answer = _datasets(self.client.search_for_series(
                study_uid, fields=["SeriesDescription", "NumberOfSeriesRelatedInstances"]),
                "SeriesInstanceUID")
        found = [SeriesInfo(study_uid, str(ds.SeriesInstanceUID), str(_value(ds, "Modality")),
                            _int(ds, "SeriesNumber"), str(_value(ds, "SeriesDescription")),
                            _int(ds, "NumberOfSeriesRelatedInstances") or 0)
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
                             str(_value(ds, "SOPClassUID")), _int(ds, "InstanceNumber"),
                             _int(ds, "NumberOfFrames") or 1, number)
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

def _series_number(source: Dataset, offset: int) -> int:
    return 9000 + offset + (_int(source, "SeriesNumber") or 0) % 100


def secondary_capture(source: Dataset, report_png: bytes) -> Dataset:
    """A Secondary Capture of the report image in a new series of `source`'s study, with the
    source image named as its source (SourceImageSequence)."""
    pixels = np.asarray(Image.open(io.BytesIO(report_png)).convert("RGB"))
    sc = SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", patient_orientation=("L", "F"),
        series_instance_uid=generate_uid(), series_number=_series_number(source, 1),
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER)
    del sc.PatientOrientation  # a report page has no anatomical orientation
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageComments = RESEARCH_NOTE
    sc.BurnedInAnnotation = "NO"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def structured_report(source: Dataset, finding: Finding) -> Dataset:
    """A Comprehensive SR in a new series of `source`'s study: the class (predicted, or
    confirmed by `finding.confirmed_by`), the calibrated probabilities, whether the model was
    uncertain, the model's name and version, the research-use note and the source image."""
    contains = "CONTAINS"
    review = finding.confirmed_by is not None
    root = ContainerContentItem(REVIEW_TITLE if review else TITLE)
    items: list[Any] = [
        CodeContentItem(CONFIRMED if review else PREDICTED, _class_code(finding.label),
                        relationship_type=contains)]
    items += [NumContentItem(_probability_code(name), float(value), NO_UNITS,
                             relationship_type=contains)
              for name, value in finding.probabilities.items()]
    if not review:
        items.append(CodeContentItem(UNCERTAIN, YES if finding.uncertain else NO,
                                     relationship_type=contains))
    else:
        items.append(PnameContentItem(OBSERVER, _person_name(finding.confirmed_by or ""),
                                      relationship_type=contains))
    items += [TextContentItem(ALGORITHM_NAME, finding.model, relationship_type=contains),
              TextContentItem(ALGORITHM_VERSION, finding.model_version,
                              relationship_type=contains),
              TextContentItem(COMMENT, RESEARCH_NOTE, relationship_type=contains),
              ImageContentItem(SOURCE, source.SOPClassUID, source.SOPInstanceUID,
                               relationship_type=contains)]
    root.ContentSequence = ContentSequence(items)
    sr = ComprehensiveSR(evidence=[source], content=root, series_instance_uid=generate_uid(),
                         series_number=_series_number(source, 3 if review else 2),
                         sop_instance_uid=generate_uid(), instance_number=1,
                         manufacturer=MANUFACTURER, is_complete=True)
    sr.SeriesDescription = REVIEW_SERIES_DESCRIPTION if review else SR_SERIES_DESCRIPTION
    return sr


def _class_code(label: str) -> Code:
    return Code(label, SCHEME, label)


def _probability_code(label: str) -> Code:
    return Code(f"{PROBABILITY}-{label}", SCHEME, f"Probability of {label}")


def _person_name(name: str) -> str:
    """A signer's name as a single-component DICOM person name (the trailing '^' says so)."""
    return name.replace("^", " ").replace("=", " ")[:63] + "^"


def read_finding(sr: Dataset) -> Finding:
    """The finding of an SR made by `structured_report`; `PacsError` for any other SR."""
    try:
        title = sr.ConceptNameCodeSequence[0]
        if title.CodingSchemeDesignator != SCHEME:
            raise ValueError("not ours")
        values: dict[str, Any] = {}
        probabilities: dict[str, float] = {}
        for item in sr.ContentSequence:
            concept = item.ConceptNameCodeSequence[0]
            code = str(concept.get("CodeValue") or concept.LongCodeValue)
            if item.ValueType == "NUM":
                value = float(item.MeasuredValueSequence[0].NumericValue)
                probabilities[code.removeprefix(f"{PROBABILITY}-")] = value
            elif item.ValueType == "CODE":
                values[code] = str(item.ConceptCodeSequence[0].CodeValue)
            elif item.ValueType in ("TEXT", "PNAME"):
                values[code] = str(item.TextValue if item.ValueType == "TEXT"
                                      else item.PersonName).rstrip("^")
    except (AttributeError, IndexError, KeyError, ValueError) as exc:
        raise PacsError("This structured report was not made by this app.") from exc
    label = values.get(PREDICTED.value) or values.get(CONFIRMED.value)
    if label is None:
        raise PacsError("This structured report names no class.")
    return Finding(label=label, probabilities=probabilities,
                   model=values.get(ALGORITHM_NAME.value, ""),
                   model_version=values.get(ALGORITHM_VERSION.value, ""),
                   uncertain=values.get(UNCERTAIN.value) == YES.value,
                   confirmed_by=values.get(OBSERVER.value))


def model_version(weights_sha256: str) -> str:
    """The version of a model named in what is sent: the start of its weights' hash."""
    return f"sha256:{weights_sha256[:16]}"


def prediction_finding(prediction: Prediction, weights_sha256: str) -> Finding:
    """The finding to send for a prediction of the model whose weights hash is given."""
    return Finding(label=prediction.label, probabilities=dict(prediction.probabilities),
                   model=prediction.model, model_version=model_version(weights_sha256),
                   uncertain=prediction.uncertain)


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
