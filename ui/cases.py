"""The case store in the app: one store per process, saving a prediction as a case, and the
export of cases as a zip. The store itself is bus_core.clinic.cases."""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from bus_core.clinic.cases import (
    Case,
    CaseStore,
    NewCase,
    PacsSource,
    Study,
    StudyReadingRecord,
    open_store,
)
from bus_core.clinic.export import export_busi
from bus_core.db import default_database
from bus_core.errors import BusError, StoreError
from bus_core.inference.predict import Prediction, Predictor
from bus_core.inference.study import StudyReading
from bus_core.roles import Identity
from ui.common import identity, show_error

EXPORT_FOLDER = "bus-cases"
"""The top folder inside an export zip (BUSI layout below it, with cases.csv)."""


@st.cache_resource(show_spinner=False)
def _open_store(database: str) -> CaseStore:
    return open_store(database)


def case_store() -> CaseStore | None:
    """The case store at its default location ($BUS_DATABASE_URL, else the data folder's),
    opened once per process; None after showing why it cannot be used (e.g. the data folder is
    not writable)."""
    try:
        return _open_store(default_database())
    except StoreError as exc:
        show_error(exc, "The case database cannot be used")
        return None


def reading_as_case(image: np.ndarray, image_name: str, masks: Sequence[np.ndarray],
                    combine_mode: str | None, predictor: Predictor, prediction: Prediction,
                    cam_settings: Mapping[str, Any] | None, mask_source: str | None = None,
                    pacs: PacsSource | None = None) -> NewCase:
    """A prediction as a case to store, with the model that made it and its malignant flag.

    `cam_settings` describes the explanation shown, e.g. {"target": "benign", "method":
    "gradcam", "opacity": 0.45}; the Review page uses it to redraw the same overlay.
    `mask_source` says who made the masks (`bus_core.clinic.cases.MASK_SOURCES`); `pacs`, where in
    the hospital archive the image came from."""
    return NewCase(image=image, image_name=image_name, masks=list(masks),
                   combine_mode=combine_mode, model_name=predictor.card.name,
                   model_hash=predictor.card.weights_sha256,
                   probabilities=prediction.probabilities, predicted_label=prediction.label,
                   cam_settings=cam_settings, mask_source=mask_source,
                   uncertain=prediction.uncertain, pacs=pacs, flagged=prediction.malignant_flag)


def save_study_button(items: Sequence[NewCase], reading: StudyReading, *, key: str
                      ) -> Study | None:
    """A 'Save as one study' button for the readings of several images of one examination
    (`key` identifies them); after saving, the study's number is shown instead, so a study is
    saved once. Nothing is shown to a user who may not save cases."""
    who = identity()
    if who is None or not who.can("save_case"):
        return None
    saved: dict[str, int] = st.session_state.setdefault("_saved_studies", {})
    if key in saved:
        st.success(f"Saved as study {saved[key]}: review its cases on the Review cases page.",
                   icon=":material/check_circle:")
        return None
    store = case_store()
    if store is None:
        return None
    place = st.empty()
    if not place.button(f"Save as one study ({len(items)} cases)", key=f"save_study_{key}",
                        icon=":material/save:",
                        help="Each image becomes a case to review, kept together with the "
                             "study's reading (and the PACS study it came from)."):
        return None
    record = StudyReadingRecord(rule=reading.rule, probabilities=reading.probabilities,
                                predicted_label=reading.label, uncertain=reading.uncertain,
                                flagged=bool(reading.flag))
    try:
        study = store.save_study(items, record, who=who)
    except BusError as exc:
        show_error(exc, "The study could not be saved")
        return None
    saved[key] = study.id
    place.success(f"Saved as study {study.id} (cases "
                  f"{', '.join(str(i) for i in study.case_ids)}): review them on the Review "
                  "cases page.", icon=":material/check_circle:")
    return study


def save_case_button(item: NewCase, *, key: str) -> Case | None:
    """A 'Save as case' button for one reading (`key` identifies it, e.g. image + mask +
    model); after saving, the case number is shown instead, so a case is saved once. Returns
    the case on the run that saved it. Nothing is shown to a user who may not save cases (demo
    mode saves nothing)."""
    who = identity()
    if who is None or not who.can("save_case"):
        return None
    saved: dict[str, int] = st.session_state.setdefault("_saved_cases", {})
    if key in saved:
        st.success(f"Saved as case {saved[key]}: review it on the Review cases page.",
                   icon=":material/check_circle:")
        return None
    store = case_store()
    if store is None:
        return None
    try:
        earlier = store.cases_of_image(item.image)
    except BusError as exc:
        show_error(exc, "The case database cannot be read")
        return None
    label, button_key = "Save as case", f"save_case_{key}"
    if earlier:
        numbers = ", ".join(str(c.id) for c in earlier)
        st.warning(f"This image is already saved as case {numbers}. Save it again only for a "
                   "new reading (another model or mask); otherwise review the saved case.",
                   icon=":material/content_copy:")
        # another key: a click on "Save as case" drawn before the image was saved elsewhere
        # (a study, another session) does not save it twice
        label, button_key = "Save again as a new case", f"save_case_again_{key}"
    place = st.empty()  # the button, replaced by the message once saved
    if not place.button(label, key=button_key, icon=":material/save:"):
        return None
    try:
        case = store.add_case(item, who=who)
    except BusError as exc:
        show_error(exc, "The case could not be saved")
        return None
    saved[key] = case.id
    place.success(f"Saved as case {case.id}: review it on the Review cases page.",
                  icon=":material/check_circle:")
    return case


def export_cases_zip(store: CaseStore, *, who: Identity, only_confirmed: bool = True) -> bytes:
    """The cases `who` may export as a zip: `bus-cases/<label>/case-<id>.png` (+ masks) and
    `bus-cases/cases.csv`, as `export_busi` writes them."""
    buffer = BytesIO()
    with tempfile.TemporaryDirectory() as temp:
        folder = export_busi(store, Path(temp) / EXPORT_FOLDER, who=who,
                                   only_confirmed=only_confirmed)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, arcname=path.relative_to(temp).as_posix())
    return buffer.getvalue()


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A stored image (greyscale, RGB or RGBA uint8) as HxWx3 RGB."""
    if image.ndim == 2:
        return np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])
