"""Model registry: every bundled and user model with its card; choose the app's active model
(after a comparison with the current one; the decision is logged), rename, delete, download,
and add a model from its files."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from bus_core.clinic.gate import activation_warnings, decision_log, make_active
from bus_core.data.dataset import source_name
from bus_core.errors import BusError
from bus_core.metrics import METRIC_LABELS, fmt3
from bus_core.models.card import CARD_FILE, WEIGHTS_FILE, ModelCard, read_card
from bus_core.models.registry import (
    ModelEntry,
    active_model_path,
    active_segmenter_path,
    delete_model,
    export_model_zip,
    import_model,
    list_models,
    rename_model,
)
from bus_core.roles import Identity
from bus_core.settings import BUNDLED_WEIGHTS_DIR, user_models_dir
from ui.auth import require_page
from ui.common import md_escape, show_error
from ui.decisions import decisions_table

who = require_page("models")

CONFIRM_KEY = "models_confirm_delete"
ACTIVATE_KEY = "models_confirm_activate"
FLASH_KEY = "models_flash"
# The test figures shown side by side before a model is made active.
FIGURE_KEYS = ("accuracy", "malignant_sensitivity", "malignant_specificity", "auc_malignant")
README_FILE = "README.md"


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
    sources = ", ".join(md_escape(source_name(s)) for s in data.get("sources") or []) or "–"
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
        st.session_state[ACTIVATE_KEY] = str(entry.path)
        st.rerun()
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


def figures_table(entry: ModelEntry, active: ModelCard | None) -> None:
    """This model's test figures beside the active model's (each on its own test images)."""
    columns = {"This model": entry.card.metrics.get("test") or {}}
    if active is not None:
        columns[f"Active: {active.name}"] = active.metrics.get("test") or {}
    rows = [{"Figure": "Test images", **{c: str(t.get("n") or "–") for c, t in columns.items()}}]
    rows += [{"Figure": METRIC_LABELS[k], **{c: fmt3(t.get(k)) for c, t in columns.items()}}
             for k in FIGURE_KEYS]
    st.dataframe(pd.DataFrame(rows), hide_index=True, key=widget_key("figures", entry))


def confirm_activate(entry: ModelEntry, who: Identity) -> None:
    """The second step of 'Make active': the figures side by side, the warnings, a reason."""
    active_path = active_model_path()
    try:
        active = read_card(active_path) if active_path else None
    except BusError:
        active = None
    st.markdown(f"Make **{md_escape(entry.card.name)}** the clinic's model? Every page reads "
                "images with it from now on. The retraining safety check does not run for a "
                "model chosen here; the choice is kept in the model decision log.")
    figures_table(entry, active)
    for warning in activation_warnings(entry.card, active):
        st.warning(md_escape(warning), icon=":material/warning:")
    reason = st.text_input("Why this model (kept in the decision log)",
                           key=widget_key("reason", entry))
    row = st.container(horizontal=True)
    if row.button("Make it the active model", type="primary", key=widget_key("activate_ok", entry),
                  disabled=not reason.strip()):
        try:
            make_active(entry.path, who=who, reason=reason)
        except BusError as exc:
            show_error(exc)
            return
        st.session_state.pop(ACTIVATE_KEY, None)
        st.session_state[FLASH_KEY] = (f"{entry.card.name} is now the active model; the decision "
                                       "is in the model decision log.")
        st.rerun()
    if row.button("Keep the current model", key=widget_key("activate_no", entry)):
        st.session_state.pop(ACTIVATE_KEY, None)
        st.rerun()


def details(entry: ModelEntry, admin: bool) -> None:
    """The model's own description (its README), and for administrators where its files are."""
    readme = entry.path / README_FILE
    if readme.is_file():
        with st.expander("Model card"):
            st.markdown(readme.read_text(encoding="utf-8", errors="replace"))
    if admin:
        with st.expander("Files"):
            st.code(str(entry.path), language=None)


def confirm_delete(entry: ModelEntry, who: Identity) -> None:
    """The second step of a delete."""
    st.warning(f"Delete **{md_escape(entry.card.name)}** and its files? This cannot be undone.",
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
        details(entry, who.can("manage_models"))
        if st.session_state.get(CONFIRM_KEY) == str(entry.path):
            confirm_delete(entry, who)
        elif st.session_state.get(ACTIVATE_KEY) == str(entry.path) and not active:
            confirm_activate(entry, who)
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
st.caption("Bundled models ship with the app and cannot be changed; yours are the ones you "
           "trained or added. The active model is the one every page uses.")
flash = st.session_state.pop(FLASH_KEY, None)
if flash:
    st.success(md_escape(flash), icon=":material/check_circle:")
if who.can("manage_models"):
    with st.expander("Where the models are kept"):
        st.code(f"bundled: {BUNDLED_WEIGHTS_DIR}\nyours:   {user_models_dir()}"
                + (f"\nBUS_MODEL: {os.environ['BUS_MODEL']}" if os.environ.get("BUS_MODEL")
                   else ""), language=None)
if os.environ.get("BUS_MODEL"):
    st.info("The server's settings name the model to use (BUS_MODEL): it overrides the choice "
            "made here.", icon=":material/info:")

entries = list_models()
active_path = active_model_path()
if not entries:
    st.info("No model yet: train one on the Train page, or add one below.",
            icon=":material/info:")
for model in entries:
    model_card(model, is_active(model, active_path), who)
if who.can("upload_model"):
    upload_section(who)
st.subheader("Model decisions")
decisions_table(decision_log(), "models_decisions")
