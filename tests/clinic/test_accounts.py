"""Local accounts (bus_core.clinic.accounts), roles (bus_core.roles) and the `users` command."""

from __future__ import annotations

import io
import multiprocessing
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from unittest import mock

import numpy as np
import pytest
from sqlalchemy import event
from sqlalchemy.exc import DatabaseError

from bus_core.cli.main import main
from bus_core.clinic import accounts as accounts_module
from bus_core.clinic.accounts import (
    CANNOT_RECORD_SIGN_IN,
    LOCK_AFTER,
    LOCK_MINUTES,
    MAX_SESSION_HOURS,
    ROLES_CLAIM_ENV,
    WRONG_SIGN_IN,
    AccountError,
    Accounts,
    SignInError,
    claimed_roles,
    identity_from_claims,
    new_session,
)
from bus_core.clinic.cases import CaseStore, open_store
from bus_core.clinic.export import export_busi
from bus_core.clinic.gate import activate_if_passed, compare
from bus_core.db import default_db_path
from bus_core.errors import StoreError
from bus_core.models.registry import delete_model, import_model, set_active_model
from bus_core.roles import ACTIONS, DEMO, ROLES, Identity, PermissionDeniedError, operator
from bus_core.training.jobs import start_training
from bus_core.training.train import TrainConfig
from tests.conftest import person

PASSWORD = "correct horse battery"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(tmp_path) -> CaseStore:
    with open_store(tmp_path / "cases.sqlite") as opened:
        yield opened


@pytest.fixture
def both_stores(store_url) -> CaseStore:
    """A store on SQLite and on PostgreSQL (tests/conftest.py store_url)."""
    with open_store(store_url) as opened:
        yield opened


@pytest.fixture
def accounts(store) -> Accounts:
    accounts = Accounts(store)
    accounts.add(operator(), "ann", ["clinician"], PASSWORD)
    return accounts


def test_password_is_stored_only_as_a_salted_argon2_hash(accounts, store, tmp_path):
    accounts.add(operator(), "bob", ["clinician"], PASSWORD)
    with sqlite3.connect(tmp_path / "cases.sqlite") as conn:
        hashes = dict(conn.execute("SELECT name, password_hash FROM users").fetchall())
    assert all(h.startswith("$argon2id$") and PASSWORD not in h for h in hashes.values())
    assert hashes["ann"] != hashes["bob"]  # salted
    assert accounts.sign_in("ann", PASSWORD) == Identity("ann", frozenset({"clinician"}))
    assert accounts.get("ann").last_signin is not None


def test_wrong_password_unknown_disabled_and_locked_users_get_the_same_message(accounts):
    accounts.add(operator(), "cid", ["educator"], PASSWORD)
    accounts.set_disabled(operator(), "cid")
    accounts.add(operator(), "dan", ["educator"], PASSWORD)
    for _ in range(LOCK_AFTER):
        with pytest.raises(SignInError):
            accounts.sign_in("dan", "not the password", now=NOW)
    answers = set()
    for name, password in (("ann", "wrong password!"), ("nobody", PASSWORD), ("cid", PASSWORD),
                           ("dan", "not the password"), ("dan", PASSWORD)):
        with pytest.raises(SignInError) as refused:
            accounts.sign_in(name, password, now=NOW)
        answers.add(str(refused.value))
    assert answers == {WRONG_SIGN_IN}
    actions = [(e["action"], e["subject"]) for e in accounts.log()]
    assert actions[:5] == [("sign-in refused (locked)", "dan"),
                           ("sign-in refused (locked)", "dan"), ("sign-in failed", "cid"),
                           ("sign-in failed", "nobody"), ("sign-in failed", "ann")]


