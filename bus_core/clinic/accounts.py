"""Local accounts: users with roles, passwords kept only as argon2 hashes, lock-out after
repeated failures, sessions that expire, and the audit log of every sign-in and change.

The users live in the case store's database (tables `users` and `account_log`, see
bus_core.clinic.cases). Single sign-on users (bus_core.roles source 'oidc') may have a row without a
password: it gives them their roles when the provider sends none.

Rules:
- A password has at least `MIN_PASSWORD_LENGTH` characters besides spaces at its ends and is
  not the user's name.
- A new user name may not look like an existing one: the same after Unicode compatibility
  normalisation (NFKC) and case folding, or confusable with it (Unicode's confusables, e.g. a
  Cyrillic 'а' for a Latin 'a').
- `LOCK_AFTER` failed sign-ins in a row lock the account for `LOCK_MINUTES`; a new password
  set by an administrator unlocks it.
- A wrong password, an unknown, disabled or locked user get the same message; the failure
  count is raised in one statement, so simultaneous guesses cannot outrun the lock.
- A session ends after `idle_minutes()` without activity or `MAX_SESSION_HOURS` in all.
- The last active administrator can neither lose the admin role nor be disabled.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from confusables import is_confusable
from sqlalchemy import Connection, RowMapping, func, insert, select, update

from bus_core.clinic.cases import CaseStore
from bus_core.clinic.schema import account_log, users
from bus_core.errors import BusError, StoreError
from bus_core.roles import ROLES, Identity, check_roles, require

logger = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 10
LOCK_AFTER = 5
LOCK_MINUTES = 15
MAX_SESSION_HOURS = 12
DEFAULT_IDLE_MINUTES = 30
MAX_NAME_LENGTH = 64

_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash("not a password of anyone")
"""Checked against for unknown users, so their sign-in takes as long as a real one."""


WRONG_SIGN_IN = (f"Wrong username or password. After {LOCK_AFTER} failed sign-ins in a row an "
                 f"account is locked for {LOCK_MINUTES} minutes; an administrator can unlock "
                 "it by setting a new password.")
"""The one answer to every refused sign-in: unknown, disabled or locked users and wrong
passwords alike, so it tells nobody which user names exist."""
CANNOT_RECORD_SIGN_IN = ("Nobody can sign in right now: the server cannot write to its database "
                         "(its disk may be full), and every sign-in is recorded. Ask whoever "
                         "runs the server to free space, then try again.")
"""The answer to every sign-in while the database cannot be written."""


class AccountError(BusError):
    """An account cannot be created or changed (name taken, weak password, unknown user...)."""


class SignInError(BusError):
    """A sign-in was refused (wrong name or password, locked, disabled)."""


@dataclass(frozen=True)
class User:
    """One local account as stored (times UTC ISO-8601); never holds the password."""

    name: str
    roles: frozenset[str]
    has_password: bool
    disabled: bool
    failed_signins: int
    locked_until: str | None
    created_at: str
    last_signin: str | None

    def identity(self, source: str = "local") -> Identity:
        """The identity this user acts as."""
        return Identity(name=self.name, roles=self.roles, source=source)

    def locked(self, now: datetime | None = None) -> bool:
        """Whether failed sign-ins lock the account at `now`."""
        return self.locked_until is not None and \
            datetime.fromisoformat(self.locked_until) > (now or _utcnow())


@dataclass
class Session:
    """A signed-in browser session: who, since when, and when it was last used."""

    identity: Identity
    started: datetime
    last_seen: datetime

    def expired(self, now: datetime | None = None) -> bool:
        """Whether the session has ended (idle too long, or too old)."""
        now = now or _utcnow()
        return (now - self.last_seen > timedelta(minutes=idle_minutes())
                or now - self.started > timedelta(hours=MAX_SESSION_HOURS))

    def touch(self, now: datetime | None = None) -> None:
        """Record activity at `now`."""
        self.last_seen = now or _utcnow()


def idle_minutes() -> int:
    """Minutes without activity after which a session ends ($BUS_SESSION_IDLE_MINUTES, 30)."""
    try:
        return max(1, int(os.environ.get("BUS_SESSION_IDLE_MINUTES", DEFAULT_IDLE_MINUTES)))
    except ValueError:
        return DEFAULT_IDLE_MINUTES


def new_session(identity: Identity, now: datetime | None = None) -> Session:
    """A session for `identity` starting at `now`."""
    now = now or _utcnow()
    return Session(identity=identity, started=now, last_seen=now)


class Accounts:
    """The local accounts of a case store's database."""

    def __init__(self, store: CaseStore) -> None:
        self.store = store

    # -- reading --

    def count(self) -> int:
        """How many users exist (disabled ones included)."""
        with self.store.transaction() as conn:
            return int(conn.execute(select(func.count()).select_from(users)).scalar_one())

    def list_users(self) -> list[User]:
        """Every user, by name."""
        with self.store.transaction() as conn:
            rows = conn.execute(select(users).order_by(users.c.name)).mappings().all()
        return [_user(row) for row in rows]

    def get(self, name: str) -> User | None:
        """The user called `name`, or None."""
        with self.store.transaction() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).mappings().first()
        return None if row is None else _user(row)

    def log(self, limit: int | None = None) -> list[dict[str, str | None]]:
        """The account audit log, newest first."""
        query = select(account_log).order_by(account_log.c.id.desc()).limit(limit)
        with self.store.transaction() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    # -- signing in --

    def sign_in(self, name: str, password: str, now: datetime | None = None) -> Identity:
        """The identity of a correct name and password (the failure count is reset); else
        `SignInError` with `WRONG_SIGN_IN` whatever the reason (only the log tells a locked
        account apart), the failure counted and logged, the account locked after
        `LOCK_AFTER` failures in a row; `CANNOT_RECORD_SIGN_IN` to everyone while the database
        cannot be written."""
        now = now or _utcnow()
        name = name.strip()
        stored = self._password_hash(name)
        correct = _verify(stored or _DUMMY_HASH, password) and stored is not None
        try:
            return self._record_sign_in(name, password, stored, correct, now)
        except StoreError as exc:
            logger.error("A sign-in could not be recorded: %s", exc)
            raise SignInError(CANNOT_RECORD_SIGN_IN) from exc

    def _record_sign_in(self, name: str, password: str, stored: str | None, correct: bool,
                        now: datetime) -> Identity:
        """Count and log a sign-in whose password check gave `correct`; the identity when it
        succeeds, else `SignInError`."""
        with self.store.transaction(write=True) as conn:
            row = conn.execute(select(users).where(users.c.name == name)).mappings().first()
            user = None if row is None else _user(row)
            if user is None or user.disabled:
                _log(conn, name[:MAX_NAME_LENGTH], "sign-in failed", name[:MAX_NAME_LENGTH],
                     None, now)
            elif user.locked(now):
                _log(conn, name, "sign-in refused (locked)", name, None, now)
            elif not correct:
                self._count_failure(conn, name, now)
            else:
                conn.execute(update(users).where(users.c.name == name).values(
                    failed_signins=0, locked_until=None, last_signin=_iso(now)))
                if stored is not None and _HASHER.check_needs_rehash(stored):
                    conn.execute(update(users).where(users.c.name == name).values(
                        password_hash=_HASHER.hash(password)))
                _log(conn, name, "signed in", name, None, now)
                return user.identity()
        raise SignInError(WRONG_SIGN_IN)

    @staticmethod
    def _count_failure(conn: Connection, name: str, now: datetime) -> None:
        """One more failure of `name`, counted in one statement; the lock follows from the
        count it returns."""
        failures = conn.execute(update(users).where(users.c.name == name).values(
            failed_signins=users.c.failed_signins + 1).returning(
            users.c.failed_signins)).scalar_one()
        detail = f"failure {failures} of {LOCK_AFTER}"
        if failures >= LOCK_AFTER:
            conn.execute(update(users).where(users.c.name == name).values(
                failed_signins=0, locked_until=_iso(now + timedelta(minutes=LOCK_MINUTES))))
            detail = f"locked for {LOCK_MINUTES} minutes"
        _log(conn, name, "sign-in failed", name, detail, now)

    def refresh(self, identity: Identity) -> Identity | None:
        """The identity with its current roles, or None when the local user was disabled or
        removed since signing in (single sign-on identities keep their own roles unless
        a local row disables them)."""
        user = self.get(identity.name)
        if identity.source != "local":
            return None if user is not None and user.disabled else identity
        if user is None or user.disabled:
            return None
        return user.identity()

    def roles_of(self, name: str) -> frozenset[str]:
        """The roles a local row gives `name` (empty when there is none or it is disabled)."""
        user = self.get(name)
        return frozenset() if user is None or user.disabled else user.roles

    def record(self, who: str, action: str, subject: str | None = None,
               detail: str | None = None, *, now: datetime | None = None) -> None:
        """Append an entry to the account audit log (e.g. 'signed out')."""
        with self.store.transaction(write=True) as conn:
            _log(conn, who, action, subject, detail, now or _utcnow())

    # -- managing (admin) --

    def add(self, by: Identity, name: str, roles: Iterable[str], password: str | None) -> User:
        """Create a user (role admin needed; with no user at all, the command line creates
        the first one). `password` None: a single-sign-on user whose roles are kept here."""
        require(by, "manage_users")
        name = check_name(name)
        roles = check_roles(roles)
        if not roles:
            raise AccountError("Give the user at least one role.")
        hashed = None if password is None else _HASHER.hash(check_password(password, name))
        now = _iso(_utcnow())
        with self.store.transaction(write=True) as conn:
            for (existing,) in conn.execute(select(users.c.name)):
                if existing == name:
                    raise AccountError(f"A user called {name!r} already exists.")
                if looks_alike(existing, name):
                    raise AccountError(f"{name!r} looks too much like the existing user "
                                       f"{existing!r}: choose a name nobody can mistake for it.")
            conn.execute(insert(users).values(
                name=name, roles=",".join(sorted(roles)), password_hash=hashed, disabled=False,
                failed_signins=0, locked_until=None, created_at=now, updated_at=now,
                last_signin=None))
            _log(conn, by.name, "user added", name, f"roles {', '.join(sorted(roles))}",
                 _utcnow())
        return self._existing(name)

    def set_roles(self, by: Identity, name: str, roles: Iterable[str]) -> User:
        """Replace a user's roles (role admin needed)."""
        require(by, "manage_users")
        roles = check_roles(roles)
        if not roles:
            raise AccountError("Give the user at least one role (or disable the account).")
        old = self._existing(name)
        self._change(by, name, "roles changed",
                     f"{', '.join(sorted(old.roles))} -> {', '.join(sorted(roles))}",
                     keeps_admin="admin" in roles, roles=",".join(sorted(roles)))
        return self._existing(name)

    def set_disabled(self, by: Identity, name: str, disabled: bool = True) -> User:
        """Disable (or enable again) a user (role admin needed); a user cannot disable
        themselves."""
        require(by, "manage_users")
        if disabled and name == by.name:
            raise AccountError("You cannot disable your own account.")
        self._existing(name)
        self._change(by, name, "disabled" if disabled else "enabled", None,
                     keeps_admin=not disabled, disabled=disabled)
        return self._existing(name)

    def set_password(self, by: Identity, name: str, password: str,
                     current: str | None = None) -> None:
        """Set a user's password: an admin for anyone, a user for themselves (giving their
        `current` password). Unlocks the account."""
        self._existing(name)
        if by.name == name and not by.can("manage_users"):
            stored = self._password_hash(name)
            if stored is None or not _verify(stored, current or ""):
                raise AccountError("The current password is wrong.")
        else:
            require(by, "manage_users")
        hashed = _HASHER.hash(check_password(password, name))
        self._change(by, name, "password changed", None, password_hash=hashed,
                     failed_signins=0, locked_until=None)

    def _change(self, by: Identity, name: str, action: str, detail: str | None,
                keeps_admin: bool = True, **values: object) -> None:
        with self.store.transaction(write=True) as conn:
            if not keeps_admin:
                _refuse_removing_last_admin(conn, name)
            conn.execute(update(users).where(users.c.name == name).values(
                **values, updated_at=_iso(_utcnow())))
            _log(conn, by.name, action, name, detail, _utcnow())

    def _existing(self, name: str) -> User:
        user = self.get(name)
        if user is None:
            raise AccountError(f"There is no user called {name!r}.")
        return user

    def _password_hash(self, name: str) -> str | None:
        with self.store.transaction() as conn:
            return conn.execute(select(users.c.password_hash).where(
                users.c.name == name)).scalar()


