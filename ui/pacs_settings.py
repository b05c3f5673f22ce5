"""The administrators' settings of the hospital archives (on the Account page): the DICOMweb
endpoints set on the server (read-only here) and those saved in the app (add, change, remove).
Secrets are never shown back. The rules are bus_core.integrations.pacs.client's."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from bus_core.errors import BusError
from bus_core.integrations.pacs.endpoints import (
    AUTH_KINDS,
    CONFIG_ENV,
    URL_ENV,
    Endpoint,
    PacsError,
    delete_endpoint,
    endpoint_from_form,
    save_endpoint,
    saved_endpoints,
    server_endpoints,
)
from bus_core.roles import Identity
from ui.common import md_escape, show_error

NEW = "New PACS"
AUTH_LABELS = {"none": "None", "basic": "User and password (basic)",
               "bearer": "Bearer token"}
TLS_CHOICES = ("Verify (the server's CA certificates)", "Verify with a CA bundle",
               "Do not verify (testing only)")


def _tls(verify: bool | str) -> str:
    return "verified" if verify is True else "not verified" if verify is False \
        else f"CA bundle {verify}"


def _table(server: list[Endpoint], saved: list[Endpoint]) -> None:
    """Every endpoint with its addresses, sign-in kind and TLS setting (no secrets)."""
    st.dataframe(pd.DataFrame([{
        "Name": e.name, "QIDO-RS": e.service_url("qido"), "WADO-RS": e.service_url("wado"),
        "STOW-RS": e.service_url("stow"), "Sign-in": e.auth, "TLS": _tls(e.verify),
        "Set": where} for group, where in ((server, "on the server"), (saved, "in the app"))
        for e in group]), hide_index=True, width="stretch")


def _form(who: Identity, previous: Endpoint | None) -> None:
    """Add a PACS (`previous` None) or change `previous`; secrets left blank stay as they were."""
    key = previous.name if previous else NEW
    # outside the form, so the fields below follow the choices at once
    auth = st.radio("Sign-in", AUTH_KINDS, format_func=AUTH_LABELS.__getitem__,
                    index=AUTH_KINDS.index(previous.auth) if previous else 0,
                    horizontal=True, key=f"pacs_auth_{key}")
    verify = previous.verify if previous else True
    tls = st.radio("TLS certificates", TLS_CHOICES, horizontal=True, key=f"pacs_tls_{key}",
                   index=0 if verify is True else 2 if verify is False else 1)
    user, secret, bundle = "", "", ""
    with st.form(f"pacs_endpoint_{key}"):
        name = st.text_input("Name", value=previous.name if previous else "")
        qido = st.text_input("QIDO-RS base URL (search)",
                             value=previous.service_url("qido") if previous else "",
                             placeholder="https://pacs.hospital.example/dicom-web")
        left, right = st.columns(2)
        wado = left.text_input("WADO-RS base URL (retrieve)",
                               value=previous.service_url("wado") if previous else "",
                               placeholder="empty: the QIDO-RS URL")
        stow = right.text_input("STOW-RS base URL (store)",
                                value=previous.service_url("stow") if previous else "",
                                placeholder="empty: the QIDO-RS URL")
        left, right = st.columns(2)
        if auth == "basic":
            user = left.text_input("User", value=(previous.user or "") if previous else "")
        if auth != "none":
            kept = previous is not None and previous.auth == auth
            secret = right.text_input("Password" if auth == "basic" else "Token",
                                      type="password", placeholder="unchanged" if kept else "",
                                      help="Never shown again; leave empty to keep the saved "
                                           "one.")
        if TLS_CHOICES.index(tls) == 1:
            bundle = st.text_input("CA bundle (a file on the server)",
                                   value=verify if isinstance(verify, str) else "",
                                   placeholder="/etc/ssl/certs/hospital-ca.pem")
        if not st.form_submit_button("Save PACS", icon=":material/save:"):
            return
    choice = TLS_CHOICES.index(tls)
    try:
        new = endpoint_from_form(name, qido, wado, stow, auth=auth, user=user, secret=secret,
                                 verify=True if choice == 0 else False if choice == 2
                                 else bundle.strip(), previous=previous)
        save_endpoint(new, who=who, replacing=previous.name if previous else None)
    except BusError as exc:
        show_error(exc, "The PACS was not saved")
        return
    st.toast(f"PACS '{md_escape(new.name)}' saved.", icon=":material/check_circle:")
    st.rerun()


def pacs_settings(who: Identity) -> None:
    """The PACS section for administrators ('manage_pacs'); nothing for other users."""
    if not who.can("manage_pacs"):
        return
    st.subheader("PACS archives")
    try:
        server, saved = server_endpoints(), saved_endpoints()
    except PacsError as exc:
        show_error(exc)
        return
    st.caption(f"DICOMweb archives of the Diagnose page's \"Open from PACS\". Those set on the "
               f"server ({URL_ENV}, {CONFIG_ENV}) are changed there; add others here.")
    if server or saved:
        _table(server, saved)
    by_name = {e.name: e for e in saved}
    choice = st.selectbox("Add or change", [NEW, *by_name], key="pacs_settings_choice",
                          format_func=lambda n: n if n == NEW else f"Change {n}")
    previous = by_name.get(choice)
    _form(who, previous)
    if previous is not None and st.button(f"Remove {md_escape(previous.name)}",
                                          icon=":material/delete:", key="pacs_remove"):
        try:
            delete_endpoint(previous.name, who=who)
        except BusError as exc:
            show_error(exc, "The PACS was not removed")
            return
        st.toast(f"PACS '{md_escape(previous.name)}' removed.", icon=":material/delete:")
        st.rerun()
