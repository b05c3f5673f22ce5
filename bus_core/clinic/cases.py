"""The case store: every saved prediction ("case"), its review, and an append-only audit log.

A case is one image with its masks, the model's probabilities and, once a radiologist has
reviewed it, the confirmed label and notes. Confirmed cases become new training data and can be
exported as a BUSI-layout folder.

Storage:
- The database (bus_core.db: SQLite by default, or PostgreSQL) holds the cases' rows
  (bus_core.clinic.schema); images and masks are PNG files stored once per content, under
  `<images dir>/<hash[:2]>/<hash>.png`, where the hash is the sha256 of the pixel array (dtype,
  shape and bytes); the database holds only hashes, so servers sharing a database share the
  images folder too. A case's new files are encoded first and written (atomically) inside its
  transaction, after its rows and just before the commit: a process killed before then leaves
  at most temporary files, which opening the store removes once `PARTIAL_WRITE_AGE_S` old, and
  never a case without its image.
- Every change (a case and its audit entries) is one write transaction.
- The audit logs have no update or delete API; triggers also refuse UPDATE and DELETE.
- The schema is upgraded on opening (`schema.migrate`).
- The BUSI-layout export is bus_core.clinic.export.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image
from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    func,
    insert,
    or_,
    select,
    true,
    update,
)

from bus_core import atomic
from bus_core.clinic.schema import (
    audit_log,
    cases,
    migrate,
    model_decisions,
    read_version,
    studies,
    utc_now,
)
from bus_core.constants import CLASSES, MALIGNANT
from bus_core.data.images import image_to_png_bytes
from bus_core.db import (
    ensure_writable,
    locked,
    open_engine,
    resolve_url,
    sqlite_folder,
    transaction,
    where,
)
from bus_core.errors import InvalidImageError, MaskError, StoreError, plain_storage_message
from bus_core.inference.study import RULES
from bus_core.roles import Identity, require
from bus_core.settings import data_dir, keep_file_names

IMAGES_DIR = "images"
PARTIAL_WRITE_AGE_S = 60.0
"""Temporary files of the images folder this old are left by killed writes and removed."""

CaseStatus = Literal["unreviewed", "confirmed", "corrected", "labelled"]
"""'confirmed' / 'corrected': the reviewer's label equals / differs from the model's reading;
'labelled': the model was uncertain (no answer), so the label is the reviewer's alone."""
STATUSES: tuple[str, ...] = get_args(CaseStatus)
ORDERABLE: tuple[str, ...] = ("created_at", "updated_at", "id", "status", "predicted_label",
                              "confirmed_label", "reviewer", "model_name", "p_malignant")
"""Columns `list_cases` can sort by ('p_malignant': the model's probability of malignancy)."""

MaskSource = Literal["painted", "uploaded", "dataset", "suggested", "suggested, edited"]
MASK_SOURCES: tuple[str, ...] = get_args(MaskSource)
"""Who made a case's masks: painted by the user, uploaded files, a dataset's expert masks, the
segmentation model's outline accepted as is, or that outline edited by the user."""

_EXTENSION = re.compile(r"\.[a-z0-9]{1,5}")
_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PACS_COLUMNS = ("pacs_endpoint", "study_uid", "series_uid", "sop_uid")
"""The columns of a case's `PacsSource`, in its fields' order."""
class CaseNotFoundError(StoreError, LookupError):
    """No case has the given id."""


class InvalidCaseError(StoreError, ValueError):
    """A case or review with a value that cannot be stored (unknown label, no reviewer...)."""


