"""What every page shares: who is signed in, the cached active model, the sidebar, and error
display."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st
from PIL import Image, ImageDraw

from bus_core.clinic.accounts import Session
from bus_core.data.dataset import source_name
from bus_core.errors import BusError, StorageError
from bus_core.inference.outline import Segmenter
from bus_core.inference.predict import Predictor
from bus_core.inference.warm import Prepared, Warmup, warm_active
from bus_core.metrics import TARGET_SENSITIVITY, fmt3
from bus_core.models.card import ModelCard, read_card
from bus_core.models.registry import active_model_path, active_segmenter_path, no_model_message
from bus_core.roles import DEMO, Identity
from bus_core.runtime.device import choose_device
from bus_core.training.jobs import JobBusyError

log = logging.getLogger(__name__)

def app_icon() -> Image.Image:
    """The browser tab's icon, drawn here: a named Material icon would make every page fetch
    it from Google's servers (failing offline, and a request leaving the hospital)."""
    icon = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    draw.rounded_rectangle((2, 2, 61, 61), radius=14, fill=(15, 110, 140, 255))
    draw.pieslice((12, 14, 52, 54), 200, 340, fill=(255, 255, 255, 255))
    draw.ellipse((27, 40, 37, 50), fill=(255, 196, 0, 255))
    return icon


NARROW_WINDOW_CSS = """<style>
@media (max-width: 1024px) {
  section[data-testid="stSidebar"] {width: 200px !important; min-width: 200px !important;}
  section[data-testid="stSidebar"] [data-testid="stSidebarUserContent"] {font-size: 0.9rem;}
}
</style>"""
"""In windows up to 1024 px wide the sidebar is 200 px (Streamlit's is 300 px, over a third of
an 800 px window); it folds away below 768 px as Streamlit's does."""


def narrow_window_layout() -> None:
    """Keep the sidebar narrow in narrow windows (`NARROW_WINDOW_CSS`); draws nothing."""
    st.html(NARROW_WINDOW_CSS)


APP_TITLE = "Breast ultrasound classifier"
"""The app's name: the browser tab's title and the heading of the screens before signing in."""

SESSION_KEY = "_bus_session"
"""session_state key of the signed-in `accounts.Session`."""

MODES = ("local", "oidc", "demo")

PROGRESS_POLL_S = 1.0
"""Longest wait between two redraws of a model preparation's progress bar."""


def auth_mode() -> str:
    """How users sign in (ui.auth says more): 'demo' only when BUS_AUTH=demo; 'oidc' (single
    sign-on) when secrets.toml has an [auth] section; else 'local' accounts. BUS_AUTH=local or
    oidc forces a mode."""
    chosen = os.environ.get("BUS_AUTH", "").strip().lower()
    if chosen in MODES:
        return chosen
    try:
        return "oidc" if "auth" in st.secrets else "local"
    except Exception:  # noqa: BLE001 - no secrets.toml, or one that does not parse
        return "local"


def identity() -> Identity | None:
    """The identity of this browser session (the demo identity in demo mode), or None."""
    if auth_mode() == "demo":
        return DEMO
    session = st.session_state.get(SESSION_KEY)
    return session.identity if isinstance(session, Session) else None


ENTRY_KEY = "_through_app"
"""Set in a session once app.py has run in it (`mark_entrypoint`)."""


def mark_entrypoint() -> None:
    """Called by app.py: this session has run through the app's entry point."""
    st.session_state[ENTRY_KEY] = True


