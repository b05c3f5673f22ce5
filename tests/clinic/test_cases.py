"""Tests for bus_core.clinic.cases: cases, reviews, audit log, files, export, concurrency,
migrations.

Tests taking `store` or `store_url` run on SQLite and on PostgreSQL (tests/conftest.py)."""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import DatabaseError

from bus_core.clinic.cases import (
    PARTIAL_WRITE_AGE_S,
    Case,
    CaseNotFoundError,
    CaseStore,
    InvalidCaseError,
    NewCase,
    PacsSource,
    StudyReadingRecord,
    open_store,
)
from bus_core.clinic.export import export_busi
from bus_core.clinic.schema import CURRENT_SCHEMA_VERSION
from bus_core.data.dataset import load_records
from bus_core.errors import BusError, InvalidImageError, MaskError, StoreError
from tests.conftest import ADMIN, new_postgres_database, person  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROBS = {"normal": 0.1, "benign": 0.7, "malignant": 0.2}

WORKER = """
import sys
import numpy as np
from bus_core.clinic.cases import open_store
from tests.conftest import person

db, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = open_store(db)
rng = np.random.default_rng(seed)
i = 0
while count < 0 or i < count:
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    store.save_case(image, image_name=f"w{seed}-{i}.png", masks=[image[..., 0] > 128],
                    model_name="m", model_hash="h", probabilities={"benign": 1.0},
                    predicted_label="benign", who=person(f"worker {seed}"))
    i += 1
    print(i, flush=True)
"""


