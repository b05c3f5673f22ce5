"""Signing in: who uses this browser session, and the screens before the app.

Modes (`auth_mode`): 'oidc' when `.streamlit/secrets.toml` has an `[auth]` section (single
sign-on through Streamlit's `st.login`; roles from the ID token's claim named by
$BUS_ROLES_CLAIM, default 'roles', else from the local user table), 'local' otherwise (the
app's own accounts, bus_core.clinic.accounts), and 'demo' only when BUS_AUTH=demo (no sign-in,
Diagnose and Teaching only, nothing saved). BUS_AUTH=local or oidc forces a mode.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import streamlit as st

from bus_core.clinic.accounts import Accounts, Session, identity_from_claims, new_session
from bus_core.errors import BusError
from bus_core.roles import DEMO, Identity
from ui.cases import case_store
from ui.common import (
    APP_TITLE,
    SESSION_KEY,
    auth_mode,
    identity,
    md_escape,
    require_entrypoint,
    show_error,
)

PAGE_ACTIONS: dict[str, tuple[str, ...]] = {
    "diagnose": ("diagnose",),
    "review": ("review",),
    "retrain": ("train",),
    "teach": ("teach",),
    "train": ("train",),
    "evaluate": ("evaluate",),
    "models": ("read_models",),
    "monitor": ("evaluate",),
    "account": (),
}
"""Page (file stem in pages/) -> the actions that open it (any one; none: every signed-in user
but the demo)."""


def may_open(who: Identity, page: str) -> bool:
    """Whether `who` may open `page` (a key of `PAGE_ACTIONS`)."""
    actions = PAGE_ACTIONS[page]
    return any(map(who.can, actions)) if actions else who.source != "demo"


def require_page(page: str) -> Identity:
    """The first call of every page: the page runs through app.py, for a signed-in user whose
    roles open it (`may_open`); otherwise the screen that leads there, and the run stops. A
    page checks this itself because Streamlit can run a page file on its own."""
    require_entrypoint()
    who = require_signed_in()
    if not may_open(who, page):
        st.error("Your roles do not open this page: ask an administrator.",
                 icon=":material/block:")
        st.stop()
    return who


def accounts() -> Accounts:
    """The local accounts of the app's case store; stops the run after showing why when the
    database cannot be used."""
    store = case_store()
    if store is None:
        st.stop()
    return Accounts(store)


def require_signed_in() -> Identity:
    """The signed-in identity; otherwise draw the screen that leads to one (sign-in form,
    single sign-on button, first-admin instructions) and stop the run."""
    mode = auth_mode()
    if mode == "demo":
        return DEMO
    try:
        found = _oidc_identity() if mode == "oidc" else _local_identity()
    except BusError as exc:
        show_error(exc, "Signing in is not possible")
        st.stop()
    if found is None:
        _remember_requested_page()
        st.stop()
    return found


AFTER_SIGN_IN_KEY = "_bus_after_sign_in"


def _addressed_page() -> str | None:
    """The page the browser's address names (a bookmark, a reload, a typed address), if any."""
    try:
        name = urlsplit(st.context.url or "").path.rstrip("/").rsplit("/", 1)[-1]
    except (AttributeError, ValueError):
        return None
    return name if name in PAGE_ACTIONS else None


def _remember_requested_page() -> None:
    """Keep the page the address names, to open it once signed in."""
    name = _addressed_page()
    if name is not None:
        st.session_state[AFTER_SIGN_IN_KEY] = name


def open_requested_page(who: Identity, titles: dict[str, str]) -> None:
    """Right after signing in, switch to the page the address named before if `who` may open
    it; otherwise (or when the address names such a page now) say that the page is not
    available for their roles. `titles`: page -> its title. Call after st.navigation."""
    requested = st.session_state.pop(AFTER_SIGN_IN_KEY, None)
    name = requested or _addressed_page()
    if name is None:
        return
    if may_open(who, name):
        if requested:
            st.switch_page(f"pages/{name}.py")
        return
    st.warning(f"{titles.get(name, name)} is not available for your role: you are on the first "
               "page your roles open instead.", icon=":material/block:")


