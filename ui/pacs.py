"""The hospital archive in the app: on the Diagnose page "Open from PACS" (search studies, pick
ultrasound images from their series, fetch them into the page as uploads) and "Send to PACS"
(the report and the result back to the image's study); on the Review page, where a case's image
came from and sending its confirmed label to that study. The archive itself is
bus_core.integrations.pacs.client."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import streamlit as st
from pydicom.dataset import Dataset

from bus_core.clinic.cases import Case, CaseStore, PacsSource
from bus_core.errors import BusError
from bus_core.inference.predict import Prediction, Predictor
from bus_core.integrations.pacs.client import (
    SENT_ACTION,
    InstanceRef,
    Pacs,
    SeriesInfo,
    StudyInfo,
    is_ultrasound,
    send_result,
    send_review,
)
from bus_core.integrations.pacs.dicom import prediction_finding
from bus_core.integrations.pacs.endpoints import PacsError, endpoints
from bus_core.roles import Identity
from ui.common import md_escape, show_error
from ui.state import memo
from ui.uploads import Upload, decode_bytes

OPENED = "pacs_opened"
"""Session key: upload key -> `Opened`, the images opened from the archive."""
STUDIES = "pacs_studies"
"""Session key: (endpoint name, the studies of the last search)."""
SENT = "pacs_sent"
"""Session key: what was sent, (upload key, model hash, label) -> the SR's instance UID."""
THUMBNAILS_PER_SERIES = 24
"""Instances shown (with thumbnails) per series; a longer series says how many are left."""


@dataclass(frozen=True)
class Opened:
    """An image opened from the archive: as an upload, with its header and endpoint name."""

    upload: Upload
    header: Dataset
    endpoint: str


def _pacs(name: str) -> Pacs:
    configured = {e.name: e for e in endpoints()}
    if name not in configured:
        raise PacsError(f"The PACS '{name}' is no longer configured.")
    return Pacs(configured[name])


def _study_line(study: StudyInfo) -> str:
    day = (f"{study.date[:4]}-{study.date[4:6]}-{study.date[6:]}" if len(study.date) == 8
           else study.date or "no date")
    parts = [day, f"patient {study.patient_id or '–'}", f"accession {study.accession or '–'}",
             study.description, f"{study.instance_count} images"]
    return " · ".join(p for p in parts if p)


def _search(names: list[str]) -> None:
    """The search form; its result goes to the session (STUDIES)."""
    with st.form("pacs_search", border=False):
        name = names[0] if len(names) == 1 else st.selectbox("PACS", names)
        c1, c2, c3 = st.columns([2, 2, 3])
        patient = c1.text_input("Patient ID")
        accession = c2.text_input("Accession number")
        dates = c3.date_input("Study date (from – to)", value=(), format="YYYY-MM-DD",
                              max_value=dt.date.today() + dt.timedelta(days=1))
        st.caption("Ultrasound studies (modality US) only.")
        if not st.form_submit_button("Search", icon=":material/search:"):
            return
    if not (patient.strip() or accession.strip() or dates):
        st.warning("Give a patient ID, an accession number or a date range.",
                   icon=":material/info:")
        return
    chosen = list(dates) if isinstance(dates, (list, tuple)) else [dates]
    try:
        studies = _pacs(name).find_studies(
            patient_id=patient, accession=accession,
            date_from=chosen[0] if chosen else None,
            date_to=chosen[-1] if chosen else None)
    except BusError as exc:
        show_error(exc)
        return
    st.session_state[STUDIES] = (name, studies)


def _pick(name: str, study: StudyInfo) -> list[tuple[InstanceRef, int]]:
    """The series of a study with a checkbox (and a frame choice) per ultrasound image."""
    pacs = _pacs(name)
    series: list[SeriesInfo] = memo("pacs_series", (name, study.study_uid),
                                    lambda: pacs.series(study.study_uid), max_entries=16)
    chosen = []
    shown = [s for s in series if s.modality == "US"]
    if not shown:
        st.info("This study has no ultrasound images (modality US) to read.",
                icon=":material/info:")
    for one in shown:
        refs = [r for r in memo("pacs_instances", (name, one.series_uid),
                                lambda one=one: pacs.instances(study.study_uid, one),
                                max_entries=32) if is_ultrasound(r)]
        st.markdown(f"**Series {one.number if one.number is not None else '–'}**"
                    f" {md_escape(one.description)} · {len(refs)} image{'s' * (len(refs) != 1)}")
        columns = st.columns(4)
        for i, ref in enumerate(refs[:THUMBNAILS_PER_SERIES]):
            with columns[i % 4]:
                thumb = memo("pacs_thumb", (name, ref.sop_uid),
                             lambda ref=ref: pacs.thumbnail(ref), max_entries=64)
                if thumb:
                    st.image(thumb, width="stretch")
                picked = st.checkbox(f"Image {ref.number if ref.number is not None else i + 1}"
                                     + (f" ({ref.frames} frames)" if ref.frames > 1 else ""),
                                     key=f"pacs_pick_{ref.sop_uid}")
                frame = 1
                if picked and ref.frames > 1:
                    frame = st.number_input("Frame", 1, ref.frames, 1,
                                            key=f"pacs_frame_{ref.sop_uid}")
                if picked:
                    chosen.append((ref, int(frame) - 1))
        if len(refs) > THUMBNAILS_PER_SERIES:
            st.caption(f"{len(refs) - THUMBNAILS_PER_SERIES} more images in this series are "
                       "not listed.")
    return chosen


