"""Model registry: every bundled and user model with its card; choose the app's active model,
rename, delete, download, and add a model from its files."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from bus_core.errors import BusError
from bus_core.metrics import fmt3
from bus_core.models import CARD_FILE, WEIGHTS_FILE
from bus_core.registry import (
    ModelEntry,
    active_model_path,
    active_segmenter_path,
    delete_model,
    export_model_zip,
    import_model,
    list_models,
    rename_model,
    set_active_model,
)
from bus_core.roles import Identity
from bus_core.settings import BUNDLED_WEIGHTS_DIR, user_models_dir
from ui.auth import require_page
from ui.common import md_escape, show_error

who = require_page("models")

CONFIRM_KEY = "models_confirm_delete"


def widget_key(action: str, entry: ModelEntry) -> str:
    """A stable widget key per model and action, e.g. 'models_activate_user_my-model'."""
    return f"models_{action}_{'bundled' if entry.bundled else 'user'}_{entry.path.name}"


def is_active(entry: ModelEntry, active: Path | None) -> bool:
    """True for the app's active model (for a segmentation model: the outline model in use)."""
    if entry.card.task == "segmentation":
        active = active_segmenter_path()
    return active is not None and entry.path.resolve() == active.resolve()


def data_line(entry: ModelEntry) -> str:
    """Training data sources and size (Markdown: the card's text escaped)."""
    data = entry.card.training_data or {}
    sources = ", ".join(md_escape(Path(s).name) for s in data.get("sources") or []) or "–"
    n = data.get("n_train")
    return sources + (f" (n={n} for training)" if n else "")


def split_line(entry: ModelEntry) -> str:
    """Split file and data hash (Markdown: the card's text escaped)."""
    split = entry.card.split or {}
    if not split:
        return "–"
    return (f"{md_escape(Path(str(split.get('file', '–'))).name)} · hash "
            f"{md_escape(str(split.get('data_hash', ''))[:8])}")


def test_line(entry: ModelEntry) -> str:
    """Test-subset figures of the card (per data set for a segmentation model; Markdown: the
    card's text escaped)."""
    test = entry.card.metrics.get("test") or {}
    if not test:
        return "No test metrics"
    if entry.card.task == "segmentation":
        return " · ".join(f"{md_escape(name)}: Dice {fmt3(v.get('dice'))} "
                          f"(n={md_escape(v.get('n_lesion'))} lesion "
                          "images)" for name, v in test.items() if isinstance(v, dict))
    return (f"accuracy {fmt3(test.get('accuracy'))} · malignant sensitivity "
            f"{fmt3(test.get('malignant_sensitivity'))} · malignant AUC "
            f"{fmt3(test.get('auc_malignant'))} (n={md_escape(test.get('n'))})")


def actions(entry: ModelEntry, active: bool, who: Identity) -> None:
    """Download; for administrators also activate, and for user models rename / delete."""
    row = st.container(horizontal=True, vertical_alignment="center")
    admin = who.can("manage_models")
    if entry.card.task == "segmentation":
        row.caption("Suggests lesion outlines" + (" on the Diagnose and Teaching pages."
                                                  if active else " (set BUS_SEGMENTER to use it)."))
    elif row.button("Active" if active else "Make active", key=widget_key("activate", entry),
                    icon=":material/star:", disabled=active or not admin,
                    type="secondary" if active else "primary",
                    help=None if admin else "Administrators choose the active model."):
        try:
            set_active_model(entry.path, who=who)
            st.rerun()
        except BusError as exc:
            show_error(exc)
    row.download_button("Download", data=lambda: export_model_zip(entry.path),
                        file_name=f"{entry.path.name}.zip", mime="application/zip",
                        icon=":material/download:", on_click="ignore",
                        key=widget_key("download", entry))
    if entry.bundled:
        row.caption("Bundled with the app: read-only.")
        return
    if not admin:
        return
    with row.popover("Rename", icon=":material/edit:"):
        name = st.text_input("New name", value=entry.path.name, key=widget_key("name", entry))
        if st.button("Save", key=widget_key("rename", entry)):
            try:
                rename_model(entry.path, name, who=who)
                st.rerun()
            except BusError as exc:
                show_error(exc)
    if row.button("Delete", icon=":material/delete:", key=widget_key("delete", entry)):
        st.session_state[CONFIRM_KEY] = str(entry.path)
        st.rerun()


