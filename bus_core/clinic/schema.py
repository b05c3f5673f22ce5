"""The tables of the database (cases, studies and the cases' audit log, accounts and their log,
model decisions) and the migrations that bring an older database up to the current schema."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    insert,
    inspect,
    select,
    text,
    update,
)

from bus_core.constants import MALIGNANT
from bus_core.db import transaction, where
from bus_core.errors import StoreError

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
    Column("p_malignant", Float),
    Column("flagged", Boolean),
    Column("study_id", Integer, ForeignKey("studies.id")),
)
"""The cases table of the current schema (created by the migrations, never by create_all)."""

studies = Table(
    "studies", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", String(40), nullable=False),
    Column("owner", Text, nullable=False),
    Column("model_name", Text, nullable=False),
    Column("model_hash", String(64), nullable=False),
    Column("rule", String(32), nullable=False),
    Column("probabilities", Text, nullable=False),
    Column("predicted_label", String(32), nullable=False),
    Column("uncertain", Boolean, nullable=False),
    Column("flagged", Boolean, nullable=False),
    Column("pacs_endpoint", Text),
    Column("study_uid", String(64)),
)
"""Studies (bus_core.clinic.cases.Study): several cases read together as one examination, with
their combined reading and, when they came from the PACS, its study UID."""

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
_V8_CASE_INDEXES = (Index("ix_cases_p_malignant", cases.c.p_malignant),
                    Index("ix_cases_owner", cases.c.owner),
                    Index("ix_cases_study_id", cases.c.study_id))


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
    entries += [dict(at=utc_now(), case_id=r.id, who="", action=r.status, field="confirmed_label",
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


def _upgrade_v7_to_v8(conn: Connection) -> None:
    """Schema 8: studies, each case's study (NULL for a case read alone), its probability of
    malignancy as a column (to sort a worklist by suspicion; filled in from the stored
    probabilities) and whether its malignant flag was raised (NULL for older cases: not known),
    with the indexes a worklist filters and sorts by."""
    studies.create(conn)
    for column in ("p_malignant FLOAT", "flagged BOOLEAN",
                   "study_id INTEGER REFERENCES studies (id)"):
        conn.execute(text(f"ALTER TABLE cases ADD COLUMN {column}"))
    rows = conn.execute(select(cases.c.id, cases.c.probabilities)).all()
    filled = [dict(key=r.id, p=json.loads(r.probabilities).get(MALIGNANT)) for r in rows]
    if filled:
        conn.execute(update(cases).where(cases.c.id == bindparam("key"))
                     .values(p_malignant=bindparam("p")), filled)
    for index in _V8_CASE_INDEXES:
        index.create(conn)


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
                                                        _upgrade_v6_to_v7, _upgrade_v7_to_v8)
"""Step i upgrades a database from schema version i to i + 1."""

CURRENT_SCHEMA_VERSION = len(MIGRATIONS)


def utc_now() -> str:
    """The current time as stored: UTC ISO-8601 with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def read_version(conn: Connection, create: bool = False) -> int:
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


def migrate(engine: Engine) -> int:
    """Bring the schema up to CURRENT_SCHEMA_VERSION, one step per transaction; returns the
    version reached."""
    while True:
        with transaction(engine, write=True) as conn:
            version = read_version(conn, create=True)
            if version > CURRENT_SCHEMA_VERSION:
                raise StoreError(
                    f"The case database {where(engine)} was made by a newer version of this "
                    f"app (schema {version}, this app knows up to {CURRENT_SCHEMA_VERSION}): "
                    "update the app.")
            if version == CURRENT_SCHEMA_VERSION:
                return version
            MIGRATIONS[version](conn)
            conn.execute(update(schema_version).values(version=version + 1))