def _refuse_removing_last_admin(conn: Connection, name: str) -> None:
    """AccountError when `name` is the only active administrator."""
    active = [row.name for row in conn.execute(
        select(users.c.name, users.c.roles).where(users.c.disabled.is_(False)))
        if "admin" in row.roles.split(",")]
    if active == [name]:
        raise AccountError(f"{name} is the only active administrator: make another user an "
                           "administrator first, or the app would have none.")


def check_name(name: str) -> str:
    """A user name as stored: stripped; 1 to 64 printable characters, no commas."""
    clean = name.strip()
    if not clean or len(clean) > MAX_NAME_LENGTH or not clean.isprintable() or "," in clean:
        raise AccountError(f"A user name has 1 to {MAX_NAME_LENGTH} printable characters and no "
                           "comma.")
    return clean


def looks_alike(first: str, second: str) -> bool:
    """Whether two user names could be taken for each other: equal after NFKC and case
    folding, or confusable (Unicode's confusables list) after that."""
    first, second = (unicodedata.normalize("NFKC", n).casefold() for n in (first, second))
    return first == second or bool(is_confusable(first, second))


def check_password(password: str, name: str) -> str:
    """The password when it is acceptable; else `AccountError` saying why."""
    if len(password.strip()) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"A password has at least {MIN_PASSWORD_LENGTH} characters, not "
                           "counting spaces at its start and end.")
    if password.strip().lower() == name.strip().lower():
        raise AccountError("The password cannot be the user name.")
    return password