@dataclass(frozen=True)
class PacsSource:
    """Where in the hospital archive a case's image came from: the name of the configured
    PACS (bus_core.integrations.pacs.client) and the DICOM study, series and instance UIDs; never
    the patient's name or ID."""

    endpoint: str
    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class Case:
    """One saved prediction and its review, as stored (times are UTC ISO-8601 strings)."""

    id: int
    created_at: str
    updated_at: str
    image_hash: str
    image_name: str
    mask_hashes: tuple[str, ...]
    combine_mode: str | None
    model_name: str
    model_hash: str
    probabilities: dict[str, float]
    predicted_label: str
    cam_settings: dict[str, Any] | None
    reviewer: str
    confirmed_label: str | None
    notes: str
    status: CaseStatus
    mask_source: MaskSource | None = None
    uncertain: bool = False
    owner: str | None = None
    pacs: PacsSource | None = None
    flagged: bool | None = None
    study_id: int | None = None

    @property
    def display_name(self) -> str:
        """The image's name as shown and exported: its pseudonym, unless the administrator
        keeps file names (`settings.keep_file_names`)."""
        return self.image_name if keep_file_names() else pseudonym(self.image_hash,
                                                                   self.image_name)

    @property
    def label(self) -> str:
        """The confirmed label once reviewed, else the model's prediction."""
        return self.confirmed_label or self.predicted_label

    @property
    def reading(self) -> str:
        """The model's reading as shown: its class, or 'uncertain (leans <class>)'."""
        return f"uncertain (leans {self.predicted_label})" if self.uncertain \
            else self.predicted_label


@dataclass(frozen=True)
class NewCase:
    """One reading to store as a case (`CaseStore.save_case` describes each field)."""

    image: np.ndarray
    image_name: str
    model_name: str
    model_hash: str
    probabilities: Mapping[str, float]
    predicted_label: str
    masks: Sequence[np.ndarray] = ()
    combine_mode: str | None = None
    cam_settings: Mapping[str, Any] | None = None
    mask_source: str | None = None
    uncertain: bool = False
    pacs: PacsSource | None = None
    flagged: bool | None = None


@dataclass(frozen=True)
class StudyReadingRecord:
    """A study's combined reading as stored: the rule that combined its images' probabilities
    (`bus_core.inference.study.RULES`), the result, its top class, whether it is uncertain and
    whether the malignant flag was raised."""

    rule: str
    probabilities: Mapping[str, float]
    predicted_label: str
    uncertain: bool
    flagged: bool


@dataclass(frozen=True)
class Study:
    """Several cases read together as one examination (times are UTC ISO-8601 strings):
    who saved it, with which model, its combined reading, the PACS study it came from (when
    all its images came from one) and its cases' ids in the order they were saved."""

    id: int
    created_at: str
    owner: str
    model_name: str
    model_hash: str
    rule: str
    probabilities: dict[str, float]
    predicted_label: str
    uncertain: bool
    flagged: bool
    pacs_endpoint: str | None
    study_uid: str | None
    case_ids: tuple[int, ...]

    @property
    def reading(self) -> str:
        """The study's reading as shown: its class, or 'uncertain (leans <class>)'."""
        return f"uncertain (leans {self.predicted_label})" if self.uncertain \
            else self.predicted_label


AUDIT_FIELDS: dict[str, str] = {"predicted_label": "model's reading",
                                "confirmed_label": "confirmed class", "status": "status",
                                "reviewer": "reviewer", "notes": "notes"}
"""The fields a case's history records, in the words the pages show."""


@dataclass(frozen=True)
class AuditEntry:
    """One line of a case's history: who did what ('created', 'confirmed', 'corrected' or
    'note') to which field, and the value before and after."""

    id: int
    at: str
    case_id: int
    who: str
    action: str
    field: str | None
    old_value: str | None
    new_value: str | None


def open_store(url_or_path: str | Path | None = None, *,
               images_dir: str | Path | None = None) -> CaseStore:
    """Open (creating and upgrading as needed) the case store.

    `url_or_path` is a SQLite file path, a SQLAlchemy URL ("sqlite:///cases.db",
    "postgresql+psycopg://user@host/db"), or None for `default_database()`. Images go to
    `images_dir`, by default an `images` folder beside a SQLite file, else `<data dir>/images`.
    Raises `StoreError`.
    """
    url = resolve_url(url_or_path)
    folder = sqlite_folder(url)
    if folder is not None:
        ensure_writable(folder)
    images = Path(images_dir).expanduser() if images_dir is not None else (
        folder / IMAGES_DIR if folder is not None else data_dir() / IMAGES_DIR)
    ensure_writable(images)
    engine = open_engine(url)
    store = CaseStore(engine, images)
    try:
        store.migrate()
        store.remove_partial_writes()
    except BaseException:
        engine.dispose()
        raise
    return store