def _open(name: str, chosen: list[tuple[InstanceRef, int]]) -> None:
    """Fetch the chosen images and decode them as uploads are (same path, same checks)."""
    pacs = _pacs(name)
    opened: dict[str, Opened] = st.session_state.setdefault(OPENED, {})
    with st.spinner(f"Fetching {len(chosen)} image{'s' if len(chosen) > 1 else ''}…"):
        for ref, frame in chosen:
            fetched = pacs.fetch(ref)
            label = ref.label if frame == 0 else ref.label.replace(".dcm",
                                                                   f" frame {frame + 1}.dcm")
            upload = decode_bytes(label, fetched.data, frame)
            opened[upload.key] = Opened(upload, fetched.header, name)


def open_from_pacs(who: Identity) -> list[Upload]:
    """The "Open from PACS" panel (for users who may diagnose, when a PACS is configured) and
    the images opened from it in this session."""
    if not who.can("diagnose"):
        return []
    try:
        names = [e.name for e in endpoints()]
    except PacsError as exc:
        show_error(exc)
        return []
    if not names:
        return []
    opened: dict[str, Opened] = st.session_state.get(OPENED, {})
    with st.expander("Open from PACS", icon=":material/cloud_download:", expanded=not opened):
        _search(names)
        name, studies = st.session_state.get(STUDIES, (names[0], None))
        if studies is not None and not studies:
            st.info("No ultrasound study matches.", icon=":material/info:")
        if studies:
            study = st.selectbox("Study", studies, format_func=_study_line, key="pacs_study")
            try:
                chosen = _pick(name, study)
                if st.button(f"Open {len(chosen)} selected" if chosen else "Open selected",
                             disabled=not chosen, icon=":material/download:",
                             key="pacs_open"):
                    _open(name, chosen)
                    st.rerun()
            except BusError as exc:
                show_error(exc)
    if opened:
        left, right = st.columns([3, 1], vertical_alignment="center")
        left.caption(f"{len(opened)} image{'s' if len(opened) > 1 else ''} opened from the PACS.")
        if right.button("Close", icon=":material/close:", key="pacs_close",
                        help="Close the images opened from the PACS"):
            del st.session_state[OPENED]
            st.rerun()
    return [o.upload for o in opened.values()]


def send_to_pacs_button(who: Identity, upload_key: str, predictor: Predictor,
                        prediction: Prediction, report_png: bytes) -> None:
    """"Send to PACS" for an image opened from the archive, for users who may save cases:
    stores the report (Secondary Capture) and the result (structured report) in its study."""
    opened = st.session_state.get(OPENED, {}).get(upload_key)
    if opened is None or not who.can("save_case"):
        return
    sent: dict[tuple[str, str, str], str] = st.session_state.setdefault(SENT, {})
    key = (upload_key, predictor.card.weights_sha256, prediction.label)
    if key in sent:
        st.success("Report and result sent to the PACS (new series in the study).",
                   icon=":material/cloud_done:")
        return
    if not st.button("Send to PACS", icon=":material/cloud_upload:",
                     key=f"pacs_send_{upload_key}_{predictor.card.weights_sha256[:8]}",
                     help="Stores the report image and a structured report (class, "
                          "probabilities, model) in this image's study, each in a new series."):
        return
    try:
        with st.spinner("Sending to the PACS…"):
            result = send_result(_pacs(opened.endpoint), opened.header,
                                 prediction_finding(prediction, predictor.card.weights_sha256),
                                 report_png, who=who)
    except BusError as exc:
        show_error(exc, "Not sent to the PACS")
        return
    sent[key] = result.sop_uids[-1]
    st.success("Report and result sent to the PACS (new series in the study).",
               icon=":material/cloud_done:")


def pacs_source(upload_key: str) -> PacsSource | None:
    """Where in the archive the image of this upload came from (None when it was uploaded)."""
    opened = st.session_state.get(OPENED, {}).get(upload_key)
    if opened is None:
        return None
    header = opened.header
    return PacsSource(opened.endpoint, str(header.StudyInstanceUID),
                      str(header.SeriesInstanceUID), str(header.SOPInstanceUID))


def case_from_pacs(store: CaseStore, case: Case, who: Identity) -> None:
    """For a case opened from the archive: its PACS and UIDs and, once reviewed, for users who
    may review while that PACS is configured, "Send label to PACS" (a structured report in a
    new series of the study, logged in the case's history)."""
    if case.pacs is None:
        return
    source = case.pacs
    st.caption(f"From the PACS **{md_escape(source.endpoint)}** · study `{source.study_uid}` · "
               f"series `{source.series_uid}` · image `{source.sop_uid}`")
    if case.confirmed_label is None or not who.can("review"):
        return
    try:
        configured = {e.name for e in endpoints()}
    except PacsError as exc:
        show_error(exc)
        return
    if source.endpoint not in configured:
        if configured:
            st.caption(f"The PACS '{md_escape(source.endpoint)}' is no longer configured: the "
                       "label cannot be sent to it.")
        return
    sent = [e for e in store.history(case.id)
            if e.action == SENT_ACTION and e.new_value == case.confirmed_label]
    if sent:
        st.caption(f"The label {case.confirmed_label} was sent to the PACS by "
                   f"{md_escape(sent[-1].who)} ({sent[-1].at[:16].replace('T', ' ')} UTC).")
    if not st.button("Send label to PACS" if not sent else "Send label to PACS again",
                     icon=":material/cloud_upload:", key=f"pacs_review_{case.id}",
                     help="Stores the confirmed label, its reviewer and the model as a "
                          "structured report in a new series of the image's study."):
        return
    try:
        with st.spinner("Sending to the PACS…"):
            send_review(_pacs(source.endpoint), store, case, who=who)
    except BusError as exc:
        show_error(exc, "The label was not sent to the PACS")
        return
    st.success(f"The label {case.confirmed_label} was sent to the PACS "
               f"'{md_escape(source.endpoint)}' (a new series in the study).",
               icon=":material/cloud_done:")
