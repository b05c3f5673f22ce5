"""The case store: every saved prediction ("case"), its review, and an append-only audit log.

A case is one image with its masks, the model's probabilities and, once a radiologist has
reviewed it, the confirmed label and notes. Confirmed cases become new training data and can be
exported as a BUSI-layout folder.

Storage:
- The database is SQLite by default (`<data dir>/cases.sqlite`, the data dir being $BUS_DATA_DIR
  or ~/.bus_classifier), or PostgreSQL ($BUS_DATABASE_URL, shared by several app servers); any
  SQLAlchemy URL can be given instead.
- Images and masks are PNG files stored once per content, under
  `<images dir>/<hash[:2]>/<hash>.png`, where the hash is the sha256 of the pixel array (dtype,
  shape and bytes); the database holds only hashes, so servers sharing a database share the
  images folder too. A case's new files are encoded first and written (atomically) inside its
  transaction, after its rows and just before the commit: a process killed before then leaves
  at most temporary files, which opening the store removes once `PARTIAL_WRITE_AGE_S` old, and
  never a case without its image.
- Every change (a case and its audit entries) is one transaction. Writers take the write lock at
  the start of their transaction (SQLite: BEGIN IMMEDIATE, in WAL mode with a 30 s busy timeout
  and foreign keys on; PostgreSQL: an advisory transaction lock), so several threads and
  processes can save cases at once.
- The audit logs have no update or delete API; triggers also refuse UPDATE and DELETE.
- The schema is versioned (`schema_version` table) and upgraded on opening by the steps in
  `MIGRATIONS`, each in its own write transaction (so two processes opening a new database at
  once do not both upgrade it).
- `shared_lock` serialises other work (starting a job, changing the model registry) between the
  processes sharing the data folder and the database.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from bus_core import atomic
from bus_core.constants import CLASSES
from bus_core.data.images import image_to_png_bytes
from bus_core.errors import (
    InvalidImageError,
    MaskError,
    StorageError,
    plain_storage_message,
    storage,
)
from bus_core.roles import Identity, require
from bus_core.settings import data_dir, database_url, keep_file_names

try:
    import fcntl
except ImportError:  # Windows: shared_lock relies on the database alone
    fcntl = None  # type: ignore[assignment]

DB_FILE = "cases.sqlite"
IMAGES_DIR = "images"
BUSY_TIMEOUT_MS = 30_000
PARTIAL_WRITE_AGE_S = 60.0
"""Temporary files of the images folder this old are left by killed writes and removed."""

CaseStatus = Literal["unreviewed", "confirmed", "corrected", "labelled"]
"""'confirmed' / 'corrected': the reviewer's label equals / differs from the model's reading;
'labelled': the model was uncertain (no answer), so the label is the reviewer's alone."""
STATUSES: tuple[str, ...] = get_args(CaseStatus)
ORDERABLE: tuple[str, ...] = ("created_at", "updated_at", "id", "status", "predicted_label",
                              "confirmed_label", "reviewer", "model_name")
"""Columns `list_cases` can sort by."""

_EXTENSION = re.compile(r"\.[a-z0-9]{1,5}")
_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PACS_COLUMNS = ("pacs_endpoint", "study_uid", "series_uid", "sop_uid")
"""The columns of a case's `PacsSource`, in its fields' order."""
_EXPORTED_FILE = re.compile(r"^case-\d+(?:_mask(?:_\d+)?)?\.png$")
_CSV_COLUMNS = ("id", "path", "label", "mask", "mask_source", "predicted", "uncertain", "status",
                *(f"{c}_percent" for c in CLASSES), "model", "model_hash", "reviewer", "notes",
                "image_name", "owner", "created_at", "updated_at")
"""The columns of an export's cases.csv: a percentage (1 decimal) per class; times in local
minutes (`display_time`)."""


class StoreError(StorageError):
    """The case store cannot be used: folder not writable, database damaged, busy or too new,
    or an image file missing."""


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


