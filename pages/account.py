"""Account: your own password; for administrators, the users (add, roles, disable, new
password), the account audit log and the PACS archives."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from bus_core.clinic.accounts import Accounts, User
from bus_core.errors import BusError
from bus_core.roles import ROLES, Identity
from ui.auth import accounts, require_page
from ui.common import md_escape, show_error
from ui.pacs_settings import pacs_settings

who = require_page("account")


def own_password(store: Accounts, who: Identity) -> None:
    """Change the signed-in user's own password (local accounts only)."""
    st.subheader("Your password")
    if who.source != "local":
        st.caption("You sign in through your organisation's single sign-on: change your "
                   "password there.")
        return
    with st.form("own_password", clear_on_submit=True):
        current = st.text_input("Current password", type="password")
        new = st.text_input("New password (at least 10 characters)", type="password")
        again = st.text_input("New password again", type="password")
        if not st.form_submit_button("Change password"):
            return
    if new != again:
        st.error("The two new passwords differ: nothing was changed.")
        return
    try:
        store.set_password(who, who.name, new, current=current)
    except BusError as exc:
        show_error(exc, "The password was not changed")
        return
    st.success("Your password was changed.", icon=":material/check_circle:")


def users_table(users: list[User]) -> None:
    """Every user with roles, state and last sign-in."""
    st.dataframe(pd.DataFrame([{
        "User": u.name, "Roles": ", ".join(sorted(u.roles)),
        "State": "disabled" if u.disabled else "locked" if u.locked() else "active",
        "Signs in with": "password" if u.has_password else "single sign-on",
        "Last sign-in": (u.last_signin or "never")[:16].replace("T", " ")} for u in users]),
        hide_index=True, width="stretch")


def add_user(store: Accounts, who: Identity) -> None:
    """Form: a new user with roles and a first password (or single sign-on only)."""
    with st.form("add_user", clear_on_submit=True):
        st.markdown("**Add a user**")
        left, right = st.columns(2)
        name = left.text_input("New user's name")
        roles = right.multiselect("Roles", ROLES, default=["clinician"])
        password = left.text_input("First password (at least 10 characters; empty: single "
                                   "sign-on only)", type="password")
        if not st.form_submit_button("Add user"):
            return
    try:
        user = store.add(who, name, roles, password or None)
    except BusError as exc:
        show_error(exc, "The user was not added")
        return
    st.success(f"Added {md_escape(user.name)}.", icon=":material/person_add:")


def change_user(store: Accounts, who: Identity, users: list[User]) -> None:
    """Roles, disabling and a new password for one chosen user."""
    st.markdown("**Change a user**")
    names = [u.name for u in users]
    name = st.selectbox("User", names, key="account_user")
    user = next(u for u in users if u.name == name)
    left, right = st.columns(2)
    roles = left.multiselect("Roles", ROLES, default=sorted(user.roles),
                             key=f"account_roles_{name}")
    if left.button("Save roles", key="account_save_roles"):
        _apply(lambda: store.set_roles(who, name, roles), "Roles saved.")
    password = right.text_input("New password (unlocks the account)", type="password",
                                key=f"account_password_{name}")
    if right.button("Set password", key="account_set_password"):
        _apply(lambda: store.set_password(who, name, password), "Password set.")
    label = "Enable the account" if user.disabled else "Disable the account"
    if st.button(label, key="account_disable", disabled=name == who.name):
        _apply(lambda: store.set_disabled(who, name, not user.disabled), "Saved.")


def _apply(change: Callable[[], object], done: str) -> None:
    try:
        change()
    except BusError as exc:
        show_error(exc, "Nothing was changed")
        return
    st.toast(done, icon=":material/check_circle:")
    st.rerun()


def account_log(store: Accounts) -> None:
    """The newest entries of the account audit log."""
    with st.expander("Account audit log (sign-ins, failed sign-ins, changes)"):
        entries = store.log(200)
        if not entries:
            st.caption("Nothing logged yet.")
            return
        st.dataframe(pd.DataFrame([{
            "Time (UTC)": str(e["at"])[:19].replace("T", " "), "Who": e["who"],
            "Action": e["action"], "User": e["subject"], "Detail": e["detail"]}
            for e in entries]), hide_index=True, width="stretch")


st.title("Account")
store = accounts()
st.markdown(f"Signed in as **{md_escape(who.name)}**, roles: "
            f"{', '.join(sorted(who.roles)) or 'none'}.")
own_password(store, who)
if who.can("manage_users"):
    st.subheader("Users")
    users = store.list_users()
    users_table(users)
    add_user(store, who)
    if users:
        change_user(store, who, users)
    account_log(store)
pacs_settings(who)