# --- the store -------------------------------------------------------------------------------

class CaseStore:
    """Cases, their image files and their audit log. Safe to share between threads."""

    def __init__(self, engine: Engine, images_dir: Path) -> None:
        """Use `open_store`; this wraps an engine already set up and migrated."""
        self.engine = engine
        self.images_dir = Path(images_dir)

    def __enter__(self) -> CaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold the database lock `name` while the block runs (`db.locked`)."""
        with locked(self.engine, name):
            yield

    # -- schema --

    def schema_version(self) -> int:
        """The database's schema version (0 for an empty database)."""
        with self.transaction() as conn:
            return read_version(conn)

    def migrate(self) -> int:
        """Bring the schema up to CURRENT_SCHEMA_VERSION (`schema.migrate`); returns the
        version reached."""
        return migrate(self.engine)

    def remove_partial_writes(self) -> list[Path]:
        """Remove the temporary files that killed writes left in the images folder (those older
        than `PARTIAL_WRITE_AGE_S`, so writes under way elsewhere are left alone); returns
        them."""
        try:
            return [path for folder in [self.images_dir, *self.images_dir.glob("*/")]
                    for path in atomic.remove_partial_writes(
                        folder, older_than_s=PARTIAL_WRITE_AGE_S)]
        except OSError as exc:
            raise StoreError(f"Cannot clean the images folder {self.images_dir}: "
                             f"{exc.strerror or exc}.") from exc

    # -- writing --

    def save_case(self, image: np.ndarray, *, image_name: str, masks: Sequence[np.ndarray] = (),
                  combine_mode: str | None = None, model_name: str, model_hash: str,
                  probabilities: Mapping[str, float], predicted_label: str,
                  cam_settings: Mapping[str, Any] | None = None, who: Identity,
                  mask_source: str | None = None, uncertain: bool = False,
                  pacs: PacsSource | None = None, flagged: bool | None = None) -> Case:
        """Store a prediction as a new unreviewed case (image and masks first, then the case
        and its 'created' audit entry in one transaction), owned by `who` (role clinician).
        `image_name` is kept only as a pseudonym unless the administrator keeps file names.
        `mask_source` says who made the masks (one of `MASK_SOURCES`; None without masks);
        `uncertain`, that the model's top class was below its certainty threshold (the reading
        is then no answer); `pacs`, where in the hospital archive the image came from;
        `flagged`, whether the malignant flag was raised (None: not known)."""
        item = NewCase(image=image, image_name=image_name, masks=masks,
                       combine_mode=combine_mode, model_name=model_name, model_hash=model_hash,
                       probabilities=probabilities, predicted_label=predicted_label,
                       cam_settings=cam_settings, mask_source=mask_source, uncertain=uncertain,
                       pacs=pacs, flagged=flagged)
        return self.add_case(item, who=who)

    def add_case(self, item: NewCase, *, who: Identity) -> Case:
        """Store a reading as a new unreviewed case of `who` (`save_case` with its arguments
        in a `NewCase`)."""
        return self._save([item], who, None)[0]

    def add_cases(self, items: Sequence[NewCase], *, who: Identity) -> list[Case]:
        """Store several readings as new unreviewed cases of `who` in one transaction (all or
        none), each on its own (not a study)."""
        return self._save(items, who, None)

    def save_study(self, items: Sequence[NewCase], reading: StudyReadingRecord, *,
                   who: Identity) -> Study:
        """Store several readings of one examination as a study: each image a new unreviewed
        case (as `save_case`), the study with its combined `reading`, all in one transaction
        (a study is saved whole or not at all). The study keeps the PACS study UID when all its
        images came from the same PACS study. Every image must have been read by one model."""
        require(who, "save_case")
        if not items:
            raise InvalidCaseError("A study needs at least one image.")
        if len({(item.model_name, item.model_hash) for item in items}) > 1:
            raise InvalidCaseError("The images of a study must have been read by one model.")
        sources = {(item.pacs.endpoint, item.pacs.study_uid) if item.pacs else (None, None)
                   for item in items}
        endpoint, study_uid = sources.pop() if len(sources) == 1 else (None, None)
        row = dict(created_at=utc_now(), owner=who.name, model_name=items[0].model_name,
                   model_hash=items[0].model_hash, rule=_check_rule(reading.rule),
                   probabilities=json.dumps(_check_probabilities(reading.probabilities)),
                   predicted_label=_check_label(reading.predicted_label),
                   uncertain=bool(reading.uncertain), flagged=bool(reading.flagged),
                   pacs_endpoint=endpoint, study_uid=study_uid)
        saved = self._save(items, who, row)
        return self.get_study(_known(saved[0].study_id))

    def _save(self, items: Sequence[NewCase], who: Identity,
              study: dict[str, Any] | None) -> list[Case]:
        """Store `items` as new cases of `who` (and first the `study` row they belong to, when
        given) in one transaction; image files are written last, just before the commit."""
        require(who, "save_case")
        rows, new_files = [], {}
        now = utc_now()
        for item in items:
            row, files = self._case_row(item, who, now)
            rows.append(row)
            new_files.update(files)
        with self.transaction(write=True) as conn:
            study_id = None
            if study is not None:
                key = conn.execute(insert(studies).values(study)).inserted_primary_key
                assert key is not None
                study_id = key[0]
            saved = []
            for row in rows:
                key = conn.execute(insert(cases).values({**row, "study_id": study_id})
                                   ).inserted_primary_key
                assert key is not None
                _audit(conn, key[0], who.name, "created", "predicted_label", None,
                       row["predicted_label"], at=now)
                saved.append(_fetch(conn, key[0]))
            self._write_images(new_files)  # last, so a kill before the commit leaves none
            return saved

    def _case_row(self, item: NewCase, who: Identity, now: str
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The checked database row of a new case, and the PNG bytes of its image and mask
        files not stored yet (by content hash)."""
        _check_pacs_source(item.pacs)
        if item.mask_source is not None and item.mask_source not in MASK_SOURCES:
            raise InvalidCaseError(f"Unknown mask source {item.mask_source!r}; choose one of "
                                   f"{', '.join(MASK_SOURCES)}.")
        predicted_label = _check_label(item.predicted_label)
        probabilities = _check_probabilities(item.probabilities)
        pixels = _check_image(item.image)
        lesions = [_check_mask(m, pixels.shape[:2], i) for i, m in enumerate(item.masks, start=1)]
        image_hash, *mask_hashes = [_array_hash(a) for a in (pixels, *lesions)]
        new_files = {content_hash: image_to_png_bytes(array) for content_hash, array
                     in zip((image_hash, *mask_hashes), (pixels, *lesions))
                     if not self.image_path(content_hash).exists()}
        image_name = item.image_name if keep_file_names() else pseudonym(image_hash,
                                                                           item.image_name)
        pacs = item.pacs
        row = dict(created_at=now, updated_at=now, image_hash=image_hash,
                   image_name=image_name, mask_hashes=json.dumps(mask_hashes),
                   combine_mode=item.combine_mode, model_name=item.model_name,
                   model_hash=item.model_hash, probabilities=json.dumps(probabilities),
                   predicted_label=predicted_label, confirmed_label=None,
                   cam_settings=(None if item.cam_settings is None
                                 else json.dumps(dict(item.cam_settings))),
                   reviewer="", notes="", status="unreviewed", owner=who.name,
                   mask_source=item.mask_source if lesions else None,
                   uncertain=bool(item.uncertain), p_malignant=probabilities.get(MALIGNANT),
                   flagged=None if item.flagged is None else bool(item.flagged),
                   **dict(zip(_PACS_COLUMNS, astuple(pacs) if pacs else (None,) * 4)))
        return row, new_files

    def review_case(self, case_id: int, *, label: str, who: Identity,
                    notes: str | None = None) -> Case:
        """Record the label of `who` (role clinician; their name signs it): status becomes
        'confirmed' when it equals the prediction, 'corrected' when it differs, and 'labelled'
        when the model was uncertain (it gave no answer to agree or disagree with). `notes`,
        when given, replaces the case's notes. Every changed field gets an audit entry with its
        old and new value."""
        label = _check_label(label)
        reviewer = _signer(who, "review")
        with self.transaction(write=True) as conn:
            case = _fetch(conn, case_id)
            status = "labelled" if case.uncertain else \
                "confirmed" if label == case.predicted_label else "corrected"
            changes = {"confirmed_label": label, "status": status, "reviewer": reviewer}
            if notes is not None:
                changes["notes"] = notes.strip()
            self._apply(conn, case, reviewer, status, changes, always=("confirmed_label",))
            return _fetch(conn, case_id)

    def add_note(self, case_id: int, *, note: str, who: Identity) -> Case:
        """Append a line of `who` (role clinician) to a case's notes (audited as 'note')."""
        reviewer = _signer(who, "review")
        note = note.strip()
        if not note:
            raise InvalidCaseError("The note is empty: write something before saving it.")
        with self.transaction(write=True) as conn:
            case = _fetch(conn, case_id)
            notes = f"{case.notes}\n{note}" if case.notes else note
            self._apply(conn, case, reviewer, "note", {"notes": notes})
            return _fetch(conn, case_id)

    def log_action(self, case_id: int, action: str, field: str, value: str, *,
                   who: Identity) -> None:
        """Append to a case's audit log that `who` (role clinician) did `action` with the
        case's `field`, whose value was `value` (e.g. its confirmed label sent to the PACS)."""
        signer = _signer(who, "review")
        with self.transaction(write=True) as conn:
            _fetch(conn, case_id)
            _audit(conn, case_id, signer, action, field, None, value, at=utc_now())

    @staticmethod
    def _apply(conn: Connection, case: Case, who: str, action: str, changes: dict[str, str],
               always: Sequence[str] = ()) -> None:
        """Update `case` with `changes` and audit each changed field (and those in `always`)."""
        now = utc_now()
        conn.execute(update(cases).where(cases.c.id == case.id).values(**changes, updated_at=now))
        for field, new in changes.items():
            old = getattr(case, field)
            if old != new or field in always:
                _audit(conn, case.id, who, "note" if field == "notes" else action, field, old,
                       new, at=now)

    # -- reading --

    def get_case(self, case_id: int) -> Case:
        """The case with this id; raises `CaseNotFoundError`."""
        with self.transaction() as conn:
            return _fetch(conn, case_id)

    def list_cases(self, *, status: str | None = None, predicted: str | None = None,
                   confirmed: str | None = None, reviewer: str | None = None,
                   owner: str | None = None, flagged: bool | None = None,
                   uncertain: bool | None = None, study_id: int | None = None,
                   since: datetime | str | None = None, until: datetime | str | None = None,
                   order_by: str = "created_at", descending: bool = True,
                   limit: int | None = None, offset: int = 0) -> list[Case]:
        """Cases matching every given filter, sorted by `order_by` (cases without a value
        last), `limit` of them after skipping `offset` (a page of a worklist). `flagged`: the
        malignant flag was raised (True) or not raised or not known (False); `since`
        (inclusive) and `until` (exclusive) bound the creation time; naive datetimes are taken
        as UTC."""
        if order_by not in ORDERABLE:
            raise ValueError(f"order_by must be one of {', '.join(ORDERABLE)}, not {order_by!r}.")
        query = _filtered(select(cases), status=status, predicted=predicted,
                          confirmed=confirmed, reviewer=reviewer, owner=owner, flagged=flagged,
                          uncertain=uncertain, study_id=study_id, since=since, until=until)
        column = cases.c[order_by]
        keys = ((column.desc() if descending else column.asc()).nulls_last(),
                cases.c.id.desc() if descending else cases.c.id.asc())
        query = query.order_by(*keys).limit(limit).offset(max(0, int(offset)) or None)
        with self.transaction() as conn:
            return [_case(row) for row in conn.execute(query).mappings()]

    def count_cases(self, **filters: Any) -> int:
        """How many cases match the filters of `list_cases` (its sorting and paging
        arguments aside)."""
        query = _filtered(select(func.count()).select_from(cases), **filters)
        with self.transaction() as conn:
            return int(conn.execute(query).scalar_one())

    def worklist_counts(self, **filters: Any) -> dict[str, int]:
        """The counts a worklist shows at its top (cases to review, flagged and uncertain ones
        among them, disagreements, and 'all'), among the cases matching the filters of
        `list_cases` (none: all cases)."""
        to_review = cases.c.status == "unreviewed"
        counted = {"all": true(), "to_review": to_review,
                   "flagged": and_(to_review, cases.c.flagged.is_(True)),
                   "uncertain": and_(to_review, cases.c.uncertain.is_(True)),
                   "disagreements": cases.c.status == "corrected"}
        query = _filtered(select(*(func.count().filter(condition).label(name)
                                   for name, condition in counted.items())
                                   ).select_from(cases), **filters)
        with self.transaction() as conn:
            row = conn.execute(query).mappings().one()
        return {name: int(row[name] or 0) for name in counted}

    def distinct_people(self) -> dict[str, list[str]]:
        """The names that saved cases ('owner') and that reviewed them ('reviewer'), sorted:
        the choices of a worklist's filters."""
        with self.transaction() as conn:
            return {name: sorted(v for v in conn.execute(
                        select(cases.c[name]).distinct()).scalars() if v)
                    for name in ("owner", "reviewer")}

    def get_study(self, study_id: int) -> Study:
        """The study with this id and its cases' ids; raises `CaseNotFoundError`."""
        with self.transaction() as conn:
            row = conn.execute(select(studies).where(studies.c.id == study_id)
                               ).mappings().first()
            if row is None:
                raise CaseNotFoundError(f"There is no study number {study_id} in the case "
                                        "database.")
            ids = conn.execute(select(cases.c.id).where(cases.c.study_id == study_id)
                               .order_by(cases.c.id)).scalars()
            values = dict(row)
            values["probabilities"] = json.loads(values["probabilities"])
            values["uncertain"] = bool(values["uncertain"])
            values["flagged"] = bool(values["flagged"])
            return Study(**values, case_ids=tuple(ids))

    def cases_of_image(self, image: np.ndarray) -> list[Case]:
        """The cases saved with exactly these pixels, oldest first (empty when none)."""
        query = select(cases).where(cases.c.image_hash == _array_hash(_check_image(image)))
        with self.transaction() as conn:
            return [_case(row) for row in conn.execute(query.order_by(cases.c.id)).mappings()]

    def confirmed_cases(self) -> list[Case]:
        """Reviewed cases (confirmed or corrected), oldest first: the new training data."""
        query = select(cases).where(cases.c.confirmed_label.is_not(None)).order_by(cases.c.id)
        with self.transaction() as conn:
            return [_case(row) for row in conn.execute(query).mappings()]

    def append_decision(self, entry: Mapping[str, Any]) -> None:
        """Add one model decision (a JSON-able dict with 'time', 'action' and 'who') to the
        model decision log."""
        with self.transaction(write=True) as conn:
            conn.execute(insert(model_decisions).values(
                at=str(entry["time"]), action=str(entry["action"]), who=str(entry["who"]),
                entry=json.dumps(dict(entry), allow_nan=False)))

    def decisions(self) -> list[dict[str, Any]]:
        """Every model decision of the database, oldest first."""
        query = select(model_decisions.c.entry).order_by(model_decisions.c.id)
        with self.transaction() as conn:
            return [json.loads(row) for row in conn.execute(query).scalars()]

    def history(self, case_id: int) -> list[AuditEntry]:
        """The audit entries of a case, oldest first; raises `CaseNotFoundError`."""
        query = select(audit_log).where(audit_log.c.case_id == case_id).order_by(audit_log.c.id)
        with self.transaction() as conn:
            _fetch(conn, case_id)
            return [AuditEntry(**row) for row in conn.execute(query).mappings()]

    def image_path(self, content_hash: str) -> Path:
        """The PNG file of an image or mask hash."""
        return self.images_dir / content_hash[:2] / f"{content_hash}.png"

    def load_image(self, case: Case) -> np.ndarray:
        """The case's image exactly as saved (uint8, HxW or HxWxC)."""
        return np.asarray(self._open(case.image_hash, case))

    def load_masks(self, case: Case) -> list[np.ndarray]:
        """The case's masks as HxW bool arrays, in the order they were saved."""
        return [np.asarray(self._open(h, case)) > 0 for h in case.mask_hashes]

    # -- export --

    # -- internals --

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Connection]:
        """A transaction (holding the write lock from its start when `write`); database
        failures become `StoreError`."""
        with transaction(self.engine, write) as conn:
            yield conn

    def _where(self) -> str:
        return where(self.engine)

    def _write_images(self, encoded: Mapping[str, bytes]) -> None:
        """Write PNG bytes under their content hashes, each file once."""
        for content_hash, data in encoded.items():
            target = self.image_path(content_hash)
            if not target.exists():
                try:
                    _atomic_write(target, data)
                except OSError as exc:
                    raise StoreError(f"Cannot write to {target.parent}: "
                                     f"{exc.strerror or exc}. Set BUS_DATA_DIR to a writable "
                                     "folder.", plain=plain_storage_message(exc)) from exc

    def existing_file(self, content_hash: str, case: Case) -> Path:
        path = self.image_path(content_hash)
        if not path.is_file():
            raise StoreError(f"An image of case {case.id} ({case.display_name}) is missing: "
                             f"{path} does not exist.")
        return path

    def _open(self, content_hash: str, case: Case) -> Image.Image:
        with Image.open(self.existing_file(content_hash, case)) as image:
            image.load()
            return image


