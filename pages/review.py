"""Review cases: the worklist of saved predictions (counts, filters, sorting by suspicion or age,
pages), each case's image, Grad-CAM, study and history, the radiologist's confirmation or
correction (one key per class); export of the cases. Retraining on the reviewed cases is the
Retrain page."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from bus_core.clinic.cases import AUDIT_FIELDS, Case, CaseStore, Study, display_time
from bus_core.clinic.reports import review_of
from bus_core.clinic.worklist import SORTS, VIEWS, Worklist, WorklistPage, next_case, read_page
from bus_core.constants import CLASSES, MALIGNANT
from bus_core.errors import BusError
from bus_core.inference.cam import method_id, overlay
from bus_core.inference.pdf_report import assemble, render_study_pdf
from bus_core.inference.predict import Prediction, Predictor, flag_sentence
from bus_core.inference.report import ReportContent, mask_note, report_filename
from bus_core.inference.study import RULES
from bus_core.roles import Identity
from ui.auth import require_page
from ui.cases import as_rgb, case_store, export_cases_zip
from ui.charts import probability_chart
from ui.common import md_escape, optional_predictor, show_error
from ui.masking import outlined
from ui.pacs import case_from_pacs
from ui.results import Explanation, cam_cached, predict_cached
from ui.state import digest, memo

who = require_page("review")

ALL = "All"
POLL_S = 3
# Each case status in words (plain text: emoji fonts are missing on many clinic machines).
AGREEMENT = {"unreviewed": "to review", "confirmed": "agrees", "corrected": "disagrees",
             "labelled": "labelled (model uncertain)"}
DISAGREE_STYLE = "background-color: #fdecea"


# --- the worklist ------------------------------------------------------------------------------

def date_bounds(dates: tuple[dt.date, ...]) -> dict[str, dt.datetime]:
    """`since` / `until` of a worklist for local calendar days (the end day included)."""
    bounds = {}
    if len(dates) >= 1:
        bounds["since"] = dt.datetime.combine(dates[0], dt.time.min).astimezone()
    if len(dates) == 2:
        bounds["until"] = dt.datetime.combine(dates[1] + dt.timedelta(days=1),
                                              dt.time.min).astimezone()
    return bounds


def further_filters(store: CaseStore) -> dict[str, Any]:
    """The worklist's sort and further filters (reading, who saved, who reviewed, dates)."""
    people = store.distinct_people()
    sort = st.selectbox("Order", list(SORTS), format_func=lambda k: SORTS[k][0],
                        key="review_f_sort")
    with st.expander("Filters", icon=":material/filter_list:"):
        c1, c2 = st.columns(2)
        predicted = c1.selectbox("Model's reading", [ALL, *CLASSES], key="review_f_predicted")
        owner = c2.selectbox("Saved by", [ALL, *people["owner"]], key="review_f_owner")
        reviewer = c1.selectbox("Reviewed by", [ALL, *people["reviewer"]],
                                key="review_f_reviewer")
        dates = c2.date_input("Saved between", value=(), key="review_f_dates",
                              format="YYYY-MM-DD", help="Leave empty for any date.")
    return dict(sort=sort, predicted=choice(predicted), owner=choice(owner),
                reviewer=choice(reviewer), **date_bounds(tuple(dates)))


def choice(value: str) -> str | None:
    """A filter's value, None for 'All'."""
    return None if value == ALL else value


def worklist(store: CaseStore) -> tuple[WorklistPage, str]:
    """The page of the worklist the reviewer asks for (quick views with their counts at the
    top, then the order and further filters, and the page) and the key of its page number."""
    counts_place = st.container()
    further = further_filters(store)
    study = st.session_state.get("review_study")
    with counts_place:
        metrics = st.empty()  # filled once the page (with the counts) is read
        view = st.segmented_control("Show", list(VIEWS), default="to_review", key="review_view",
                                    format_func=lambda k: VIEWS[k][0], width="stretch",
                                    help="The counts above are among the cases matching the "
                                         "filters below.") or "all"
        if study is not None:
            left, right = st.columns([4, 1], vertical_alignment="center")
            left.info(f"Only the cases of study {study}.", icon=":material/filter_alt:")
            if right.button("Show every case", key="review_study_clear",
                            icon=":material/filter_alt_off:"):
                del st.session_state["review_study"]
                st.rerun()
    # a new page number widget (back to page 1) whenever the filters change
    key = f"review_page_{digest(repr((view, sorted(further.items()), study)).encode())}"
    shown = read_page(store, Worklist(view=view, **further, study_id=study,
                                      page=int(st.session_state.get(key, 1))))
    # the counts as metrics, not in the views' labels: a label that changes after each review
    # would lose the view chosen
    with metrics.container():
        for column, (name, (words, what, _)) in zip(st.columns(len(VIEWS)), VIEWS.items()):
            column.metric(words, shown.counts[name], help=what)
    return shown, key