def require_entrypoint() -> None:
    """Make sure a page runs inside app.py (its page set-up, navigation and sidebar). The first
    request after a server start that names a page (a bookmark, a reload) makes Streamlit run
    that file on its own while a pages/ folder exists (its old multipage mode, until app.py
    has called st.navigation once): for a session that has not been through app.py, this
    leaves that mode and reruns the same address through app.py. Call it first in every
    page."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory and not st.session_state.get(ENTRY_KEY):
        PagesManager.uses_pages_directory = False
        st.rerun()


@st.cache_resource(show_spinner="Loading the model…", max_entries=3)
def load_predictor(path: str, weights_sha256: str) -> Predictor:
    """One shared, never-mutated predictor per model folder and weights version."""
    return Predictor.from_path(path)


def active_predictor() -> Predictor | None:
    """The active model's predictor, or None after showing why there is none (a warning when
    no model is installed, an error when it cannot be used)."""
    predictor, why_not = optional_predictor()
    if predictor is None:
        if active_model_path() is None:
            st.warning(md_escape(why_not), icon=":material/warning:")
        else:
            st.error(md_escape(why_not), icon=":material/error:")
    return predictor


@st.cache_resource(show_spinner="Loading the outline model…", max_entries=2)
def load_segmenter(path: str, weights_sha256: str) -> Segmenter:
    """One shared segmenter per model folder and weights version."""
    return Segmenter.from_path(path)


def active_segmenter() -> tuple[Segmenter | None, str]:
    """The segmentation model that suggests outlines and '', or None and why there is none;
    shows nothing."""
    path = active_segmenter_path()
    if path is None:
        return None, "No segmentation model is installed, so no outline can be suggested."
    warmup = start_warmup()
    if warmup is not None and warmup.progress().state == "ready" and \
            warmup.result().segmenter is not None:
        return warmup.result().segmenter, ""
    try:
        card = read_card(path)
        return load_segmenter(str(Path(path).resolve()), card.weights_sha256), ""
    except BusError as exc:
        return None, f"The segmentation model cannot be used: {exc}"


def model_summary(card: ModelCard) -> str:
    """A few markdown lines in plain words: the model's name and how it did on its test
    images, the top reading and the malignant flag told apart."""
    test = card.metrics.get("test") or {}
    lines = [f"**{md_escape(card.name)}**"]
    if not test:
        return "  \n".join([*lines, "Not tested: its card has no test figures."])
    sources = md_escape(", ".join(source_name(x) for x in (test.get("data") or {}).get(
        "sources", [])) or "its test data")
    lines.append(f"Tested on {test.get('n')} images ({sources}): its top reading was right "
                 f"for {_percent(test.get('accuracy'))} of them and named "
                 f"{_percent(test.get('malignant_sensitivity'))} of the cancers as malignant.")
    flag = test.get("at_threshold") or {}
    if flag.get("sensitivity") is not None:
        lines.append(f"Its malignant flag, set on other images to find "
                     f"{TARGET_SENSITIVITY:.0%} of cancers, found "
                     f"{_percent(flag['sensitivity'])} of these.")
    return "  \n".join(lines)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def model_details(card: ModelCard) -> str:
    """The technical description of a model (markdown): architecture, input, data, split,
    figures with their technical names."""
    test = card.metrics.get("test") or {}
    data = test.get("data") or {}
    kind = (f"two-stage: {card.two_stage['whole_image_model']} on the whole image, then "
            f"{card.input_mode} on the lesion outline" if card.two_stage
            else f"{card.input_mode} input")
    lines = [md_escape(f"{card.arch}, {kind}, {card.size.crop} px, created {card.created[:10]}")]
    if test:
        split = md_escape(Path(str(data.get("split_file", ""))).name or "?")
        digest = data.get("data_hash")
        lines.append(
            f"{md_escape(data.get('subset', 'test'))} subset of {split}"
            f"{f' (data hash {md_escape(str(digest)[:8])})' if digest else ''}"
            f", n={test.get('n')}: accuracy {fmt3(test.get('accuracy'))}, malignant sensitivity "
            f"(top class) {fmt3(test.get('malignant_sensitivity'))}, malignant AUC "
            f"{fmt3(test.get('auc_malignant'))}, ECE {fmt3(test.get('ece'))}")
    return "  \n".join(lines)


NAVIGATION_KEY = "app_navigation"
"""Key of the sidebar's page list (its element has the class st-key-app_navigation)."""