def test_lock_out_after_repeated_failures_until_it_expires_or_an_admin_resets(accounts):
    for _ in range(LOCK_AFTER):
        with pytest.raises(SignInError, match="Wrong"):
            accounts.sign_in("ann", "not the password", now=NOW)
    with pytest.raises(SignInError):
        accounts.sign_in("ann", PASSWORD, now=NOW + timedelta(seconds=1))  # even when right
    assert accounts.log(1)[0]["action"] == "sign-in refused (locked)"
    later = NOW + timedelta(minutes=LOCK_MINUTES, seconds=1)
    assert accounts.sign_in("ann", PASSWORD, now=later).name == "ann"
    for _ in range(LOCK_AFTER):
        with pytest.raises(SignInError):
            accounts.sign_in("ann", "not the password", now=later)
    assert accounts.get("ann").locked(later)
    accounts.set_password(operator(), "ann", "a brand new password")
    assert not accounts.get("ann").locked(later)
    assert accounts.sign_in("ann", "a brand new password", now=later).name == "ann"
    assert "locked for 15 minutes" in [e["detail"] for e in accounts.log()]


def _verify_then_wait(barrier):
    """accounts._verify that then waits at `barrier`, so every guesser has read what it reads
    before any of them writes."""
    real_verify = accounts_module._verify

    def verify(hashed: str, password: str) -> bool:
        result = real_verify(hashed, password)
        barrier.wait(timeout=60)
        return result
    return verify


def _guess_wrong(store: CaseStore, times: int) -> set[str]:
    answers = set()
    for _ in range(times):
        with pytest.raises(SignInError) as refused:
            Accounts(store).sign_in("ann", "not the password", now=NOW)
        answers.add(str(refused.value))
    return answers


def _guess_wrong_in_a_process(path: str, barrier, times: int) -> None:
    with open_store(path) as store, \
            mock.patch.object(accounts_module, "_verify", _verify_then_wait(barrier)):
        assert _guess_wrong(store, times) == {WRONG_SIGN_IN}


def _assert_locked_after_exactly(accounts: Accounts, guesses: int) -> None:
    details = [e["detail"] for e in accounts.log() if e["subject"] == "ann"
               and e["action"].startswith("sign-in")]
    counted = [d for d in details if d is not None]
    expected = [f"failure {i} of {LOCK_AFTER}" for i in range(1, LOCK_AFTER)]
    assert sorted(counted) == sorted([*expected, f"locked for {LOCK_MINUTES} minutes"])
    assert len(details) == guesses
    assert accounts.get("ann").locked(NOW)


def test_simultaneous_wrong_guesses_cannot_outrun_the_lock(both_stores, monkeypatch):
    accounts = Accounts(both_stores)
    accounts.add(operator(), "ann", ["clinician"], PASSWORD)
    threads, rounds = 10, 3
    monkeypatch.setattr(accounts_module, "_verify",
                        _verify_then_wait(threading.Barrier(threads)))
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(lambda _: _guess_wrong(both_stores, rounds), range(threads)))
    assert set().union(*answers) == {WRONG_SIGN_IN}
    _assert_locked_after_exactly(accounts, threads * rounds)


def test_wrong_guesses_from_two_processes_cannot_outrun_the_lock(tmp_path):
    path = str(tmp_path / "cases.sqlite")
    with open_store(path) as store:
        Accounts(store).add(operator(), "ann", ["clinician"], PASSWORD)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    guessers = [context.Process(target=_guess_wrong_in_a_process,
                                args=(path, barrier, LOCK_AFTER)) for _ in range(2)]
    for guesser in guessers:
        guesser.start()
    for guesser in guessers:
        guesser.join(timeout=120)
    assert [guesser.exitcode for guesser in guessers] == [0, 0]
    with open_store(path) as store:
        _assert_locked_after_exactly(Accounts(store), 2 * LOCK_AFTER)


def test_a_full_database_is_said_plainly_at_sign_in(accounts, store):
    def fill_up(connection, _record) -> None:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages}")

    event.listen(store.engine, "connect", fill_up)
    store.engine.dispose()
    with pytest.raises(StoreError, match="full"):
        for _ in range(10_000):  # until the last page is full too
            accounts.record("test", "filling the database", "x" * 500)
    for password in (PASSWORD, "not the password"):
        with pytest.raises(SignInError) as refused:
            accounts.sign_in("ann", password)
        assert str(refused.value) == CANNOT_RECORD_SIGN_IN