def case_table(cases: list[Case]) -> pd.DataFrame:
    """One row per case, as sorted; what a reviewer needs first on the left (a narrow window
    shows those)."""
    return pd.DataFrame([{
        "Case": c.id, "Agreement": AGREEMENT[c.status], "Model's reading": c.reading,
        "Flag": "flagged" if c.flagged else "", "Malignant": c.probabilities.get(MALIGNANT),
        "Confirmed": c.confirmed_label or "", "Notes": c.notes,
        "Saved": display_time(c.created_at), "Saved by": c.owner or "",
        "Study": str(c.study_id or ""), "Image": c.display_name, "Reviewer": c.reviewer,
        "Model": c.model_name} for c in cases])


def highlight_disagreements(row: pd.Series) -> list[str]:
    """Row style: cases where the radiologist corrected the model stand out."""
    return [DISAGREE_STYLE if row["Agreement"] == AGREEMENT["corrected"] else ""] * len(row)


def show_table(cases: list[Case]) -> None:
    """The page's cases as a table; clicking a row selects that case below."""
    table = case_table(cases)
    event = st.dataframe(
        table.style.apply(highlight_disagreements, axis=1), hide_index=True, width="stretch",
        on_select="rerun", selection_mode="single-row", key="review_table",
        column_config={"Malignant": st.column_config.ProgressColumn(
            "Malignant", format="percent", min_value=0.0, max_value=1.0,
            help="The model's probability of malignancy.")})
    rows = event.selection.rows if event else []
    picked = int(table["Case"].iloc[rows[0]]) if rows else None
    if picked is not None and st.session_state.get("_review_last_pick") != picked:
        st.session_state["_review_last_pick"] = picked
        st.session_state["review_case"] = picked


def pager(shown: WorklistPage, key: str) -> None:
    """Where this page is in the worklist, and the pages to go to."""
    left, right = st.columns([3, 2], vertical_alignment="center")
    left.caption(f"Cases {shown.first}–{shown.last} of {shown.total} · page {shown.page} of "
                 f"{shown.pages} · {shown.counts['disagreements']} where the reviewer "
                 "disagreed with the model (highlighted)")
    if shown.pages > 1:
        if st.session_state.get(key, 1) > shown.pages:  # reviews emptied the last page
            st.session_state[key] = shown.pages
        with right:
            st.pagination(shown.pages, default=shown.page, key=key, width="stretch")


# --- one case ----------------------------------------------------------------------------------

def redraw(predictor: Predictor, case: Case, image: np.ndarray, masks: list[np.ndarray]
           ) -> tuple[Prediction, Explanation]:
    """The case's reading and Grad-CAM overlay recomputed with `predictor` (the model that
    made it), as they were shown when it was saved. Raises BusError."""
    settings = case.cam_settings or {}
    target = settings.get("target")
    target = target if target in predictor.classes else case.predicted_label
    method = method_id(settings.get("method"))
    key = ("case", case.id, case.image_hash)
    prediction = predict_cached(predictor, key, image, masks)
    cam = cam_cached(predictor, key, prediction, target, method)
    seen = prediction.explained_by(target).model_view
    opacity = float(settings.get("opacity", 0.45))
    return prediction, Explanation(overlay(seen, cam, opacity), target, method, opacity)


def made_by(predictor: Predictor | None, model_hash: str) -> bool:
    """Whether `predictor` is the model whose weights have this hash."""
    return predictor is not None and predictor.card.weights_sha256 == model_hash