def sidebar_navigation(sections: dict[str, list[st.Page]]) -> None:
    """The pages the user's roles open, by section (`st.Page`s), at the top of the sidebar.
    Streamlit's own page list is off in the shipped config: before anyone signs in it would
    list the app's page files."""
    with st.sidebar.container(key=NAVIGATION_KEY):
        for section, pages in sections.items():
            st.caption(section)
            for page in pages:
                st.page_link(page)
        st.divider()


def render_sidebar() -> None:
    """The model in use in plain words (technical details folded away) and a reminder of what
    the app is."""
    with st.sidebar:
        st.caption("MODEL IN USE")
        path = active_model_path()
        if path is None:
            st.info("No model installed.", icon=":material/info:")
        else:
            try:
                card = read_card(path)
                st.markdown(model_summary(card))
                with st.expander("Model details"):
                    st.markdown(model_details(card))
                    st.caption(f"Training and explanation maps run on "
                               f"{choose_device().description}; each reading names where it "
                               "ran.")
            except BusError as exc:
                st.error(md_escape(exc))
        st.caption("Research software: not a medical device. Predictions support, never "
                   "replace, a radiologist's reading.")


_MARKDOWN_SPECIAL = set("\\`*_{}[]()#+-.!|<>~$:@")


def md_escape(text: object) -> str:
    """Text typed by a user (a name, a note, a file name) made safe to put inside Markdown:
    every character Markdown or Streamlit would interpret is escaped."""
    return "".join(f"\\{c}" if c in _MARKDOWN_SPECIAL else c for c in str(text))


def show_error(exc: BusError, what: str = "") -> None:
    """A user-fixable problem as a red box with its message (never a traceback). A storage
    problem is told in plain words; its path goes to the log (and, for administrators, into a
    details box)."""
    message = str(exc)
    if isinstance(exc, StorageError):
        log.warning("%s%s%s", what, ": " if what else "", exc)
        message = exc.plain
    st.error(md_escape(f"{what}{': ' if what else ''}{message}"), icon=":material/error:")
    who = identity()
    if isinstance(exc, StorageError) and who is not None and who.can("manage_users"):
        with st.expander("Details (administrators)"):
            st.code(str(exc), language=None)


def start_job(start: Callable[[], Any], what: str) -> bool:
    """Run `start` (which launches a background job); True if it started, else False after
    showing why (another job running, or settings it refused)."""
    try:
        start()
    except JobBusyError as exc:
        st.warning(str(exc), icon=":material/hourglass_top:")
        return False
    except BusError as exc:
        show_error(exc, what)
        return False
    return True


def optional_predictor() -> tuple[Predictor | None, str]:
    """The active model's predictor and '', or None and why there is none; shows only how far
    its preparation is while it waits for it (for pages where the model is optional)."""
    path = active_model_path()
    if path is None:
        return None, no_model_message()
    try:
        return wait_for_model(warm_active()).predictor, ""
    except BusError as exc:
        return None, f"The active model cannot be used: {exc}"


def start_warmup() -> Warmup | None:
    """Start preparing the active model and outline model for this computer in the background
    (once per model and server: `bus_core.inference.warm`), or None when there is no usable model
    (the pages that need one say why). app.py calls it on every run, so the preparation starts
    when the server first serves anyone and whenever the active model changes."""
    try:
        return warm_active()
    except BusError:
        return None


def wait_for_model(warmup: Warmup) -> Prepared:
    """The prepared model; while it is being prepared, a progress bar says how far it is
    ("Preparing the model for this computer: 2 of 3 networks")."""
    seen = warmup.progress()
    if seen.state == "preparing":
        bar = st.progress(seen.fraction, text=seen.sentence())
        while seen.state == "preparing":
            seen = warmup.wait(seen, timeout=PROGRESS_POLL_S)
            bar.progress(seen.fraction, text=seen.sentence())
        bar.empty()
    return warmup.result()