def _local_identity() -> Identity | None:
    session = st.session_state.get(SESSION_KEY)
    store = accounts()
    if isinstance(session, Session):
        current = store.refresh(session.identity)
        if session.expired():
            store.record(session.identity.name, "session expired", session.identity.name)
            del st.session_state[SESSION_KEY]
            st.info("Your session ended after a while without activity: sign in again.",
                    icon=":material/schedule:")
        elif current is None:
            del st.session_state[SESSION_KEY]
            st.warning("Your account was disabled or removed: ask an administrator.",
                       icon=":material/block:")
        else:
            session.identity = current
            session.touch()
            return current
    if store.count() == 0:
        _first_admin_screen()
        return None
    _sign_in_form(store)
    return None


def _first_admin_screen() -> None:
    st.title(APP_TITLE)
    st.subheader("Create the first administrator")
    st.markdown("Nobody has an account yet. On the server, in the app's folder, run:")
    st.code("python -m bus_core users add admin --role admin", language="bash")
    st.markdown("It asks for the new password twice (at least 10 characters); then reload "
                "this page and sign in. The administrator adds the other users, each with "
                "their roles (clinician, educator, researcher, admin), on the Account page or "
                "with `python -m bus_core users add NAME --role ROLE`.")


def _sign_in_form(store: Accounts) -> None:
    st.title(APP_TITLE)
    with st.form("sign_in"):
        st.subheader("Sign in")
        name = st.text_input("Username", autocomplete="username")
        password = st.text_input("Password", type="password", autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        try:
            signed = store.sign_in(name, password)
        except BusError as exc:
            st.error(str(exc), icon=":material/lock:")
            return
        st.session_state[SESSION_KEY] = new_session(signed)
        st.rerun()


def _oidc_identity() -> Identity | None:
    if not st.user.is_logged_in:
        st.title(APP_TITLE)
        st.button("Sign in with single sign-on", type="primary", on_click=st.login,
                  icon=":material/login:")
        return None
    store = accounts()
    found = identity_from_claims(st.user.to_dict(), store)
    name = found.name
    if store.refresh(found) is None:
        st.session_state.pop(SESSION_KEY, None)
        st.error("Your account is disabled in this app: ask an administrator.")
        st.button("Sign out", on_click=st.logout)
        return None
    session = st.session_state.get(SESSION_KEY)
    if isinstance(session, Session) and session.identity == found and session.expired():
        store.record(name, "session expired", name, "single sign-on")
        st.session_state.pop(SESSION_KEY, None)
        st.logout()  # the provider's cookie would otherwise sign the user in again at once
        return None
    if isinstance(session, Session) and session.identity == found:
        session.touch()
    else:
        store.record(name, "signed in", name, "single sign-on")
        st.session_state[SESSION_KEY] = new_session(found)
    if not found.roles:
        st.warning(f"You are signed in as {md_escape(name)}, but you have no role in this app "
                   "yet: ask an administrator.", icon=":material/badge:")
        st.button("Sign out", on_click=st.logout)
        return None
    return found


def sign_out() -> None:
    """End this session (logged); single sign-on also drops its cookie."""
    who = identity()
    if who is not None and who.source != "demo":
        accounts().record(who.name, "signed out", who.name)
    st.session_state.pop(SESSION_KEY, None)
    if auth_mode() == "oidc":
        st.logout()



def show_who(who: Identity) -> None:
    """Who is signed in, with their roles, and the 'Sign out' button (in the sidebar); in demo
    mode, a banner above the page instead."""
    if who.source == "demo":
        st.info("**Demo mode**: no sign-in, Diagnose and Teaching only, nothing is saved. "
                "Not for clinical use.", icon=":material/co_present:")
        return
    with st.sidebar:
        roles = ", ".join(sorted(who.roles)) or "no role"
        st.caption(f"Signed in as **{md_escape(who.name)}** ({roles})")
        st.button("Sign out", on_click=sign_out, icon=":material/logout:", key="sign_out")