def cam_view(predictor: Predictor | None, why_not: str, case: Case, image: np.ndarray,
             masks: list[np.ndarray]) -> Explanation | None:
    """The Grad-CAM overlay, recomputed when the case's model is the active one (None when
    it is not redrawn)."""
    if predictor is None or not made_by(predictor, case.model_hash):
        active = f"the active model is {predictor.card.name}" if predictor else why_not
        st.info(f"This prediction was made by model **{md_escape(case.model_name)}** (weights "
                f"{case.model_hash[:8] or 'unknown'}), and {active}: its Grad-CAM is not "
                "redrawn here.", icon=":material/info:")
        return None
    try:
        _, shown = redraw(predictor, case, image, masks)
    except BusError as exc:
        show_error(exc, "The explanation cannot be redrawn")
        return None
    st.image(shown.overlay, caption=f"Grad-CAM for '{shown.target}' (recomputed with the active "
             "model)", alt=f"Grad-CAM heat map of case {case.id} for the class {shown.target}",
             width="stretch")
    return shown


def with_outline(image: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """The image with its lesion outlined (as it is when it has no mask)."""
    union = np.logical_or.reduce(masks) if masks else None
    return image if union is None or not union.any() else outlined(image, union)


def case_content(predictor: Predictor, case: Case, image: np.ndarray, shown: Explanation
                 ) -> ReportContent:
    """What a report shows of a case (`image` with its outline)."""
    return ReportContent(
        image=image, overlay=shown.overlay, probabilities=case.probabilities,
        label=case.predicted_label, model=case.model_name, explained=shown.target,
        method=shown.method, filename=case.display_name, uncertain=case.uncertain,
        mask_note=mask_note(predictor, (case.mask_source or "given") if case.mask_hashes
                            else None),
        flag=flag_sentence(case.probabilities, predictor.card.malignant_threshold))


def case_report(predictor: Predictor, case: Case, image: np.ndarray, shown: Explanation
                ) -> bytes:
    """The case's PDF report, with its review and signature block."""
    return render_study_pdf(assemble(predictor.card, [case_content(predictor, case, image, shown)],
                                     [], name=f"Case {case.id}", review=review_of([case])))


def study_report(store: CaseStore, predictor: Predictor, study: Study) -> bytes:
    """The study's PDF report: each of its images with outline, map and reading, the study's
    reading by its rule, and the review when one reviewer reviewed every image. Raises
    BusError."""
    members = [store.get_case(i) for i in study.case_ids]
    contents, predictions = [], []
    for case in members:
        image, masks = as_rgb(store.load_image(case)), store.load_masks(case)
        prediction, shown = redraw(predictor, case, image, masks)
        contents.append(case_content(predictor, case, with_outline(image, masks), shown))
        predictions.append(prediction)
    return render_study_pdf(assemble(predictor.card, contents, predictions, rule=study.rule,
                                     name=f"Study {study.id}", review=review_of(members)))


def history_table(store: CaseStore, case: Case) -> None:
    """The audit entries of a case, oldest first."""
    entries = store.history(case.id)
    st.dataframe(pd.DataFrame([{"When": display_time(e.at), "Who": e.who or "–",
                                "Action": e.action,
                                "Field": AUDIT_FIELDS.get(e.field or "", e.field or ""),
                                "Before": e.old_value or "", "After": e.new_value or ""}
                               for e in entries]), hide_index=True, width="stretch",
                 key=f"review_history_{case.id}")


# the key that labels the case shown with each class (and opens the next one)
QUICK_KEYS = {"normal": "1", "benign": "2", "malignant": "3"}


def save_review(store: CaseStore, case_id: int, label: str | None, who: Identity,
                following: int | None, notes: str | None = None) -> None:
    """Button callback: save the review of `case_id` (`label`, else the label chosen in its
    form with its notes; `notes` None keeps them) and show `following` (when there is one)."""
    if label is None:
        label = st.session_state[f"review_label_{case_id}"]
        notes = st.session_state[f"review_notes_{case_id}"]
    try:
        saved = store.review_case(case_id, label=label, who=who, notes=notes)
    except BusError as exc:
        st.session_state["review_error"] = exc
        return
    st.session_state["review_flash"] = (
        f"Case {saved.id} {saved.status} as {saved.label}."
        + (f" Now case {following}." if following is not None else " That was the last case "
           "of this page."))
    if following is not None:
        st.session_state["review_case"] = following


def open_case(case_id: int | None) -> None:
    """Button callback: show another case."""
    if case_id is not None:
        st.session_state["review_case"] = case_id


def review(store: CaseStore, case: Case, who: Identity, ids: list[int]) -> None:
    """Confirm or correct the label (signed by the signed-in user): one key per class saves it
    and opens the next case, N and P move through the list without saving; or the form, with
    notes."""
    following, before = next_case(ids, case.id), next_case(ids, case.id, -1)
    st.caption("Keyboard: **1** normal · **2** benign · **3** malignant saves that label and "
               "opens the next case · **N** / **P** the next / previous case.")
    for column, label in zip(st.columns(len(CLASSES)), CLASSES):
        column.button(label.capitalize(), key=f"review_quick_{label}", width="stretch",
                      shortcut=QUICK_KEYS[label],
                      type="primary" if label == case.predicted_label else "secondary",
                      on_click=save_review, args=(store, case.id, label, who, following),
                      help=f"Save '{label}' as this case's label and open the next case.")
    back, forward = st.columns(2)  # a row of their own: no label cut short in a narrow window
    back.button("Previous", key="review_previous", shortcut="P", width="stretch",
                icon=":material/arrow_back:", disabled=before is None,
                on_click=open_case, args=(before,))
    forward.button("Next", key="review_next", shortcut="N", width="stretch",
                   icon=":material/arrow_forward:", disabled=following is None,
                   on_click=open_case, args=(following,))
    with st.form(f"review_form_{case.id}"):
        st.radio("Label", CLASSES, index=CLASSES.index(case.label), horizontal=True,
                 format_func=str.capitalize, key=f"review_label_{case.id}",
                 help="Choose the model's reading to confirm it, another class to correct it.")
        st.text_area("Notes", value=case.notes, key=f"review_notes_{case.id}")
        st.form_submit_button("Save review", type="primary", icon=":material/fact_check:",
                              on_click=save_review,
                              args=(store, case.id, None, who, following))


def study_section(store: CaseStore, case: Case, predictor: Predictor | None) -> None:
    """The study a case belongs to: its combined reading, a way to list its cases, and its
    PDF report (when the active model read it)."""
    if case.study_id is None:
        return
    try:
        study = store.get_study(case.study_id)
    except BusError as exc:
        show_error(exc)
        return
    with st.container(border=True):
        st.markdown(f"**Study {study.id}** · {len(study.case_ids)} images "
                    f"(cases {', '.join(str(i) for i in study.case_ids)}) · study reading "
                    f"**{study.reading}**" + (" · **flagged malignant**" if study.flagged
                                              else ""))
        st.caption(f"The study's reading is {RULES.get(study.rule, study.rule)}; it is "
                   "flagged when any of its images is."
                   + (f" From the PACS study `{study.study_uid}`." if study.study_uid else ""))
        # the buttons on a row under the text: they keep their words in a narrow window
        buttons = st.container(horizontal=True)
        if st.session_state.get("review_study") != study.id:
            buttons.button("List its cases", key=f"review_study_{study.id}",
                         icon=":material/filter_alt:", on_click=show_study, args=(study.id,))
        if predictor is not None and made_by(predictor, study.model_hash):
            try:
                pdf = memo("study_pdf", (study.id, tuple(store.get_case(i).updated_at
                                                         for i in study.case_ids)),
                           lambda: study_report(store, predictor, study), max_entries=2)
            except BusError as exc:
                show_error(exc, "The study's report cannot be made")
                return
            buttons.download_button(
                "Study report (PDF)", data=pdf, mime="application/pdf",
                file_name=report_filename(f"study {study.id}", dt.datetime.now(), "pdf"),
                icon=":material/picture_as_pdf:", on_click="ignore",
                key=f"review_study_pdf_{study.id}",
                help="Every image of the study with its outline, map and reading, the study's "
                     "reading, and the review when one reviewer reviewed every image.")


def show_study(study_id: int) -> None:
    """Button callback: the worklist shows only the cases of one study, whatever their status."""
    st.session_state["review_study"] = study_id
    st.session_state["review_view"] = "all"


def case_detail(store: CaseStore, case: Case, who: Identity, ids: list[int]) -> None:
    """Image with its lesion outline, the model's reading and Grad-CAM, its study, the review
    (one key per class, or the form with notes), history."""
    try:
        image = as_rgb(store.load_image(case))
        masks = store.load_masks(case)
    except BusError as exc:
        show_error(exc)
        return
    predictor, why_not = optional_predictor()
    left, middle, right = st.columns(3, gap="medium")
    left.image(with_outline(image, masks),
               caption=f"{md_escape(case.display_name)} · {len(masks)} mask(s)"
               + (f" ({case.mask_source})" if masks and case.mask_source else ""), width="stretch",
               alt=f"Image of case {case.id}" + (" with its lesion outlined" if masks else ""))
    with middle:
        shown = cam_view(predictor, why_not, case, image, masks)
    with right:
        st.markdown(f"**Model's reading:** {case.reading} · model {md_escape(case.model_name)}  \n"
                    f"**Status:** {AGREEMENT[case.status]}"
                    + (f" · confirmed **{case.confirmed_label}** by {md_escape(case.reviewer)}"
                       if case.confirmed_label else ""))
        st.plotly_chart(probability_chart(case.probabilities, case.predicted_label),
                        config={"displayModeBar": False, "staticPlot": True},
                        key=f"review_chart_{case.id}")
        if predictor is not None and shown is not None:
            shown_image = with_outline(image, masks)
            st.download_button(
                "Report (PDF)", data=memo("case_pdf", (case.id, case.updated_at,
                                                       digest(shown.overlay)),
                                          lambda: case_report(predictor, case, shown_image,
                                                              shown), max_entries=4),
                file_name=report_filename(f"case {case.id}", dt.datetime.now(), "pdf"),
                mime="application/pdf", icon=":material/picture_as_pdf:", on_click="ignore",
                key=f"review_pdf_{case.id}",
                help="The case's reading, map and review as a PDF for the record.")
    study_section(store, case, predictor)
    review(store, case, who, ids)
    case_from_pacs(store, case, who)
    st.markdown("##### History")
    history_table(store, case)


def cases_tab(store: CaseStore, who: Identity) -> None:
    """The worklist (counts, filters, a page of cases) and the selected case."""
    if not store.count_cases():
        st.info("No cases saved yet: save a prediction as a case on the Diagnose page.",
                icon=":material/info:")
        return
    shown, key = worklist(store)
    if not shown.cases:
        st.info("No case matches these filters.", icon=":material/filter_alt_off:")
        return
    show_table(shown.cases)
    pager(shown, key)
    ids = [c.id for c in shown.cases]
    current = st.session_state.get("review_case")
    by_id = {c.id: c for c in shown.cases}
    if isinstance(current, int) and current not in ids:
        try:  # the case just reviewed, which left this view: kept on screen until moving on
            by_id[current] = store.get_case(current)
            ids.append(current)
        except BusError:
            current = None
    if current not in ids:
        st.session_state["review_case"] = ids[0]
    # no status in an option's text: a browser keeps showing the text it was chosen with, so a
    # review would leave "to review" on screen (the status is shown with the case below)
    picked = st.selectbox("Case", ids, key="review_case",
                          format_func=lambda i: f"Case {i} · {by_id[i].display_name}")
    case_detail(store, by_id[picked], who, ids)


# --- export ------------------------------------------------------------------------------------

def export_tab(store: CaseStore, who: Identity) -> None:
    """A zip of the cases (all for an admin, else those the user saved) in the BUSI folder
    layout with a CSV of labels."""
    st.caption(("Every case of the store." if who.can("export_all") else
                "The cases you saved (an administrator can export everyone's).") + " "
               "One folder per class with the images (`case-<n>.png`) and their masks "
               "(`case-<n>_mask.png`), and `cases.csv` with the labels, predictions, reviewers "
               "and notes: readable as a training data folder.")
    only = st.toggle("Reviewed cases only", value=True, key="review_export_only",
                     help="Off: unreviewed cases are included, under the model's reading.")
    if st.button("Prepare the export", icon=":material/folder_zip:", key="review_export_build"):
        try:
            with st.spinner("Collecting the cases…"):
                st.session_state["review_export"] = export_cases_zip(store, who=who,
                                                                   only_confirmed=only)
        except BusError as exc:
            show_error(exc, "The export failed")
    data = st.session_state.get("review_export")
    if data:
        st.download_button("Download the cases (zip)", data=data, mime="application/zip",
                           file_name=f"bus-cases-{dt.date.today():%Y%m%d}.zip",
                           icon=":material/download:", key="review_export_download",
                           on_click="ignore")


# --- the page ----------------------------------------------------------------------------------

st.title("Review cases")
st.caption("Confirm or correct the model's readings. Reviewed cases become training data; a "
           "model retrained on them replaces the active one only after a safety check.")

store = case_store()
if store is None:
    st.stop()
flash = st.session_state.pop("review_flash", None)
if flash:
    st.success(flash, icon=":material/check_circle:")
failed = st.session_state.pop("review_error", None)
if failed is not None:
    show_error(failed, "The review was not saved")
cases, export = st.tabs(["Cases", "Export"])
with cases:
    cases_tab(store, who)
with export:
    export_tab(store, who)
