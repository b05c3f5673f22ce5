"""Who may do what: the roles, the actions each role allows, and the signed-in identity.

Every action with a side effect (saving or reviewing a case, starting a training run,
activating, renaming or deleting a model, managing users or PACS endpoints, exporting cases)
takes an `Identity` and calls `require(identity, action)` first, so a direct library call
without the role fails as the app's hidden button would. The command line acts as
`operator()`: a shell user on the server already has the files, so it gets every role and signs
with the system account's name.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable
from dataclasses import dataclass, field

from bus_core.errors import BusError

ROLES: tuple[str, ...] = ("clinician", "educator", "researcher", "admin")
"""Every role; a user may have several. 'admin' allows every action."""

ACTIONS: dict[str, str] = {
    "diagnose": "clinician",
    "save_case": "clinician",
    "review": "clinician",
    "export_own": "clinician",
    "teach": "educator",
    "train": "researcher",
    "evaluate": "researcher",
    "read_models": "researcher",
    "upload_model": "researcher",
    "manage_models": "admin",
    "override_gate": "admin",
    "manage_users": "admin",
    "manage_pacs": "admin",
    "export_all": "admin",
}
"""Action -> the role that allows it (besides 'admin', which allows them all)."""

DEMO_ACTIONS: frozenset[str] = frozenset({"diagnose", "teach"})
"""What demo mode (BUS_AUTH=demo: no sign-in, nothing saved) allows."""


class PermissionDeniedError(BusError):
    """The signed-in user's roles do not allow this action."""


@dataclass(frozen=True)
class Identity:
    """Who is acting: `name` signs reviews, audit entries and model decisions; `source` is
    'local' (a password account), 'oidc' (single sign-on), 'cli' or 'demo'."""

    name: str
    roles: frozenset[str] = field(default_factory=frozenset)
    source: str = "local"

    def can(self, action: str) -> bool:
        """Whether this identity may do `action` (a key of `ACTIONS`)."""
        if action not in ACTIONS:
            raise ValueError(f"Unknown action {action!r}.")
        if self.source == "demo":
            return action in DEMO_ACTIONS
        return "admin" in self.roles or ACTIONS[action] in self.roles


def check_roles(roles: Iterable[str]) -> frozenset[str]:
    """The roles as a set, lower-cased; raises `BusError` for an unknown one."""
    clean = frozenset(str(r).strip().lower() for r in roles if str(r).strip())
    unknown = sorted(clean - set(ROLES))
    if unknown:
        raise BusError(f"Unknown role {unknown[0]!r}: choose from {', '.join(ROLES)}.")
    return clean


def require(identity: Identity | None, action: str) -> Identity:
    """`identity` when it may do `action`; else `PermissionDeniedError` (also for nobody)."""
    if identity is None:
        raise PermissionDeniedError("Sign in first: this action needs a signed-in user.")
    if not identity.can(action):
        needed = ACTIONS[action]
        raise PermissionDeniedError(
            f"{identity.name} may not do this: it needs the {needed} role (or admin). "
            "Ask an administrator.")
    return identity


def operator() -> Identity:
    """The command line's identity: every role, signed '<system user> (command line)'."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Identity(name=f"{user} (command line)", roles=frozenset(ROLES), source="cli")


DEMO = Identity(name="demo", roles=frozenset(), source="demo")
"""The identity of demo mode."""