# --- helpers ---------------------------------------------------------------------------------




def _filtered(query: Select, *, status: str | None = None, predicted: str | None = None,
              confirmed: str | None = None, reviewer: str | None = None,
              owner: str | None = None, flagged: bool | None = None,
              uncertain: bool | None = None, study_id: int | None = None,
              since: datetime | str | None = None, until: datetime | str | None = None
              ) -> Select:
    """`query` restricted to the cases matching every given filter (`CaseStore.list_cases`)."""
    if status is not None and status not in STATUSES:
        raise InvalidCaseError(f"Unknown status {status!r}: use one of {', '.join(STATUSES)}.")
    for column, value in ((cases.c.status, status), (cases.c.predicted_label, predicted),
                          (cases.c.confirmed_label, confirmed), (cases.c.reviewer, reviewer),
                          (cases.c.owner, owner), (cases.c.study_id, study_id)):
        if value is not None:
            query = query.where(column == value)
    for column, wanted in ((cases.c.flagged, flagged), (cases.c.uncertain, uncertain)):
        if wanted is not None:
            query = query.where(column.is_(True) if wanted else or_(column.is_(False),
                                                                     column.is_(None)))
    if since is not None:
        query = query.where(cases.c.created_at >= _iso(since))
    if until is not None:
        query = query.where(cases.c.created_at < _iso(until))
    return query