def test_sessions_expire_when_idle_or_too_old(monkeypatch):
    monkeypatch.setenv("BUS_SESSION_IDLE_MINUTES", "30")
    session = new_session(person("ann"), now=NOW)
    assert not session.expired(NOW + timedelta(minutes=29))
    assert session.expired(NOW + timedelta(minutes=31))
    for minutes in range(20, MAX_SESSION_HOURS * 60, 20):  # kept active all day
        session.touch(NOW + timedelta(minutes=minutes))
    assert not session.expired(NOW + timedelta(hours=MAX_SESSION_HOURS) - timedelta(minutes=1))
    assert session.expired(NOW + timedelta(hours=MAX_SESSION_HOURS, minutes=1))


def test_change_own_password_needs_the_current_one(accounts):
    ann = accounts.sign_in("ann", PASSWORD)
    with pytest.raises(AccountError, match="current password is wrong"):
        accounts.set_password(ann, "ann", "another password 1", current="guess")
    with pytest.raises(AccountError, match="at least 10"):
        accounts.set_password(ann, "ann", "short", current=PASSWORD)
    accounts.set_password(ann, "ann", "another password 1", current=PASSWORD)
    assert accounts.sign_in("ann", "another password 1").name == "ann"
    accounts.add(operator(), "bob", ["clinician"], PASSWORD)
    with pytest.raises(PermissionDeniedError):
        accounts.set_password(ann, "bob", "taken over by ann")


@pytest.mark.parametrize("password", [" " * 12, "\t" * 12, "  short   ", "\u3000" * 12])
def test_a_password_of_spaces_is_refused(accounts, password):
    with pytest.raises(AccountError, match="not counting spaces"):
        accounts.add(operator(), "bob", ["clinician"], password)
    with pytest.raises(AccountError, match="not counting spaces"):
        accounts.set_password(operator(), "ann", password)


@pytest.mark.parametrize("name", ["Ann", "ANN", "\u0430nn", "\uff41nn", "a\u0578n"])
def test_a_name_that_looks_like_an_existing_one_is_refused(accounts, name):
    with pytest.raises(AccountError, match="looks too much like the existing user 'ann'"):
        accounts.add(operator(), name, ["clinician"], PASSWORD)
    assert [user.name for user in accounts.list_users()] == ["ann"]
    accounts.add(operator(), "anne", ["clinician"], PASSWORD)  # different names still pass


def test_user_management_needs_admin_and_every_change_is_logged(accounts):
    ann = accounts.sign_in("ann", PASSWORD)
    with pytest.raises(PermissionDeniedError, match="admin"):
        accounts.add(ann, "eve", ["admin"], PASSWORD)
    with pytest.raises(PermissionDeniedError):
        accounts.set_roles(ann, "ann", ["admin"])
    boss = person("boss", "admin")
    accounts.set_roles(boss, "ann", ["clinician", "researcher"])
    assert accounts.refresh(ann) == Identity("ann", frozenset({"clinician", "researcher"}))
    accounts.set_disabled(boss, "ann")
    assert accounts.refresh(ann) is None  # a disabled user's session ends
    with pytest.raises(AccountError, match="own account"):
        accounts.set_disabled(boss, "boss")
    with pytest.raises(AccountError, match="already exists"):
        accounts.add(boss, "ann", ["clinician"], PASSWORD)
    with pytest.raises(AccountError, match="user name"):
        accounts.add(boss, "a,b", ["clinician"], PASSWORD)
    with pytest.raises(AccountError, match="cannot be the user name"):
        accounts.add(boss, "longusername", ["clinician"], "LongUserName")
    log = [(e["who"], e["action"], e["subject"]) for e in accounts.log()]
    assert log[:2] == [("boss", "disabled", "ann"), ("boss", "roles changed", "ann")]