def confirm_delete(entry: ModelEntry, who: Identity) -> None:
    """The second step of a delete."""
    st.warning(f"Delete **{md_escape(entry.card.name)}** and its files "
               f"({md_escape(entry.path)})? This cannot be undone.",
               icon=":material/delete_forever:")
    row = st.container(horizontal=True)
    if row.button("Delete for good", type="primary", key=widget_key("confirm", entry)):
        try:
            delete_model(entry.path, who=who)
        except BusError as exc:
            show_error(exc)
            return
        st.session_state.pop(CONFIRM_KEY, None)
        st.toast(f"Deleted {md_escape(entry.card.name)}.", icon=":material/delete:")
        st.rerun()
    if row.button("Keep it", key=widget_key("keep", entry)):
        st.session_state.pop(CONFIRM_KEY, None)
        st.rerun()


def model_card(entry: ModelEntry, active: bool, who: Identity) -> None:
    """One model: name, badges, card summary, actions."""
    card = entry.card
    with st.container(border=True):
        title, badges = st.columns([3, 2], vertical_alignment="center")
        title.markdown(f"#### {md_escape(card.name)}")
        with badges:
            row = st.container(horizontal=True, horizontal_alignment="right")
            if active:
                row.badge("Active", icon=":material/star:", color="green")
            row.badge("Bundled" if entry.bundled else "Yours",
                      color="gray" if entry.bundled else "blue")
        left, right = st.columns(2)
        task = "lesion outline" if card.task == "segmentation" else f"input `{card.input_mode}`"
        left.markdown(f"**Architecture** {card.arch} · {task} · {card.size.crop} px "
                      f"({'padded to a square' if card.size.fit == 'pad' else 'centre crop'})  \n"
                      f"**Data** {data_line(entry)}  \n"
                      f"**Split** {split_line(entry)}")
        right.markdown(f"**Test** {test_line(entry)}  \n**Created** "
                       f"{md_escape(card.created[:10])} · **Size** "
                       f"{entry.size_bytes / 1e6:.1f} MB · init {md_escape(card.init)}")
        if card.two_stage:
            st.caption(md_escape(
                f"Reads in two stages: {card.two_stage['whole_image_model']} on the whole "
                f"image tells normal from lesion (and reads images without an outline); this "
                f"model tells benign from malignant around the outline, which "
                f"{card.two_stage['outline_model']} suggests when none is given."))
        st.caption(md_escape(entry.path))
        if st.session_state.get(CONFIRM_KEY) == str(entry.path):
            confirm_delete(entry, who)
        else:
            actions(entry, active, who)


def upload_section(who: Identity) -> None:
    """Add a model from model.safetensors + card.json (or a zip of both)."""
    st.subheader("Add a model")
    st.caption(f"Upload {WEIGHTS_FILE} and {CARD_FILE} together, or one zip holding both. "
               "Pickle checkpoints (.pt, .pth, .pkl, .ckpt) are refused: opening them can run "
               "code. The model is loaded once to check it before it is kept.")
    files = st.file_uploader("Model files", accept_multiple_files=True, key="models_upload")
    if st.button("Add to the registry", icon=":material/upload:", disabled=not files,
                 key="models_import"):
        try:
            with st.spinner("Checking the model…"):
                path = import_model({f.name: f.getvalue() for f in files}, who=who)
        except BusError as exc:
            show_error(exc, "The model was not added")
            return
        st.success(f"Added {md_escape(path.name)}.", icon=":material/check_circle:")


st.title("Model registry")
st.caption(f"Bundled models ship with the app ({BUNDLED_WEIGHTS_DIR.name}/, read-only); yours are "
           f"the ones you trained or added, in {user_models_dir()}. The active model is the one "
           "every page uses.")
if os.environ.get("BUS_MODEL"):
    st.info(f"BUS_MODEL is set ({os.environ['BUS_MODEL']}): it overrides the choice made here.",
            icon=":material/info:")

entries = list_models()
active_path = active_model_path()
if not entries:
    st.info("No model yet: train one on the Train page, or add one below.",
            icon=":material/info:")
for model in entries:
    model_card(model, is_active(model, active_path), who)
if who.can("upload_model"):
    upload_section(who)