def _known(value: int | None) -> int:
    """`value`, which the caller knows is set."""
    assert value is not None
    return value


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise InvalidCaseError(f"Unknown study rule {rule!r}: use one of {', '.join(RULES)}.")
    return rule


def _fetch(conn: Connection, case_id: int) -> Case:
    row = conn.execute(select(cases).where(cases.c.id == case_id)).mappings().first()
    if row is None:
        raise CaseNotFoundError(f"There is no case number {case_id} in the case database.")
    return _case(row)


def _case(row: Any) -> Case:
    values = dict(row)
    values["mask_hashes"] = tuple(json.loads(values["mask_hashes"]))
    values["probabilities"] = json.loads(values["probabilities"])
    values["cam_settings"] = (json.loads(values["cam_settings"])
                              if values["cam_settings"] is not None else None)
    values["uncertain"] = bool(values["uncertain"])
    values.pop("p_malignant")
    values["flagged"] = None if values["flagged"] is None else bool(values["flagged"])
    source = [values.pop(key) for key in _PACS_COLUMNS]
    values["pacs"] = PacsSource(*source) if all(source) else None
    return Case(**values)


def _audit(conn: Connection, case_id: int, who: str, action: str, field: str | None,
           old: str | None, new: str | None, *, at: str) -> None:
    conn.execute(insert(audit_log).values(at=at, case_id=case_id, who=who, action=action,
                                          field=field, old_value=old, new_value=new))