def _verify(hashed: str, password: str) -> bool:
    try:
        return _HASHER.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def _user(values: RowMapping) -> User:
    return User(name=values["name"],
                roles=frozenset(r for r in values["roles"].split(",") if r),
                has_password=values["password_hash"] is not None,
                disabled=bool(values["disabled"]), failed_signins=values["failed_signins"],
                locked_until=values["locked_until"], created_at=values["created_at"],
                last_signin=values["last_signin"])


def _log(conn: Connection, who: str, action: str, subject: str | None, detail: str | None,
         now: datetime) -> None:
    conn.execute(insert(account_log).values(
        at=_iso(now), who=who, action=action, subject=subject, detail=detail))


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


ROLES_CLAIM_ENV = "BUS_ROLES_CLAIM"
"""The single-sign-on claim that names a user's roles (default 'roles')."""


def claimed_roles(value: object) -> frozenset[str]:
    """The app's roles named by a claim (a list or a comma/space-separated string); names
    that are not roles of this app are ignored."""
    if isinstance(value, str):
        names: Iterable[object] = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        names = value
    else:
        return frozenset()
    wanted = {str(n).strip().lower() for n in names}
    return check_roles(wanted & set(ROLES))


def identity_from_claims(claims: Mapping[str, Any], accounts: Accounts) -> Identity:
    """The identity of a user signed in by single sign-on, from the provider's claims: named by
    their e-mail address when the provider has verified it (an unverified one could name
    another user's local account), else their preferred user name, else the subject; their
    roles are those the claim $BUS_ROLES_CLAIM (default 'roles') names, else those an
    administrator gave them here."""
    verified = str(claims.get("email_verified", True)).lower() != "false"
    email = claims.get("email") if verified else None
    name = str(email or claims.get("preferred_username") or claims.get("sub"))
    roles = claimed_roles(claims.get(os.environ.get(ROLES_CLAIM_ENV, "roles")))
    return Identity(name=name, roles=roles or accounts.roles_of(name), source="oidc")
