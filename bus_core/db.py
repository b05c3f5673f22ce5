"""The database every server process shares: its address, the engine (SQLite or PostgreSQL),
transactions, and the locks that serialise work between processes.

- The database is SQLite by default (`<data dir>/cases.sqlite`, the data dir being $BUS_DATA_DIR
  or ~/.bus_classifier), or PostgreSQL ($BUS_DATABASE_URL, shared by several app servers); any
  SQLAlchemy URL can be given instead.
- Writers take the write lock at the start of their transaction (SQLite: BEGIN IMMEDIATE, in WAL
  mode with a 30 s busy timeout and foreign keys on; PostgreSQL: an advisory transaction lock),
  so several threads and processes can write at once.
- `shared_lock` serialises other work (starting a job, changing the model registry) between the
  processes sharing the data folder and the database.
The tables themselves are in bus_core.clinic.schema.
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from bus_core.errors import StoreError, plain_storage_message, storage
from bus_core.settings import data_dir, database_url

try:
    import fcntl
except ImportError:  # Windows: shared_lock relies on the database alone
    fcntl = None  # type: ignore[assignment]

DB_FILE = "cases.sqlite"
BUSY_TIMEOUT_MS = 30_000
WRITE_LOCK = "writes"
"""The name of the database lock every write transaction takes on PostgreSQL."""


def default_db_path() -> Path:
    """Where the case database lives without $BUS_DATABASE_URL: `<data dir>/cases.sqlite`."""
    return data_dir() / DB_FILE


def default_database() -> str:
    """The database the app and the command line use: $BUS_DATABASE_URL, else
    `default_db_path()`."""
    return database_url() or str(default_db_path())


def resolve_url(url_or_path: str | Path | None) -> URL:
    """The SQLAlchemy URL of a SQLite file or folder, a URL string, or None for
    `default_database()`."""
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


def sqlite_folder(url: URL) -> Path | None:
    """The folder of a SQLite database file, None for other databases and in-memory ones."""
    database = url.database if url.get_backend_name() == "sqlite" else None
    on_disk = database is not None and database not in ("", ":memory:") and \
        not database.startswith("file:")
    return Path(database).parent if on_disk and database else None


def ensure_writable(folder: Path, advice: str = "Set BUS_DATA_DIR to a writable folder.") -> None:
    """Create `folder` if needed and check a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise StoreError(f"Cannot write to {folder}: {exc.strerror or exc}. {advice}",
                         plain=plain_storage_message(exc)) from exc


def open_engine(url: URL) -> Engine:
    """An engine for `url` with the write lock set up (see the module docstring). Raises
    `StoreError`."""
    try:
        engine = create_engine(url)
    except (SQLAlchemyError, ImportError) as exc:
        raise StoreError(f"Cannot open the case database "
                         f"{url.render_as_string(hide_password=True)}: {exc}.") from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    elif engine.dialect.name == "postgresql":
        _configure_postgresql(engine)
    return engine


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
            advisory_lock(conn, WRITE_LOCK)


def advisory_lock(conn: Connection, name: str) -> None:
    """Wait for the PostgreSQL advisory lock `name`, held until the transaction ends."""
    key = int.from_bytes(hashlib.sha256(f"bus_core:{name}".encode()).digest()[:8], "big",
                         signed=True)
    conn.execute(select(func.pg_advisory_xact_lock(key)))


def where(engine: Engine) -> str:
    """The database's address without its password, for messages."""
    return engine.url.render_as_string(hide_password=True)


@contextmanager
def transaction(engine: Engine, write: bool = False) -> Iterator[Connection]:
    """A transaction (holding the write lock from its start when `write`); database failures
    become `StoreError`."""
    try:
        with (engine.execution_options(bus_write=True) if write else engine).begin() as conn:
            yield conn
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise StoreError(f"The case database {where(engine)} cannot be used: {cause}.") from exc


@contextmanager
def locked(engine: Engine, name: str) -> Iterator[None]:
    """Hold the database lock `name` while the block runs; other processes asking for it wait
    (PostgreSQL: an advisory lock; SQLite: the write lock, as the file has no other)."""
    with transaction(engine, write=engine.dialect.name == "sqlite") as conn:
        if conn.dialect.name == "postgresql":
            advisory_lock(conn, name)
        yield


@contextmanager
def shared_lock(name: str) -> Iterator[None]:
    """Hold the lock `name` while the block runs: one process at a time among those sharing the
    data folder (a lock file `<data dir>/.<name>.lock`) and, with $BUS_DATABASE_URL, among those
    sharing that database (`locked`). Raises `StorageError` or `StoreError`."""
    folder = data_dir()
    with ExitStack() as stack:
        with storage(f"use the data folder {folder}"):
            folder.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(folder / f".{name}.lock", "a"))
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        url = database_url()
        if url is not None:
            engine = open_engine(resolve_url(url))
            stack.callback(engine.dispose)
            stack.enter_context(locked(engine, name))
        yield