# --- schema ----------------------------------------------------------------------------------

MaskSource = Literal["painted", "uploaded", "dataset", "suggested", "suggested, edited"]
MASK_SOURCES: tuple[str, ...] = get_args(MaskSource)
"""Who made a case's masks: painted by the user, uploaded files, a dataset's expert masks, the
segmentation model's outline accepted as is, or that outline edited by the user."""

_metadata = MetaData()

schema_version = Table("schema_version", _metadata, Column("version", Integer, nullable=False))

cases = Table(
    "cases", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", String(40), nullable=False),
    Column("image_hash", String(64), nullable=False),
    Column("image_name", Text, nullable=False),
    Column("mask_hashes", Text, nullable=False),
    Column("combine_mode", String(32)),
    Column("model_name", Text, nullable=False),
    Column("model_hash", String(64), nullable=False),
    Column("probabilities", Text, nullable=False),
    Column("predicted_label", String(32), nullable=False),
    Column("confirmed_label", String(32)),
    Column("cam_settings", Text),
    Column("reviewer", Text, nullable=False),
    Column("notes", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("updated_at", String(40), nullable=False),
    Column("mask_source", String(32)),
    Column("uncertain", Boolean),
    Column("owner", Text),
    Column("pacs_endpoint", Text),
    Column("study_uid", String(64)),
    Column("series_uid", String(64)),
    Column("sop_uid", String(64)),
)
"""The cases table of the current schema (created by the migrations, never by create_all)."""

users = Table(
    "users", _metadata,
    Column("name", String(128), primary_key=True),
    Column("roles", Text, nullable=False),
    Column("password_hash", Text),
    Column("disabled", Boolean, nullable=False),
    Column("failed_signins", Integer, nullable=False),
    Column("locked_until", String(40)),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
    Column("last_signin", String(40)),
)
"""Local accounts (bus_core.clinic.accounts): roles comma-separated; the password only as an argon2
hash (NULL for a single-sign-on user whose roles are kept here)."""

account_log = Table(
    "account_log", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", String(40), nullable=False),
    Column("who", Text, nullable=False),
    Column("action", String(32), nullable=False),
    Column("subject", Text),
    Column("detail", Text),
)
"""The audit log of accounts (append-only): sign-ins, failed sign-ins, sign-outs, users added,
role changes, disabling, password changes; `who` acted on `subject`."""

model_decisions = Table(
    "model_decisions", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", String(40), nullable=False),
    Column("action", String(32), nullable=False),
    Column("who", Text, nullable=False),
    Column("entry", Text, nullable=False),
)
"""The model decision log (append-only; bus_core.clinic.gate): each activation, override, block,
rejection and roll back, `entry` being the whole decision as JSON."""

audit_log = Table(
    "audit_log", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", String(40), nullable=False),
    Column("case_id", Integer, ForeignKey("cases.id"), nullable=False, index=True),
    Column("who", Text, nullable=False),
    Column("action", String(16), nullable=False),
    Column("field", String(32)),
    Column("old_value", Text),
    Column("new_value", Text),
)

_V2_CASE_INDEXES = (Index("ix_cases_created_at", cases.c.created_at),
                    Index("ix_cases_status", cases.c.status))


def _create_v1(conn: Connection) -> None:
    """Schema 1: the cases table without review notes, reviewer, status, CAM settings."""
    v1 = MetaData()
    Table("cases", v1,
          Column("id", Integer, primary_key=True, autoincrement=True),
          Column("created_at", String(40), nullable=False),
          Column("image_hash", String(64), nullable=False),
          Column("image_name", Text, nullable=False),
          Column("mask_hashes", Text, nullable=False),
          Column("combine_mode", String(32)),
          Column("model_name", Text, nullable=False),
          Column("model_hash", String(64), nullable=False),
          Column("probabilities", Text, nullable=False),
          Column("predicted_label", String(32), nullable=False),
          Column("confirmed_label", String(32)))
    v1.create_all(conn)


def _upgrade_v1_to_v2(conn: Connection) -> None:
    """Schema 2: review columns on cases, the audit log (append-only), indexes; existing cases
    get their status and a 'created' entry (plus their review, when they have one)."""
    for column in ("cam_settings TEXT", "reviewer TEXT NOT NULL DEFAULT ''",
                   "notes TEXT NOT NULL DEFAULT ''",
                   "status VARCHAR(16) NOT NULL DEFAULT 'unreviewed'",
                   "updated_at VARCHAR(40) NOT NULL DEFAULT ''"):
        conn.execute(text(f"ALTER TABLE cases ADD COLUMN {column}"))
    conn.execute(text(
        "UPDATE cases SET updated_at = created_at, status = CASE "
        "WHEN confirmed_label IS NULL THEN 'unreviewed' "
        "WHEN confirmed_label = predicted_label THEN 'confirmed' ELSE 'corrected' END"))
    audit_log.create(conn)
    for index in _V2_CASE_INDEXES:
        index.create(conn)
    _append_only(conn, "audit_log")
    _backfill_audit(conn)


def _backfill_audit(conn: Connection) -> None:
    rows = conn.execute(select(cases.c.id, cases.c.created_at, cases.c.predicted_label,
                               cases.c.confirmed_label, cases.c.status)).all()
    entries = [dict(at=r.created_at, case_id=r.id, who="", action="created",
                    field="predicted_label", old_value=None, new_value=r.predicted_label)
               for r in rows]
    entries += [dict(at=_now(), case_id=r.id, who="", action=r.status, field="confirmed_label",
                     old_value=None, new_value=r.confirmed_label)
                for r in rows if r.confirmed_label is not None]
    if entries:
        conn.execute(insert(audit_log), entries)


def _upgrade_v2_to_v3(conn: Connection) -> None:
    """Schema 3: where a case's mask came from (`MASK_SOURCES`; NULL for older cases)."""
    conn.execute(text("ALTER TABLE cases ADD COLUMN mask_source VARCHAR(32)"))


def _upgrade_v3_to_v4(conn: Connection) -> None:
    """Schema 4: whether the model was uncertain (below its card's certainty threshold: no
    answer); NULL for older cases, read as not uncertain."""
    conn.execute(text("ALTER TABLE cases ADD COLUMN uncertain BOOLEAN"))


def _upgrade_v4_to_v5(conn: Connection) -> None:
    """Schema 5: accounts (users, account_log, append-only) and who saved each case (`owner`;
    NULL for older cases)."""
    conn.execute(text("ALTER TABLE cases ADD COLUMN owner TEXT"))
    users.create(conn)
    account_log.create(conn)
    _append_only(conn, "account_log")


def _upgrade_v5_to_v6(conn: Connection) -> None:
    """Schema 6: the model decision log in the database (append-only); decisions of earlier
    versions stay in their JSON-lines file, which bus_core.clinic.gate still reads."""
    model_decisions.create(conn)
    _append_only(conn, "model_decisions")


def _upgrade_v6_to_v7(conn: Connection) -> None:
    """Schema 7: where in the hospital archive a case's image came from (`PacsSource`: the
    PACS's name and the study, series and instance UIDs; NULL for other and older cases)."""
    for column in ("pacs_endpoint TEXT", "study_uid VARCHAR(64)", "series_uid VARCHAR(64)",
                   "sop_uid VARCHAR(64)"):
        conn.execute(text(f"ALTER TABLE cases ADD COLUMN {column}"))


def _append_only(conn: Connection, table: str) -> None:
    """Triggers that refuse UPDATE and DELETE (and, on PostgreSQL, TRUNCATE) on `table`."""
    message = f"the {table.replace('_', ' ')} is append-only"
    if conn.dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            conn.execute(text(
                f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"))
    elif conn.dialect.name == "postgresql":
        conn.execute(text(
            f"CREATE FUNCTION {table}_refuse_change() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$"))
        for verb, level in (("UPDATE OR DELETE", "ROW"), ("TRUNCATE", "STATEMENT")):
            name = "no_truncate" if verb == "TRUNCATE" else "no_change"
            conn.execute(text(
                f"CREATE TRIGGER {table}_{name} BEFORE {verb} ON {table} "
                f"FOR EACH {level} EXECUTE FUNCTION {table}_refuse_change()"))


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_create_v1, _upgrade_v1_to_v2,
                                                        _upgrade_v2_to_v3, _upgrade_v3_to_v4,
                                                        _upgrade_v4_to_v5, _upgrade_v5_to_v6,
                                                        _upgrade_v6_to_v7)
"""Step i upgrades a database from schema version i to i + 1."""

CURRENT_SCHEMA_VERSION = len(MIGRATIONS)


# --- opening ---------------------------------------------------------------------------------

def default_db_path() -> Path:
    """Where the case database lives without $BUS_DATABASE_URL: `<data dir>/cases.sqlite`."""
    return data_dir() / DB_FILE


def default_database() -> str:
    """The database the app and the command line use: $BUS_DATABASE_URL, else
    `default_db_path()`."""
    return database_url() or str(default_db_path())


def open_store(url_or_path: str | Path | None = None, *,
               images_dir: str | Path | None = None) -> CaseStore:
    """Open (creating and upgrading as needed) the case store.

    `url_or_path` is a SQLite file path, a SQLAlchemy URL ("sqlite:///cases.db",
    "postgresql+psycopg://user@host/db"), or None for `default_database()`. Images go to
    `images_dir`, by default an `images` folder beside a SQLite file, else `<data dir>/images`.
    Raises `StoreError`.
    """
    url = _resolve_url(url_or_path)
    database = url.database if url.get_backend_name() == "sqlite" else None
    on_disk = database is not None and database not in ("", ":memory:") and \
        not database.startswith("file:")
    folder = Path(database).parent if on_disk and database else None
    if folder is not None:
        _ensure_writable(folder)
    images = Path(images_dir).expanduser() if images_dir is not None else (
        folder / IMAGES_DIR if folder is not None else data_dir() / IMAGES_DIR)
    _ensure_writable(images)
    try:
        engine = create_engine(url)
    except (SQLAlchemyError, ImportError) as exc:
        raise StoreError(f"Cannot open the case database "
                         f"{url.render_as_string(hide_password=True)}: {exc}.") from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    elif engine.dialect.name == "postgresql":
        _configure_postgresql(engine)
    store = CaseStore(engine, images)
    try:
        store.migrate()
        store.remove_partial_writes()
    except BaseException:
        engine.dispose()
        raise
    return store


def _resolve_url(url_or_path: str | Path | None) -> URL:
    if url_or_path is None:
        url_or_path = default_database()
    if isinstance(url_or_path, str) and "://" in url_or_path:
        try:
            return make_url(url_or_path)
        except SQLAlchemyError as exc:
            raise StoreError(f"{url_or_path!r} is not a database address: {exc}.") from exc
    else:
        path = Path(url_or_path).expanduser()
        if path.is_dir():
            path = path / DB_FILE
    return URL.create("sqlite", database=str(path.resolve()))


def _ensure_writable(folder: Path, advice: str = "Set BUS_DATA_DIR to a writable folder.") -> None:
    """Create `folder` if needed and check a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise StoreError(f"Cannot write to {folder}: {exc.strerror or exc}. {advice}",
                         plain=plain_storage_message(exc)) from exc


def _enable_wal(cursor: Any) -> None:
    """Switch a new database to WAL. The switch needs an exclusive lock and SQLite may refuse it
    at once, without waiting, while another process creates the same database: retry then,
    within the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _configure_sqlite(engine: Engine) -> None:
    """WAL, busy timeout and foreign keys on every connection; BEGIN IMMEDIATE for writers."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("bus_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _configure_postgresql(engine: Engine) -> None:
    """Writers take the advisory lock WRITE_LOCK at the start of their transaction."""

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("bus_write", False):
            _advisory_lock(conn, WRITE_LOCK)


WRITE_LOCK = "writes"
"""The name of the database lock every write transaction takes on PostgreSQL."""


def _advisory_lock(conn: Connection, name: str) -> None:
    """Wait for the PostgreSQL advisory lock `name`, held until the transaction ends."""
    key = int.from_bytes(hashlib.sha256(f"bus_core:{name}".encode()).digest()[:8], "big",
                         signed=True)
    conn.execute(select(func.pg_advisory_xact_lock(key)))


@contextmanager
def shared_lock(name: str) -> Iterator[None]:
    """Hold the lock `name` while the block runs: one process at a time among those sharing the
    data folder (a lock file `<data dir>/.<name>.lock`) and, with $BUS_DATABASE_URL, among those
    sharing that database (`CaseStore.locked`). Raises `StorageError` or `StoreError`."""
    folder = data_dir()
    with ExitStack() as stack:
        with storage(f"use the data folder {folder}"):
            folder.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(folder / f".{name}.lock", "a"))
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        url = database_url()
        if url is not None:
            store = stack.enter_context(open_store(url))
            stack.enter_context(store.locked(name))
        yield


# --- the store -------------------------------------------------------------------------------

class CaseStore:
    """Cases, their image files and their audit log. Safe to share between threads."""

    def __init__(self, engine: Engine, images_dir: Path) -> None:
        """Use `open_store`; this wraps an engine already set up and migrated."""
        self.engine = engine
        self.images_dir = Path(images_dir)
        self._writer = engine.execution_options(bus_write=True)

    def __enter__(self) -> CaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold the database lock `name` while the block runs; other processes asking for it
        wait (PostgreSQL: an advisory lock; SQLite: the write lock, as the file has no other)."""
        with self.transaction(write=self.engine.dialect.name == "sqlite") as conn:
            if conn.dialect.name == "postgresql":
                _advisory_lock(conn, name)
            yield

    # -- schema --

    def schema_version(self) -> int:
        """The database's schema version (0 for an empty database)."""
        with self.transaction() as conn:
            return _read_version(conn)

    def migrate(self) -> int:
        """Bring the schema up to CURRENT_SCHEMA_VERSION, one step per transaction; returns
        the version reached."""
        while True:
            with self.transaction(write=True) as conn:
                version = _read_version(conn, create=True)
                if version > CURRENT_SCHEMA_VERSION:
                    raise StoreError(
                        f"The case database {self._where()} was made by a newer version of this "
                        f"app (schema {version}, this app knows up to {CURRENT_SCHEMA_VERSION}): "
                        "update the app.")
                if version == CURRENT_SCHEMA_VERSION:
                    return version
                MIGRATIONS[version](conn)
                conn.execute(update(schema_version).values(version=version + 1))

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
                  pacs: PacsSource | None = None) -> Case:
        """Store a prediction as a new unreviewed case (image and masks first, then the case
        and its 'created' audit entry in one transaction), owned by `who` (role clinician).
        `image_name` is kept only as a pseudonym unless the administrator keeps file names.
        `mask_source` says who made the masks (one of `MASK_SOURCES`; None without masks);
        `uncertain`, that the model's top class was below its certainty threshold (the reading
        is then no answer); `pacs`, where in the hospital archive the image came from."""
        require(who, "save_case")
        _check_pacs_source(pacs)
        if mask_source is not None and mask_source not in MASK_SOURCES:
            raise InvalidCaseError(f"Unknown mask source {mask_source!r}; choose one of "
                                   f"{', '.join(MASK_SOURCES)}.")
        predicted_label = _check_label(predicted_label)
        probabilities = _check_probabilities(probabilities)
        pixels = _check_image(image)
        lesions = [_check_mask(m, pixels.shape[:2], i) for i, m in enumerate(masks, start=1)]
        image_hash, *mask_hashes = [_array_hash(a) for a in (pixels, *lesions)]
        new_files = {content_hash: image_to_png_bytes(array) for content_hash, array
                     in zip((image_hash, *mask_hashes), (pixels, *lesions))
                     if not self.image_path(content_hash).exists()}
        now = _now()
        if not keep_file_names():
            image_name = pseudonym(image_hash, image_name)
        row = dict(created_at=now, updated_at=now, image_hash=image_hash,
                   image_name=image_name, mask_hashes=json.dumps(mask_hashes),
                   combine_mode=combine_mode, model_name=model_name, model_hash=model_hash,
                   probabilities=json.dumps(probabilities), predicted_label=predicted_label,
                   confirmed_label=None,
                   cam_settings=None if cam_settings is None else json.dumps(dict(cam_settings)),
                   reviewer="", notes="", status="unreviewed", owner=who.name,
                   mask_source=mask_source if masks else None, uncertain=bool(uncertain),
                   **dict(zip(_PACS_COLUMNS, astuple(pacs) if pacs else (None,) * 4)))
        with self.transaction(write=True) as conn:
            key = conn.execute(insert(cases).values(row)).inserted_primary_key
            assert key is not None
            case_id = key[0]
            _audit(conn, case_id, who.name, "created", "predicted_label", None,
                   predicted_label, at=now)
            case = _fetch(conn, case_id)
            self._write_images(new_files)  # last, so a kill before the commit leaves none
            return case

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
            _audit(conn, case_id, signer, action, field, None, value, at=_now())

    @staticmethod
    def _apply(conn: Connection, case: Case, who: str, action: str, changes: dict[str, str],
               always: Sequence[str] = ()) -> None:
        """Update `case` with `changes` and audit each changed field (and those in `always`)."""
        now = _now()
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
                   owner: str | None = None,
                   since: datetime | str | None = None, until: datetime | str | None = None,
                   order_by: str = "created_at", descending: bool = True,
                   limit: int | None = None) -> list[Case]:
        """Cases matching every given filter. `since` (inclusive) and `until` (exclusive)
        bound the creation time; naive datetimes are taken as UTC."""
        if order_by not in ORDERABLE:
            raise ValueError(f"order_by must be one of {', '.join(ORDERABLE)}, not {order_by!r}.")
        if status is not None and status not in STATUSES:
            raise InvalidCaseError(f"Unknown status {status!r}: use one of {', '.join(STATUSES)}.")
        query = select(cases)
        for column, value in ((cases.c.status, status), (cases.c.predicted_label, predicted),
                              (cases.c.confirmed_label, confirmed),
                              (cases.c.reviewer, reviewer), (cases.c.owner, owner)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(cases.c.created_at >= _iso(since))
        if until is not None:
            query = query.where(cases.c.created_at < _iso(until))
        keys = (cases.c[order_by], cases.c.id)
        query = query.order_by(*(k.desc() if descending else k.asc() for k in keys)).limit(limit)
        with self.transaction() as conn:
            return [_case(row) for row in conn.execute(query).mappings()]

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

    def export_busi(self, out_dir: str | Path, *, who: Identity,
                    only_confirmed: bool = True) -> Path:
        """Write cases as a BUSI-layout folder: `<out>/<label>/case-<id>.png` with its masks
        `case-<id>_mask.png`, `case-<id>_mask_1.png`, ... and `<out>/cases.csv` (one row per
        case; its path, label and mask columns make it a manifest too). The label is the
        confirmed one; with only_confirmed=False unreviewed cases go under their prediction.
        Files of an earlier export into the same folder are replaced. An admin exports every
        case; a clinician only those they saved. Returns the folder."""
        selected = self.confirmed_cases() if only_confirmed else self.list_cases(
            order_by="id", descending=False)
        if not who.can("export_all"):
            require(who, "export_own")
            selected = [case for case in selected if case.owner == who.name]
        return self.write_busi(selected, out_dir)

    def write_busi(self, selected: Sequence[Case], out_dir: str | Path) -> Path:
        """Write `selected` as `export_busi` does (no role check: for the server's own use,
        such as retraining). Returns the folder."""
        out = Path(out_dir).expanduser()
        _ensure_writable(out, "Choose a folder you can write to.")
        try:
            _remove_previous_export(out)
            rows = [self._export_case(case, out) for case in selected]
            _write_csv(out / "cases.csv", rows)
        except OSError as exc:
            raise StoreError(f"Cannot export the cases to {out}: {exc.strerror or exc}.") from exc
        return out

    def _export_case(self, case: Case, out: Path) -> dict[str, Any]:
        folder = out / case.label
        folder.mkdir(exist_ok=True)
        stem = f"case-{case.id}"
        names = [f"{stem}.png"] + [f"{stem}_mask.png" if i == 0 else f"{stem}_mask_{i}.png"
                                   for i in range(len(case.mask_hashes))]
        for name, content_hash in zip(names, (case.image_hash, *case.mask_hashes)):
            shutil.copyfile(self._existing(content_hash, case), folder / name)
        paths = [f"{case.label}/{name}" for name in names]
        return {"id": case.id, "path": paths[0], "label": case.label, "mask": ";".join(paths[1:]),
                "mask_source": case.mask_source or "", "predicted": case.predicted_label,
                "uncertain": "yes" if case.uncertain else "no", "status": case.status,
                **{f"{c}_percent": f"{100 * case.probabilities[c]:.1f}"
                   if c in case.probabilities else "" for c in CLASSES},
                "model": case.model_name,
                "model_hash": case.model_hash, "reviewer": case.reviewer, "notes": case.notes,
                "image_name": case.display_name, "owner": case.owner or "",
                "created_at": display_time(case.created_at),
                "updated_at": display_time(case.updated_at)}

    # -- internals --

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Connection]:
        """A transaction (holding the write lock from its start when `write`); database
        failures become `StoreError`."""
        try:
            with (self._writer if write else self.engine).begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            raise StoreError(f"The case database {self._where()} cannot be used: {cause}.") from exc

    def _where(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

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

    def _existing(self, content_hash: str, case: Case) -> Path:
        path = self.image_path(content_hash)
        if not path.is_file():
            raise StoreError(f"An image of case {case.id} ({case.display_name}) is missing: "
                             f"{path} does not exist.")
        return path

    def _open(self, content_hash: str, case: Case) -> Image.Image:
        with Image.open(self._existing(content_hash, case)) as image:
            image.load()
            return image


# --- helpers ---------------------------------------------------------------------------------

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run as a formula: text starting with =, +, -, @, tab
    or carriage return gets a leading apostrophe; other values are kept."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _read_version(conn: Connection, create: bool = False) -> int:
    """The schema version; with `create`, make the version table of an empty database."""
    if create:
        schema_version.create(conn, checkfirst=True)
    elif not inspect(conn).has_table("schema_version"):
        return 0
    version = conn.execute(select(schema_version.c.version)).scalar()
    if version is None:
        version = 0
        if create:
            conn.execute(insert(schema_version).values(version=0))
    return int(version)


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


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


def _remove_previous_export(out: Path) -> None:
    for label in CLASSES:
        folder = out / label
        if folder.is_dir():
            for path in folder.iterdir():
                if _EXPORTED_FILE.match(path.name):
                    path.unlink()


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_safe(v) for k, v in row.items()} for row in rows)
    _atomic_write(path, buffer.getvalue().encode("utf-8"))