def make_image(seed: int, size: tuple[int, int] = (16, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def save(store: CaseStore, seed: int = 0, predicted: str = "benign", **kwargs) -> Case:
    kwargs.setdefault("model_name", "densenet-test")
    kwargs.setdefault("model_hash", "ab" * 32)
    kwargs.setdefault("who", person())
    return store.save_case(make_image(seed), image_name=f"img{seed}.png", probabilities=PROBS,
                           predicted_label=predicted, **kwargs)


def png_files(store: CaseStore) -> list[Path]:
    return sorted(store.images_dir.rglob("*.png"))


@pytest.fixture
def store(store_url: str):
    with open_store(store_url) as s:
        yield s


def run_workers(db: str, seeds: list[int], count: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return [subprocess.Popen([sys.executable, "-c", WORKER, str(db), str(seed), str(count)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for seed in seeds]


def assert_consistent(db: str) -> int:
    """Integrity ok, every case has its files and exactly one 'created' entry; returns the
    number of cases."""
    with open_store(db) as s:
        with s.engine.connect() as conn:
            if conn.dialect.name == "sqlite":  # PostgreSQL checks foreign keys on every write
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            created = dict(conn.exec_driver_sql(
                "SELECT case_id, COUNT(*) FROM audit_log WHERE action = 'created' "
                "GROUP BY case_id").all())
        all_cases = s.list_cases()
        for case in all_cases:
            assert created.get(case.id) == 1
            assert s.load_image(case).shape == (24, 24, 3)
            assert len(s.load_masks(case)) == 1
        assert set(created) == {c.id for c in all_cases}
        return len(all_cases)


# --- saving and reading ----------------------------------------------------------------------

def test_save_and_get_round_trip(store: CaseStore) -> None:
    image = make_image(1)
    mask = np.zeros(image.shape[:2], bool)
    mask[3:9, 4:12] = True
    case = store.save_case(image, image_name="scan.dcm", masks=[mask, ~mask],
                           combine_mode="union", model_name="m1", model_hash="f" * 64,
                           probabilities=PROBS, predicted_label="Benign",
                           cam_settings={"alpha": 0.4, "layer": "features"}, who=person("Dr A"))
    got = store.get_case(case.id)
    assert got == case
    assert (got.status, got.predicted_label, got.confirmed_label) == ("unreviewed", "benign", None)
    assert got.probabilities == PROBS and got.cam_settings == {"alpha": 0.4, "layer": "features"}
    assert got.combine_mode == "union" and got.owner == "Dr A" and got.reviewer == ""
    assert got.label == "benign"
    assert got.image_name == got.display_name == f"image-{got.image_hash[:12]}.dcm"  # pseudonym
    np.testing.assert_array_equal(store.load_image(got), image)
    loaded = store.load_masks(got)
    assert [m.dtype for m in loaded] == [bool, bool]
    np.testing.assert_array_equal(loaded[0], mask)
    np.testing.assert_array_equal(loaded[1], ~mask)
    assert [(e.action, e.who, e.new_value) for e in store.history(case.id)] == [
        ("created", "Dr A", "benign")]


def test_same_image_is_stored_once(store: CaseStore) -> None:
    first, second = save(store, seed=3), save(store, seed=3)
    assert first.id != second.id and first.image_hash == second.image_hash
    assert png_files(store) == [store.image_path(first.image_hash)]
    save(store, seed=4)
    assert len(png_files(store)) == 2
    assert not [p for p in store.images_dir.rglob("*") if p.name.startswith(".tmp")]


def test_list_filters_and_ordering(store: CaseStore) -> None:
    a = save(store, 1, "benign", who=person("ann"))
    b = save(store, 2, "malignant", who=person("bob"))
    c = save(store, 3, "benign", who=person("ann"))
    store.review_case(a.id, label="benign", who=person("ann"))
    store.review_case(b.id, label="benign", who=person("cid"))

    def ids(**filters) -> list[int]:
        return [case.id for case in store.list_cases(**filters)]

    assert ids() == [c.id, b.id, a.id]
    assert ids(descending=False) == [a.id, b.id, c.id]
    assert ids(status="confirmed") == [a.id]
    assert ids(status="corrected") == [b.id]
    assert ids(status="unreviewed") == [c.id]
    assert ids(predicted="benign") == [c.id, a.id]
    assert ids(confirmed="benign") == [b.id, a.id]
    assert ids(reviewer="ann") == [a.id] and ids(owner="ann") == [c.id, a.id]
    assert ids(since=b.created_at) == [c.id, b.id]
    assert ids(until=b.created_at) == [a.id]
    assert ids(since=a.created_at, until=c.created_at, descending=False) == [a.id, b.id]
    assert ids(order_by="updated_at") == [b.id, a.id, c.id]
    assert ids(limit=1) == [c.id]
    assert [x.id for x in store.confirmed_cases()] == [a.id, b.id]
    with pytest.raises(ValueError):
        store.list_cases(order_by="image_hash; DROP TABLE cases")
    with pytest.raises(InvalidCaseError):
        store.list_cases(status="done")


def test_since_accepts_datetimes(store: CaseStore) -> None:
    from datetime import datetime, timedelta, timezone

    case = save(store)
    created = datetime.fromisoformat(case.created_at)
    assert [c.id for c in store.list_cases(since=created - timedelta(seconds=1))] == [case.id]
    assert store.list_cases(since=created.replace(tzinfo=None) + timedelta(hours=1)) == []
    local = created.astimezone(timezone(timedelta(hours=5)))
    assert [c.id for c in store.list_cases(since=local, until=local + timedelta(seconds=1))
            ] == [case.id]


# --- reviews and audit -----------------------------------------------------------------------

def test_review_writes_audit_with_old_and_new_values(store: CaseStore) -> None:
    case = save(store, predicted="benign", who=person("saver"))
    corrected = store.review_case(case.id, label="malignant", who=person("Dr B"),
                                  notes="spiculated")
    assert (corrected.status, corrected.confirmed_label, corrected.reviewer, corrected.notes) == (
        "corrected", "malignant", "Dr B", "spiculated")
    assert corrected.updated_at > case.updated_at and corrected.label == "malignant"
    confirmed = store.review_case(case.id, label="benign", who=person("Dr C"))
    assert (confirmed.status, confirmed.notes) == ("confirmed", "spiculated")
    noted = store.add_note(case.id, note="biopsy planned", who=person("Dr C"))
    assert noted.notes == "spiculated\nbiopsy planned"

    rows = [(e.action, e.who, e.field, e.old_value, e.new_value) for e in store.history(case.id)]
    assert rows == [
        ("created", "saver", "predicted_label", None, "benign"),
        ("corrected", "Dr B", "confirmed_label", None, "malignant"),
        ("corrected", "Dr B", "status", "unreviewed", "corrected"),
        ("corrected", "Dr B", "reviewer", "", "Dr B"),
        ("note", "Dr B", "notes", "", "spiculated"),
        ("confirmed", "Dr C", "confirmed_label", "malignant", "benign"),
        ("confirmed", "Dr C", "status", "corrected", "confirmed"),
        ("confirmed", "Dr C", "reviewer", "Dr B", "Dr C"),
        ("note", "Dr C", "notes", "spiculated", "spiculated\nbiopsy planned"),
    ]


def test_re_review_with_same_label_is_still_audited(store: CaseStore) -> None:
    case = save(store, predicted="normal")
    store.review_case(case.id, label="normal", who=person("Dr A"))
    store.review_case(case.id, label="normal", who=person("Dr A"))
    actions = [(e.action, e.field) for e in store.history(case.id)]
    assert actions.count(("confirmed", "confirmed_label")) == 2
    assert actions.count(("confirmed", "status")) == 1


def test_invalid_input_is_refused_with_a_message(store: CaseStore) -> None:
    case = save(store)
    with pytest.raises(InvalidCaseError, match="Unknown label 'cyst'") as info:
        store.review_case(case.id, label="cyst", who=person("Dr A"))
    assert isinstance(info.value, BusError) and isinstance(info.value, ValueError)
    with pytest.raises(InvalidCaseError, match="signed"):
        store.review_case(case.id, label="benign", who=person("  "))
    with pytest.raises(InvalidCaseError):
        store.add_note(case.id, note=" ", who=person("Dr A"))
    with pytest.raises(CaseNotFoundError, match="no case number 999"):
        store.review_case(999, label="benign", who=person("Dr A"))
    with pytest.raises(CaseNotFoundError):
        store.history(999)
    with pytest.raises(InvalidCaseError):
        save(store, predicted="unknown")
    with pytest.raises(InvalidCaseError):
        store.save_case(make_image(0), image_name="x", model_name="m", model_hash="",
                        probabilities={"benign": 1.5}, predicted_label="benign", who=person())
    with pytest.raises(MaskError, match="size of its image"):
        save(store, masks=[np.ones((3, 3), bool)])
    with pytest.raises(InvalidImageError):
        store.save_case(np.zeros((4, 4), np.float32), image_name="x", model_name="m",
                        model_hash="", probabilities=PROBS, predicted_label="benign", who=person())
    assert store.get_case(case.id).status == "unreviewed"
    assert len(store.list_cases()) == 1 and len(store.history(case.id)) == 1


def test_audit_log_cannot_be_changed(store: CaseStore) -> None:
    case = save(store)
    store.review_case(case.id, label="normal", who=person("Dr A"))
    statements = ["UPDATE audit_log SET who = 'someone else'", "DELETE FROM audit_log"]
    if store.engine.dialect.name == "postgresql":
        statements.append("TRUNCATE audit_log")
    for statement in statements:
        with pytest.raises(DatabaseError, match="append-only"):
            with store.engine.begin() as conn:
                conn.exec_driver_sql(statement)
    assert [e.who for e in store.history(case.id)][1:] == ["Dr A"] * 3


def test_sqlite_connections_use_wal_timeout_and_foreign_keys(tmp_path: Path) -> None:
    with open_store(tmp_path / "cases.sqlite") as store, store.engine.connect() as conn:
        pragmas = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                   for name in ("journal_mode", "busy_timeout", "foreign_keys")}
        assert pragmas == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1}
    with pytest.raises(DatabaseError, match="FOREIGN KEY"):
        with store.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO audit_log (at, case_id, who, action) "
                                 "VALUES ('now', 12345, 'x', 'note')")


def test_failed_write_leaves_no_partial_case(store: CaseStore,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import bus_core.clinic.cases as store_module

    def broken_audit(*args, **kwargs) -> None:
        raise RuntimeError("crash after the case row was inserted")

    monkeypatch.setattr(store_module, "_audit", broken_audit)
    with pytest.raises(RuntimeError):
        save(store)
    monkeypatch.undo()
    assert store.list_cases() == []
    assert save(store).id >= 1


def _save_then_die(db: str, moment: str) -> None:
    """Save a case in a process killed (SIGKILL) at `moment`: 'rows' (the case's rows written,
    not committed) or 'file' (an image's temporary file written, not yet renamed)."""
    import bus_core.atomic as atomic_module
    import bus_core.clinic.cases as store_module

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with open_store(db) as opened:
        if moment == "rows":
            store_module._audit = die
        else:
            atomic_module.os.replace = die
        save(opened, 7, masks=[np.ones((16, 20), bool)])


@pytest.mark.parametrize("moment", ["rows", "file"])
def test_a_save_killed_before_its_commit_leaves_no_image_after_a_restart(
        store: CaseStore, store_url: str, moment: str) -> None:
    db = store_url
    saved = save(store, 1)
    killed = multiprocessing.get_context("fork").Process(target=_save_then_die, args=(db, moment))
    killed.start()
    killed.join(timeout=60)
    assert killed.exitcode == -signal.SIGKILL
    files = [p for p in store.images_dir.rglob("*") if p.is_file()]
    assert [p for p in files if p.suffix == ".png"] == [store.image_path(saved.image_hash)]
    old = time.time() - PARTIAL_WRITE_AGE_S - 1
    for path in files:
        os.utime(path, (old, old))
    (store.images_dir / ".fresh.png.abc.tmp").write_bytes(b"being written elsewhere")
    with open_store(db) as reopened:
        left = sorted(p.name for p in reopened.images_dir.rglob("*") if p.is_file())
        assert left == sorted([".fresh.png.abc.tmp", f"{saved.image_hash}.png"])
        assert [c.id for c in reopened.list_cases()] == [saved.id]
        assert reopened.load_image(saved).shape == make_image(1).shape


# --- export ----------------------------------------------------------------------------------

def test_export_busi_layout_is_readable(store: CaseStore, tmp_path: Path) -> None:
    mask = np.zeros((16, 20), bool)
    mask[2:6, 2:6] = True
    a = save(store, 1, "benign", masks=[mask, ~mask])
    b = save(store, 2, "malignant")
    c = save(store, 3, "normal")
    store.review_case(a.id, label="benign", who=person("Dr A"), notes="oval, circumscribed")
    store.review_case(b.id, label="normal", who=person("Dr B"))

    out = export_busi(store, tmp_path / "export", who=ADMIN)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "benign/case-1.png", "benign/case-1_mask.png", "benign/case-1_mask_1.png",
        "cases.csv", "normal/case-2.png"]
    with open(out / "cases.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["id"], r["label"], r["predicted"], r["reviewer"]) for r in rows] == [
        ("1", "benign", "benign", "Dr A"), ("2", "normal", "malignant", "Dr B")]
    assert rows[0]["notes"] == "oval, circumscribed" and rows[0]["model"] == "densenet-test"

    records = load_records(out)
    assert [(r.path.name, r.label, len(r.masks)) for r in records] == [
        ("case-1.png", "benign", 2), ("case-2.png", "normal", 0)]
    assert [(r.path.name, r.label) for r in load_records(out / "cases.csv")] == [
        ("case-1.png", "benign"), ("case-2.png", "normal")]

    store.review_case(b.id, label="malignant", who=person("Dr C"))
    export_busi(store, out, only_confirmed=False, who=ADMIN)
    assert [(r.path.name, r.label) for r in load_records(out)] == [
        ("case-1.png", "benign"), ("case-2.png", "malignant"), (f"case-{c.id}.png", "normal")]


# --- concurrency and crashes -----------------------------------------------------------------

def test_two_threads_save_at_once(store: CaseStore) -> None:
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(20):
                save(store, seed=offset + i, who=person(f"thread {offset}"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 100,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list_cases(owner="thread 0")) == 20
    assert len(store.list_cases(owner="thread 100")) == 20
    assert len({c.id for c in store.list_cases()}) == 40


@pytest.mark.slow
def test_two_processes_save_at_once(store_url: str) -> None:
    """Two processes open a new database at once (both migrate it) and save cases."""
    db = store_url
    workers = run_workers(db, [1, 2], 20)
    for worker in workers:
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr
    assert assert_consistent(db) == 40
    with open_store(db) as s:
        assert len(s.list_cases(owner="worker 1")) == 20


@pytest.mark.slow
def test_killed_writer_leaves_database_consistent(store_url: str) -> None:
    """Writers killed at different moments of a save; each next one carries on."""
    db = store_url
    total = 0
    for seed, delay in enumerate((0.0, 0.003, 0.011)):
        (worker,) = run_workers(db, [seed], -1)
        try:
            saved = 0
            while saved < 5:
                line = worker.stdout.readline()
                assert line, worker.stderr.read()
                saved = int(line)
            time.sleep(delay)
        finally:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        assert worker.returncode == -signal.SIGKILL
        total += saved
        assert assert_consistent(db) >= total


LOCKER = """
import sys
from bus_core.clinic.cases import open_store

with open_store(sys.argv[1]) as store, store.locked("test"):
    print("locked", flush=True)
"""


@pytest.mark.slow
def test_database_lock_makes_other_processes_wait(store: CaseStore, store_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with store.locked("test"):
        other = subprocess.Popen([sys.executable, "-c", LOCKER, store_url], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            other.communicate(timeout=3)
    assert other.communicate(timeout=30)[0] == "locked\n"


def test_postgresql_writers_take_the_write_lock(postgres_server: str, tmp_path: Path) -> None:
    with open_store(new_postgres_database(postgres_server), images_dir=tmp_path) as store, \
            store.transaction(write=True) as conn:
        assert conn.exec_driver_sql(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted").scalar() == 1


# --- locations and errors --------------------------------------------------------------------

def test_default_location_follows_bus_data_dir(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    with open_store() as s:
        save(s)
        assert s.images_dir == tmp_path / "userdata" / "images"
    assert (tmp_path / "userdata" / "cases.sqlite").is_file()
    with open_store(tmp_path / "userdata") as s:
        assert len(s.list_cases()) == 1


def test_bus_database_url_is_the_default_database(store_url: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    url = store_url if "://" in store_url else f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("BUS_DATABASE_URL", url)
    with open_store() as s:
        case = save(s)
        assert s.engine.url.render_as_string(hide_password=False) == url
    with open_store(url) as s:
        assert s.get_case(case.id).image_hash == case.image_hash
    assert not (tmp_path / "cases.sqlite").exists()


def test_sqlalchemy_url_with_images_dir(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'url.db'}"
    with open_store(url, images_dir=tmp_path / "blobs") as s:
        case = save(s)
        assert s.image_path(case.image_hash).parent.parent == tmp_path / "blobs"
    with open_store(url, images_dir=tmp_path / "blobs") as s:
        np.testing.assert_array_equal(s.load_image(s.get_case(case.id)), make_image(0))


def test_unwritable_folder_gives_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=r"Cannot write to .*a-file.*Set BUS_DATA_DIR"):
        open_store(blocker / "data" / "cases.sqlite")
    with pytest.raises(StoreError, match="Cannot write to"):
        open_store(tmp_path / "ok.sqlite", images_dir=blocker / "images")


def test_unknown_database_address_gives_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="Cannot open the case database nosuchdb"):
        open_store("nosuchdb://host/cases", images_dir=tmp_path / "images")


def test_read_only_folder_gives_store_error(tmp_path: Path) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: folder permissions do not block writes")
        with pytest.raises(StoreError, match="Set BUS_DATA_DIR"):
            open_store(folder / "cases.sqlite")
    finally:
        folder.chmod(0o700)


def test_missing_image_file_is_reported(store: CaseStore) -> None:
    case = save(store)
    store.image_path(case.image_hash).unlink()
    with pytest.raises(StoreError, match=f"case {case.id}.*missing"):
        store.load_image(case)


# --- migrations ------------------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
CREATE TABLE cases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created_at VARCHAR(40) NOT NULL,
    image_hash VARCHAR(64) NOT NULL, image_name TEXT NOT NULL, mask_hashes TEXT NOT NULL,
    combine_mode VARCHAR(32), model_name TEXT NOT NULL, model_hash VARCHAR(64) NOT NULL,
    probabilities TEXT NOT NULL, predicted_label VARCHAR(32) NOT NULL,
    confirmed_label VARCHAR(32));
"""
V1_CASES = [
    dict(created_at="2024-01-02T10:00:00.000000+00:00", image_hash="aa", image_name="one.png",
         mask_hashes="[]", combine_mode=None, model_name="old-model", model_hash="h1",
         probabilities='{"benign": 0.9, "normal": 0.1}', predicted_label="benign",
         confirmed_label=None),
    dict(created_at="2024-01-03T10:00:00.000000+00:00", image_hash="bb", image_name="two.png",
         mask_hashes='["cc"]', combine_mode="union", model_name="old-model", model_hash="h1",
         probabilities='{"malignant": 0.6, "benign": 0.4}', predicted_label="malignant",
         confirmed_label="benign"),
]


def table_names(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger')")}


def make_v1_database(db: str) -> None:
    """A schema-1 database with the two V1_CASES (ids 1 and 2): V1_SCHEMA on SQLite, the
    first migration step on PostgreSQL."""
    from sqlalchemy import create_engine, insert, text

    from bus_core.clinic.schema import MIGRATIONS, schema_version

    if "://" not in db:
        with sqlite3.connect(db) as conn:
            conn.executescript(V1_SCHEMA)
        db = f"sqlite:///{db}"
    engine = create_engine(db)
    with engine.begin() as conn:
        if conn.dialect.name != "sqlite":
            MIGRATIONS[0](conn)
            schema_version.create(conn)
            conn.execute(insert(schema_version).values(version=1))
        columns = list(V1_CASES[0])
        conn.execute(text(f"INSERT INTO cases ({', '.join(columns)}) VALUES "
                          f"({', '.join(':' + c for c in columns)})"), V1_CASES)
    engine.dispose()


def test_empty_database_is_migrated_to_current(tmp_path: Path) -> None:
    db = tmp_path / "empty.sqlite"
    sqlite3.connect(db).close()
    with open_store(db) as s:
        assert s.schema_version() == CURRENT_SCHEMA_VERSION == 8
        assert s.migrate() == 8
    assert {"schema_version", "cases", "studies", "audit_log", "audit_log_no_update",
            "audit_log_no_delete", "users", "account_log", "account_log_no_update",
            "account_log_no_delete", "model_decisions", "model_decisions_no_update",
            "model_decisions_no_delete"} <= table_names(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone() == (1,)


def test_version_1_database_is_upgraded_keeping_rows(store_url: str) -> None:
    db = store_url
    make_v1_database(db)
    if "://" not in db:
        assert "audit_log" not in table_names(Path(db))

    with open_store(db) as s:
        assert s.schema_version() == 8
        one, two = s.get_case(1), s.get_case(2)
        assert one.mask_source is None and one.uncertain is False and one.owner is None
        assert one.pacs is None and two.pacs is None
        assert (one.flagged, one.study_id) == (None, None)
        # the probability of malignancy became a column, so the worklist sorts by suspicion
        assert [c.id for c in s.list_cases(order_by="p_malignant")] == [2, 1]
        assert s.list_cases(flagged=True) == [] and s.count_cases(flagged=False) == 2
        assert (one.status, one.reviewer, one.notes, one.cam_settings) == (
            "unreviewed", "", "", None)
        assert one.updated_at == one.created_at == "2024-01-02T10:00:00.000000+00:00"
        assert (two.status, two.confirmed_label, two.mask_hashes, two.combine_mode) == (
            "corrected", "benign", ("cc",), "union")
        assert [(e.action, e.new_value) for e in s.history(2)] == [
            ("created", "malignant"), ("corrected", "benign")]
        reviewed = s.review_case(1, label="normal", who=person("Dr A"), notes="migrated")
        assert reviewed.status == "corrected" and reviewed.notes == "migrated"
        assert save(s).id == 3
    with open_store(db) as s:
        assert len(s.history(1)) == 5 and len(s.list_cases()) == 3


def test_mask_source_is_stored_and_checked(store: CaseStore, tmp_path: Path) -> None:
    image = make_image(2)
    mask = np.zeros(image.shape[:2], bool)
    mask[2:6, 2:6] = True
    kwargs = dict(image_name="a.png", model_name="m", model_hash="f" * 64, probabilities=PROBS,
                  predicted_label="benign", who=person())
    case = store.save_case(image, masks=[mask], mask_source="suggested, edited", **kwargs)
    assert store.get_case(case.id).mask_source == "suggested, edited"
    assert store.save_case(image, mask_source="painted", **kwargs).mask_source is None  # no mask
    with pytest.raises(InvalidCaseError, match="Unknown mask source"):
        store.save_case(image, masks=[mask], mask_source="guessed", **kwargs)
    store.review_case(case.id, label="benign", who=person("Dr A"))
    folder = export_busi(store, tmp_path / "out", who=ADMIN)
    rows = list(csv.DictReader(open(folder / "cases.csv")))
    assert rows[0]["mask_source"] == "suggested, edited"


def test_newer_database_is_refused(store_url: str) -> None:
    with open_store(store_url) as s, s.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="newer version"):
        open_store(store_url)


def test_exported_csv_cells_are_not_formulas(store: CaseStore, tmp_path: Path) -> None:
    from bus_core.data.dataset import csv_safe

    case = save(store, 4, "benign")
    store.review_case(case.id, label="benign", who=person('=HYPERLINK("http://x")'),
                      notes="+1 agree; -2 no; @SUM(A1)")
    out = export_busi(store, tmp_path / "export", who=ADMIN)
    with open(out / "cases.csv", newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["reviewer"].startswith("'=") and row["notes"].startswith("'+1")
    assert csv_safe(0.5) == 0.5 and csv_safe("benign") == "benign"


def test_uncertain_readings_are_stored_shown_and_not_disagreements(store: CaseStore,
                                                                   tmp_path: Path) -> None:
    case = save(store, uncertain=True)
    assert case.uncertain and case.reading == "uncertain (leans benign)"
    assert save(store, seed=1).reading == "benign"
    labelled = store.review_case(case.id, label="malignant", who=person("Dr A"))
    assert labelled.status == "labelled"  # no answer to disagree with
    assert store.review_case(case.id, label="benign", who=person("Dr A")).status == "labelled"
    assert store.list_cases(status="labelled") == [store.get_case(case.id)]
    out = export_busi(store, tmp_path / "export", who=ADMIN)
    rows = list(csv.DictReader(open(out / "cases.csv", encoding="utf-8")))
    assert [(r["predicted"], r["uncertain"], r["status"]) for r in rows] == [
        ("benign", "yes", "labelled")]


def test_pacs_source_is_kept_checked_and_not_exported(store: CaseStore, tmp_path: Path) -> None:
    source = PacsSource("main", "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2",
                        "1.2.826.0.1.3680043.8.498.3")
    case = save(store, pacs=source)
    assert case.pacs == source and store.get_case(case.id).pacs == source
    assert save(store, seed=1).pacs is None
    for wrong in (PacsSource("main", "1.2.x", "1.2", "1.3"),
                  PacsSource("main", "1.2", "1.2", "1." + "2" * 70),
                  PacsSource(" ", "1.2", "1.2", "1.3")):
        with pytest.raises(InvalidCaseError):
            save(store, seed=2, pacs=wrong)
    store.review_case(case.id, label="benign", who=person("Dr A"))
    out = export_busi(store, tmp_path / "export", who=ADMIN)
    assert source.study_uid not in (out / "cases.csv").read_text()


def test_the_export_has_one_percent_column_per_class_and_local_minutes(store, tmp_path):
    case = save(store, 1, "benign")
    store.review_case(case.id, label="benign", who=person("Dr A"))
    out = export_busi(store, tmp_path / "export", who=ADMIN)
    with open(out / "cases.csv", newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert "probabilities" not in row
    assert [row[f"{c}_percent"] for c in ("normal", "benign", "malignant")] == [
        "10.0", "70.0", "20.0"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", row["created_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", row["updated_at"])


# --- worklist and studies -----------------------------------------------------------------------

def test_worklist_filters_counts_suspicion_and_paging(store: CaseStore) -> None:
    def probs(p_malignant: float) -> dict[str, float]:
        return {"normal": 0.1, "benign": 0.9 - p_malignant, "malignant": p_malignant}

    a = store.save_case(make_image(1), image_name="a.png", model_name="m", model_hash="h",
                        probabilities=probs(0.8), predicted_label="malignant", flagged=True,
                        who=person("ann"))
    b = store.save_case(make_image(2), image_name="b.png", model_name="m", model_hash="h",
                        probabilities=probs(0.3), predicted_label="benign", flagged=True,
                        uncertain=True, who=person("bob"))
    c = store.save_case(make_image(3), image_name="c.png", model_name="m", model_hash="h",
                        probabilities=probs(0.05), predicted_label="benign", flagged=False,
                        who=person("ann"))
    d = save(store, 4)  # flag not known (saved without it)
    store.review_case(c.id, label="normal", who=person("cid"))
    assert (a.flagged, b.flagged, c.flagged, d.flagged) == (True, True, False, None)

    def ids(**filters) -> list[int]:
        return [case.id for case in store.list_cases(**filters)]

    assert ids(order_by="p_malignant") == [a.id, b.id, d.id, c.id]
    assert ids(order_by="p_malignant", descending=False) == [c.id, d.id, b.id, a.id]
    assert ids(flagged=True) == [b.id, a.id] and ids(flagged=False) == [d.id, c.id]
    assert ids(uncertain=True) == [b.id] and ids(uncertain=False) == [d.id, c.id, a.id]
    assert ids(status="unreviewed", flagged=True, order_by="p_malignant") == [a.id, b.id]
    assert ids(order_by="created_at", descending=False, limit=2, offset=1) == [b.id, c.id]
    assert ids(order_by="created_at", descending=False, limit=2, offset=3) == [d.id]
    assert store.count_cases() == 4 and store.count_cases(owner="ann") == 2
    assert store.count_cases(status="unreviewed", flagged=True) == 2
    assert store.worklist_counts() == {"all": 4, "to_review": 3, "flagged": 2, "uncertain": 1,
                                       "disagreements": 1}
    assert store.worklist_counts(owner="ann") == {"all": 2, "to_review": 1, "flagged": 1,
                                                  "uncertain": 0, "disagreements": 1}
    assert store.distinct_people() == {"owner": ["Dr Test", "ann", "bob"], "reviewer": ["cid"]}


def test_five_thousand_cases_are_paged_and_counted(store: CaseStore) -> None:
    """A worklist of 5,000 cases: counts, one page by suspicion, the last page."""
    from sqlalchemy import insert

    from bus_core.clinic.schema import cases as cases_table

    first = save(store, 1)
    base = {k: v for k, v in store.engine.connect().execute(
        cases_table.select().where(cases_table.c.id == first.id)).mappings().one().items()
        if k != "id"}
    rows = [dict(base, p_malignant=i / 5000, flagged=i % 3 == 0,
                 status="unreviewed" if i % 2 else "confirmed") for i in range(4999)]
    with store.transaction(write=True) as conn:
        conn.execute(insert(cases_table), rows)
    assert store.count_cases() == 5000
    counts = store.worklist_counts()
    assert counts["all"] == 5000 and counts["to_review"] == 1 + 2499
    assert counts["flagged"] == sum(1 for i in range(4999) if i % 2 and i % 3 == 0)
    page = store.list_cases(status="unreviewed", order_by="p_malignant", limit=50)
    assert len(page) == 50 and page[0].probabilities == PROBS  # every row is a copy of the first
    last = store.list_cases(order_by="id", descending=False, limit=50, offset=4980)
    assert [c.id for c in last][-1] == max(c.id for c in store.list_cases(limit=1)) \
        and len(last) == 20


def new_case(seed: int, **kwargs) -> NewCase:
    kwargs.setdefault("model_name", "densenet-test")
    kwargs.setdefault("model_hash", "ab" * 32)
    return NewCase(image=make_image(seed), image_name=f"img{seed}.png", probabilities=PROBS,
                   predicted_label="benign", **kwargs)


READING = StudyReadingRecord(rule="least-normal", probabilities=PROBS, predicted_label="benign",
                             uncertain=False, flagged=True)


def test_a_study_keeps_its_images_reading_and_pacs_study(store: CaseStore) -> None:
    one = PacsSource("Main PACS", "1.2.3", "1.2.3.4", "1.2.3.4.1")
    two = PacsSource("Main PACS", "1.2.3", "1.2.3.5", "1.2.3.5.1")
    study = store.save_study([new_case(1, pacs=one, flagged=True), new_case(2, pacs=two)],
                             READING, who=person("ann"))
    assert (study.owner, study.rule, study.predicted_label, study.flagged, study.reading) == (
        "ann", "least-normal", "benign", True, "benign")
    assert (study.pacs_endpoint, study.study_uid) == ("Main PACS", "1.2.3")
    assert study.probabilities == PROBS and len(study.case_ids) == 2
    members = [store.get_case(i) for i in study.case_ids]
    assert [c.study_id for c in members] == [study.id, study.id]
    assert [c.pacs for c in members] == [one, two]
    assert [c.flagged for c in members] == [True, None]
    assert [c.id for c in store.list_cases(study_id=study.id)] == list(study.case_ids)[::-1]
    assert store.get_study(study.id) == study
    mixed = store.save_study([new_case(3, pacs=one), new_case(4)], READING, who=person())
    assert (mixed.pacs_endpoint, mixed.study_uid) == (None, None)
    assert save(store, 5).study_id is None
    with pytest.raises(CaseNotFoundError, match="no study number 99"):
        store.get_study(99)


def test_a_study_is_saved_whole_or_not_at_all(store: CaseStore) -> None:
    bad_mask = np.zeros((3, 3), bool)  # not the image's size
    with pytest.raises(MaskError):
        store.save_study([new_case(1), new_case(2, masks=[bad_mask])], READING, who=person())
    with pytest.raises(InvalidCaseError, match="one model"):
        store.save_study([new_case(1), new_case(2, model_hash="cd" * 32)], READING,
                         who=person())
    with pytest.raises(InvalidCaseError, match="study rule"):
        store.save_study([new_case(1)], StudyReadingRecord("vote", PROBS, "benign", False,
                                                           False), who=person())
    with pytest.raises(InvalidCaseError, match="at least one image"):
        store.save_study([], READING, who=person())
    with pytest.raises(BusError):
        store.save_study([new_case(1)], READING, who=person("teacher", "teacher"))
    assert store.count_cases() == 0 and png_files(store) == []