def display_time(stamp: str) -> str:
    """A stored UTC time as this machine's local 'YYYY-MM-DD HH:MM', the one format the app
    shows and exports."""
    return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")



def _iso(moment: datetime | str) -> str:
    """A time bound as stored: UTC ISO-8601 (naive datetimes are UTC; strings as given)."""
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _check_label(label: str) -> str:
    clean = str(label).strip().lower()
    if clean not in CLASSES:
        raise InvalidCaseError(f"Unknown label {label!r}: use one of {', '.join(CLASSES)}.")
    return clean


def _signer(who: Identity, action: str) -> str:
    """The name that signs `action` of `who` (who must be allowed to do it)."""
    clean = require(who, action).name.strip()
    if not clean:
        raise InvalidCaseError("A review needs a signed-in user's name: every review is signed.")
    return clean


def shown_name(image: np.ndarray, name: str) -> str:
    """The name an uploaded image goes by outside the screen it was opened on (its case, the
    report): its `pseudonym`, unless the administrator keeps file names."""
    return name if keep_file_names() else pseudonym(_array_hash(_check_image(image)), name)


def pseudonym(image_hash: str, name: str) -> str:
    """The name a case's image goes by: 'image-' and the start of its content hash, with the
    original file's extension (the same for every name of the same pixels)."""
    suffix = Path(name).suffix.lower()
    if not _EXTENSION.fullmatch(suffix):
        suffix = ""
    return f"image-{image_hash[:12]}{suffix}"


