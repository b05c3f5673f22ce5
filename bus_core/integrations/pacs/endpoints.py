"""The archives the app may talk to: from $BUS_DICOMWEB_* / $BUS_DICOMWEB_CONFIG on the server and
those admins save in the app (pacs_endpoints.json in the data folder), with their address and
credentials (basic / bearer, TLS verify or a CA bundle)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bus_core import atomic, roles
from bus_core.errors import BusError
from bus_core.roles import Identity
from bus_core.settings import data_dir

URL_ENV, USER_ENV = "BUS_DICOMWEB_URL", "BUS_DICOMWEB_USER"
PASSWORD_ENV, TOKEN_ENV = "BUS_DICOMWEB_PASSWORD", "BUS_DICOMWEB_TOKEN"
VERIFY_ENV, CONFIG_ENV = "BUS_DICOMWEB_VERIFY", "BUS_DICOMWEB_CONFIG"
SAVED_FILE = "pacs_endpoints.json"
"""The endpoints administrators add in the app, in the data folder."""
AUTH_KINDS: tuple[str, ...] = ("none", "basic", "bearer")
"""How the app signs in to a PACS: not at all, HTTP basic (user + password), a bearer token."""


class PacsError(BusError):
    """The archive cannot be used: unreachable, credentials refused, nothing to read there, or
    an answer that cannot be read."""


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
