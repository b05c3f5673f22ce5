"""Diagnose: upload breast-ultrasound images, optionally mark the lesion, and read the model's
calibrated prediction with its Grad-CAM explanation; several images are also read as one
study; download PNG and PDF reports."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import streamlit as st

from bus_core.clinic.cases import NewCase, shown_name
from bus_core.data.inputs import describe_input
from bus_core.errors import BusError
from bus_core.inference.outline import Segmenter
from bus_core.inference.pdf_report import assemble, render_study_pdf
from bus_core.inference.predict import Prediction, Predictor
from bus_core.inference.report import (
    ReportContent,
    headline,
    mask_note,
    render_report,
    report_filename,
)
from bus_core.inference.study import DEFAULT_RULE, RULES, combine_predictions
from ui.auth import require_page
from ui.cases import reading_as_case, save_case_button, save_study_button
from ui.common import active_predictor, active_segmenter, md_escape, show_error
from ui.masking import MaskChoice, canvas_shown, mask_panel, outlined, show_crop_preview
from ui.pacs import open_from_pacs, pacs_source, send_to_pacs_button
from ui.results import Explanation, explanation_section, predict_cached, show_prediction
from ui.state import digest, memo
from ui.uploads import IMAGE_TYPES, Upload, read_case_files, read_uploads, unique

who = require_page("diagnose")


def prediction_key(predictor: Predictor, upload: Upload, choice: MaskChoice) -> tuple[str, str]:
    """Identifies a prediction: the image, and the mask when it changes the reading."""
    return upload.key, choice.key if predictor.reads_masks else ""


def predict(predictor: Predictor, upload: Upload, choice: MaskChoice) -> Prediction | None:
    """The prediction for an upload with its mask, or None after showing why there is
    none."""
    masks = [] if choice.mask is None else [choice.mask]
    try:
        return predict_cached(predictor, prediction_key(predictor, upload, choice),
                              upload.image, masks)
    except BusError as exc:
        show_error(exc)
        return None


def model_details(predictor: Predictor, prediction: Prediction) -> None:
    """Which models read the image, where and how fast: technical, so folded away."""
    with st.expander("Model details"):
        names = [predictor.card.name] + ([predictor.whole.card.name] if predictor.whole else [])
        st.caption(md_escape(f"Model {' with '.join(names)}"
                             + (f". {prediction.reading}" if prediction.reading else ".")))
        st.caption(f"Read in {prediction.elapsed_ms:.0f} ms ({md_escape(predictor.description)}).")


class Read(NamedTuple):
    """One image read on this page: what its reports show, the reading, the case it would be
    saved as, and the key that identifies that reading (image, mask, model)."""

    content: ReportContent
    prediction: Prediction
    item: NewCase
    key: str


def case_key(predictor: Predictor, upload: Upload, choice: MaskChoice) -> str:
    """Identifies a reading to save: the image, its mask and the model."""
    return f"{upload.key}_{choice.key}_{predictor.card.weights_sha256[:8]}"


def report_content(upload: Upload, choice: MaskChoice, predictor: Predictor,
                   prediction: Prediction, shown: Explanation) -> ReportContent:
    """What the reports show of one image, which they name by the name the case store gives
    it (a pseudonym unless file names are kept)."""
    image = upload.image if choice.mask is None else outlined(upload.image, choice.mask)
    return ReportContent(image=image, overlay=shown.overlay,
                         probabilities=prediction.probabilities, label=prediction.label,
                         model=prediction.model, explained=shown.target, method=shown.method,
                         filename=shown_name(upload.image, upload.name),
                         uncertain=prediction.uncertain, warnings=prediction.warnings,
                         mask_note=mask_note(predictor, None if choice.mask is None
                                             else choice.origin or "given"),
                         flag=prediction.flag_sentence())


def study_pdf(predictor: Predictor, read: list[tuple[ReportContent, Prediction]]) -> bytes:
    """The PDF report of these images as one study (one image: its own report)."""
    return render_study_pdf(assemble(predictor.card, [c for c, _ in read],
                                     [p for _, p in read]))


def case(predictor: Predictor, upload: Upload, dataset_masks: list | None = None,
         segmenter: Segmenter | None = None) -> Read | None:
    """One image: mask panel and image on the left, the result on the right, then the CAM;
    returns what its report shows, the reading and the case it would be saved as (None
    without a reading). While the canvas is shown, the result goes below it, so the canvas has
    the page's width."""
    if canvas_shown(upload.key):
        left, right = st.container(), st.container()
    else:
        left, right = st.columns([5, 4], gap="large")
    with left:
        choice = mask_panel(upload.image, predictor.spec, upload.key, dataset_masks, segmenter)
        h, w = upload.image.shape[:2]
        st.caption(f"{md_escape(upload.name)} · {w} x {h} px")
        show_crop_preview(upload.image, choice, predictor.spec)
    with right:
        prediction = predict(predictor, upload, choice)
        if prediction is not None:
            show_prediction(prediction, predictor.card.uncertain_below, upload.key)
        st.caption(describe_input(predictor.spec, two_stage=predictor.two_stage,
                                  has_mask=choice.mask is not None,
                                  outlined_automatically=choice.origin == "suggested"))
        if prediction is not None:
            model_details(predictor, prediction)
    if prediction is None:
        return None
    key = prediction_key(predictor, upload, choice)
    shown, column = explanation_section(predictor, prediction, upload.key, key)
    content = report_content(upload, choice, predictor, prediction, shown)
    memo_key = (key, choice.key, shown.target, digest(shown.overlay))
    png = memo("report", memo_key, lambda: render_report(content), max_entries=8)
    pdf = memo("report_pdf", memo_key, lambda: study_pdf(predictor, [(content, prediction)]),
               max_entries=8)
    # stacked, not side by side: a narrow column would cut the labels
    column.download_button("Report (PNG)", data=png,
                           file_name=report_filename(content.filename, content.created),
                           mime="image/png", icon=":material/download:",
                           help="Download the reading, its map and the image as one picture.",
                           key=f"report_{upload.key}", on_click="ignore")
    column.download_button("Report (PDF)", data=pdf,
                           file_name=report_filename(content.filename, content.created, "pdf"),
                           mime="application/pdf", icon=":material/picture_as_pdf:",
                           help="Download the reading as a PDF for the record, with a "
                                "signature block.",
                           key=f"report_pdf_{upload.key}", on_click="ignore")
    masks = [] if choice.mask is None else [choice.mask]
    item = reading_as_case(upload.image, upload.name, masks,
                           predictor.spec.combine if masks else None, predictor, prediction,
                           {"target": shown.target, "method": shown.method,
                            "opacity": shown.opacity}, mask_source=choice.origin,
                           pacs=pacs_source(upload.key))
    key = case_key(predictor, upload, choice)
    with column:
        save_case_button(item, key=key)
        send_to_pacs_button(who, upload.key, predictor, prediction, png)
    return Read(content, prediction, item, key)