def _check_probabilities(probabilities: Mapping[str, float]) -> dict[str, float]:
    clean = {}
    for name, p in probabilities.items():
        label = _check_label(name)
        if not (math.isfinite(float(p)) and 0.0 <= float(p) <= 1.0):
            raise InvalidCaseError(f"The probability of {label} must lie between 0 and 1, "
                                   f"not {p}.")
        clean[label] = float(p)
    return clean


def _check_pacs_source(source: PacsSource | None) -> None:
    """`InvalidCaseError` unless `source` is None or names a PACS and three DICOM UIDs."""
    if source is None:
        return
    if not source.endpoint.strip():
        raise InvalidCaseError("The PACS a case came from has no name.")
    for what, uid in (("study", source.study_uid), ("series", source.series_uid),
                      ("instance", source.sop_uid)):
        if len(uid) > 64 or not _DICOM_UID.match(uid):
            raise InvalidCaseError(f"The {what} UID of the PACS image is not a DICOM UID "
                                   "(digits and dots, at most 64 characters).")


def _check_image(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (
            array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or array.size == 0:
        raise InvalidImageError("The image to save must be a non-empty 8-bit greyscale or colour "
                                f"picture (got an array of {array.dtype} with shape "
                                f"{array.shape}).")
    return np.ascontiguousarray(array)


def _check_mask(mask: np.ndarray, shape: tuple[int, ...], number: int) -> np.ndarray:
    array = np.asarray(mask)
    if array.shape != tuple(shape):
        raise MaskError(f"Mask {number} is {array.shape[:2]} pixels but the image is "
                        f"{tuple(shape)}: a mask must be the size of its image.")
    return np.ascontiguousarray(array != 0)


def _array_hash(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (the same pixels give the same hash)."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that it appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)