def test_account_log_is_append_only(both_stores):
    Accounts(both_stores).add(operator(), "ann", ["clinician"], PASSWORD)
    for statement in ("UPDATE account_log SET who = 'x'", "DELETE FROM account_log"):
        with pytest.raises(DatabaseError, match="append-only"), both_stores.engine.begin() as conn:
            conn.exec_driver_sql(statement)


def test_roles_allow_their_actions_and_admin_all():
    assert person("a", "admin").can("manage_models") and person("a", "admin").can("diagnose")
    clinician, researcher = person("c", "clinician"), person("r", "researcher")
    assert clinician.can("save_case") and not clinician.can("train")
    assert researcher.can("upload_model") and not researcher.can("manage_models")
    assert {a for a in ACTIONS if DEMO.can(a)} == {"diagnose", "teach"}
    assert {ACTIONS[a] for a in ACTIONS} == set(ROLES)
    with pytest.raises(ValueError):
        clinician.can("fly")


def test_library_actions_refuse_a_user_without_the_role(store, tiny_model_dir, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    educator = person("ed", "educator")
    image = np.zeros((40, 40, 3), np.uint8)
    refused = [
        lambda: store.save_case(image, image_name="x.png", model_name="m", model_hash="h",
                                probabilities={"benign": 1.0}, predicted_label="benign",
                                who=educator),
        lambda: export_busi(store, tmp_path / "out", who=educator),
        lambda: set_active_model(tiny_model_dir, who=person("r", "researcher")),
        lambda: delete_model(tiny_model_dir, who=person("c", "clinician")),
        lambda: import_model({}, who=person("c", "clinician")),
        lambda: start_training(TrainConfig(data=["x"], out=str(tmp_path / "run")),
                               who=person("c", "clinician")),
        lambda: activate_if_passed(compare({}, {}), tiny_model_dir, override_reason="why",
                                   who=person("r", "researcher")),
    ]
    for action in refused:
        with pytest.raises(PermissionDeniedError, match="needs the"):
            action()
    assert store.list_cases() == []


def test_a_clinician_exports_only_their_own_cases(store, tmp_path):
    image = np.zeros((40, 40, 3), np.uint8)
    for i, owner in enumerate(("ann", "bob", "ann")):
        image[0, 0] = i
        case = store.save_case(image, image_name="patient name.png", model_name="m",
                               model_hash="h", probabilities={"benign": 1.0},
                               predicted_label="benign", who=person(owner))
        store.review_case(case.id, label="benign", who=person(owner))
    mine = export_busi(store, tmp_path / "ann", who=person("ann"))
    everyone = export_busi(store, tmp_path / "all", who=person("root", "admin"))
    assert len(list(mine.rglob("case-*.png"))) == 2 and len(list(everyone.rglob("*.png"))) == 3
    text = (everyone / "cases.csv").read_text()
    assert "patient name" not in text and "image-" in text  # pseudonyms, not file names


def test_file_names_are_kept_only_when_the_admin_says_so(store, monkeypatch):
    image = np.zeros((40, 40, 3), np.uint8)
    kwargs = dict(model_name="m", model_hash="h", probabilities={"benign": 1.0},
                  predicted_label="benign", who=person())
    hidden = store.save_case(image, image_name="Jane Doe 1970.png", **kwargs)
    assert "Jane" not in hidden.image_name and hidden.image_name.endswith(".png")
    monkeypatch.setenv("BUS_KEEP_FILE_NAMES", "1")
    assert store.save_case(image, image_name="Jane Doe 1970.png",
                           **kwargs).display_name == "Jane Doe 1970.png"


def test_users_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["users", "add", "admin", "--role", "admin", "--role", "clinician",
                 "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["users", "add", "bob", "--role", "researcher", "--password-stdin"]) == 2
    assert "at least 10 characters" in capsys.readouterr().err
    assert main(["users", "add", "admin", "--role", "admin", "--exist-ok"]) == 0
    assert main(["users", "add", "sso@example.org", "--role", "educator", "--no-password"]) == 0
    assert main(["users", "set-role", "sso@example.org", "educator", "clinician"]) == 0
    assert main(["users", "disable", "sso@example.org"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("another password\n"))
    assert main(["users", "passwd", "admin", "--password-stdin"]) == 0
    capsys.readouterr()
    assert main(["users", "list"]) == 0
    listed = capsys.readouterr().out
    assert "admin,clinician" in listed and "disabled single sign-on" in listed
    with open_store(default_db_path()) as opened:
        accounts = Accounts(opened)
        assert accounts.sign_in("admin", "another password").roles == {"admin", "clinician"}
        assert [e["action"] for e in accounts.log()][1:] == [
            "password changed", "disabled", "roles changed", "user added", "user added"]
    assert main(["users", "set-role", "nobody", "clinician"]) == 2
    assert "no user called 'nobody'" in capsys.readouterr().err
    assert main(["users", "set-role", "admin", "clinician"]) == 2  # the only administrator
    assert "only active administrator" in capsys.readouterr().err


def test_nothing_identifying_of_an_uploaded_dicom_is_stored(store, tmp_path):
    from bus_core.data.images import load_image
    from tests.data.test_images import write_dicom

    pixels = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)
    path = write_dicom(tmp_path / "Doe_Jane_19700101.dcm", pixels, "MONOCHROME2",
                       PatientName="Doe^Jane", PatientID="MRN-99812",
                       PatientBirthDate="19700101", InstitutionName="St Example Hospital")
    image = load_image(path.read_bytes(), name=path.name)
    case = store.save_case(image, image_name=path.name, model_name="m", model_hash="h",
                           probabilities={"benign": 1.0}, predicted_label="benign",
                           who=person())
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != path)
    for secret in (b"Doe", b"Jane", b"MRN-99812", b"19700101", b"St Example"):
        assert secret not in stored
    assert case.display_name == f"image-{case.image_hash[:12]}.dcm"


def test_the_last_active_admin_keeps_the_role_and_stays_enabled(accounts):
    accounts.add(operator(), "root", ["admin"], PASSWORD)
    root = accounts.sign_in("root", PASSWORD)
    with pytest.raises(AccountError, match="only active administrator"):
        accounts.set_roles(root, "root", ["clinician"])
    with pytest.raises(AccountError, match="only active administrator"):
        accounts.set_disabled(person("boss", "admin"), "root")
    assert accounts.get("root").roles == {"admin"} and not accounts.get("root").disabled
    accounts.add(root, "deputy", ["admin", "clinician"], PASSWORD)
    accounts.set_roles(root, "root", ["clinician"])  # another admin remains
    assert accounts.get("root").roles == {"clinician"}
    with pytest.raises(AccountError, match="only active administrator"):
        accounts.set_disabled(person("boss", "admin"), "deputy")


def test_single_sign_on_claims_name_the_user_by_a_verified_address(accounts, monkeypatch):
    monkeypatch.delenv(ROLES_CLAIM_ENV, raising=False)
    claims = {"sub": "x1", "email": "ann@example.org", "preferred_username": "ann",
              "roles": "Clinician, radiologist-in-chief"}
    found = identity_from_claims(claims, accounts)
    assert (found.name, found.roles, found.source) == ("ann@example.org",
                                                       frozenset({"clinician"}), "oidc")
    unverified = identity_from_claims({**claims, "email_verified": False}, accounts)
    assert unverified.name == "ann"
    assert identity_from_claims({"sub": "x1"}, accounts).name == "x1"


def test_single_sign_on_roles_come_from_the_claim_named_else_from_the_app(accounts,
                                                                         monkeypatch):
    accounts.add(operator(), "bob@example.org", ["researcher"], None)
    claims = {"sub": "x2", "email": "bob@example.org", "groups": ["admin", "unknown"]}
    monkeypatch.delenv(ROLES_CLAIM_ENV, raising=False)
    assert identity_from_claims(claims, accounts).roles == frozenset({"researcher"})
    monkeypatch.setenv(ROLES_CLAIM_ENV, "groups")
    assert identity_from_claims(claims, accounts).roles == frozenset({"admin"})
    assert claimed_roles(None) == frozenset()