def summary(uploads: list[Upload], results: list[Read | None]) -> None:
    """A table of the batch, one row per image, then the images read as one study: its
    reading, the rule, its PDF report, and saving it as one study."""
    rows = []
    for upload, result in zip(uploads, results, strict=True):
        row = {"Image": upload.name, "Reading": "–"}
        if result is not None:
            prediction = result.prediction
            row["Reading"] = "uncertain" if prediction.uncertain else prediction.label
            row.update(prediction.probabilities)
        rows.append(row)
    table = pd.DataFrame(rows)
    config = {name: st.column_config.ProgressColumn(name.capitalize(), format="percent",
                                                    min_value=0.0, max_value=1.0)
              for name in table.columns if name not in ("Image", "Reading")}
    st.dataframe(table, hide_index=True, column_config=config, width="stretch")
    read = [r for r in results if r is not None]
    if len(read) < 2:
        return
    study = combine_predictions([r.prediction for r in read], DEFAULT_RULE,
                                predictor.card.uncertain_below)
    st.subheader("As one study")
    st.markdown(f"**{md_escape(headline(study.label, study.probabilities, study.uncertain))}** "
                f"from {len(read)} images of one lesion or breast.")
    if study.flag:
        st.error(md_escape(study.flag), icon=":material/flag:")
    st.caption(f"The study's reading is {RULES[DEFAULT_RULE]}; it is flagged when any image is. "
               "Read them as one study only when they show the same lesion or breast.")
    pdf = memo("study_pdf", tuple((r.content.filename, digest(r.content.overlay),
                                   *r.prediction.probabilities.values()) for r in read),
               lambda: study_pdf(predictor, [(r.content, r.prediction) for r in read]),
               max_entries=4)
    st.download_button("Study report (PDF)", data=pdf, file_name=report_filename(
        "study", read[0].content.created, "pdf"), mime="application/pdf",
        icon=":material/picture_as_pdf:", key="study_report_pdf", on_click="ignore",
        help="Every image with its outline, map and reading, and the study's reading, as one "
             "PDF for the record.")
    save_study_button([r.item for r in read], study,
                      key="+".join(sorted(r.key for r in read)))


st.title("Diagnose")
st.caption("Upload a breast-ultrasound image to see the model's reading and where it looked. "
           "Research software: the result supports, never replaces, your own reading.")

predictor = active_predictor()
if predictor is None:
    st.stop()
# a two-stage model suggests outlines with its own outline model, as its figures were made
segmenter = predictor.outliner or active_segmenter()[0]

if "diagnose_path" in st.session_state:  # a case opened from the Evaluate page
    st.session_state["diagnose_opened"] = (st.session_state.pop("diagnose_path"),
                                           st.session_state.pop("diagnose_masks", []))
opened = st.session_state.get("diagnose_opened")
if opened:
    opened_upload, opened_masks = read_case_files(opened[0], opened[1])
    head, close = st.columns([6, 1], vertical_alignment="center")
    head.subheader(f"Case from the dataset: {md_escape(opened_upload.name)}")
    if close.button("Close case", icon=":material/close:"):
        del st.session_state["diagnose_opened"]
        st.rerun()
    if opened_upload.error is not None:
        show_error(opened_upload.error)
    else:
        case(predictor, opened_upload, opened_masks, segmenter)
    st.divider()

files = st.file_uploader("Ultrasound images", type=None, accept_multiple_files=True,
                         key="diagnose_files",
                         help=f"{', '.join(t.upper() for t in IMAGE_TYPES)} (DICOM files "
                              "without an extension too: the content tells); several files at "
                              "once are fine.")
uploads, copies = unique(read_uploads(files or []) + open_from_pacs(who))
for upload in uploads:
    if upload.error is not None:
        show_error(upload.error)
for copy in copies:
    st.info(f"'{md_escape(copy.name)}' is the same image as another upload; it is shown once.",
            icon=":material/content_copy:")
readable = [u for u in uploads if u.image is not None]

if len(readable) == 1:
    case(predictor, readable[0], segmenter=segmenter)
elif readable:
    batch = st.container()
    tabs = st.tabs([md_escape(u.name) for u in readable])
    results = []
    for upload, tab in zip(readable, tabs):
        with tab:
            results.append(case(predictor, upload, segmenter=segmenter))
    with batch:
        summary(readable, results)
