"""Review cases: the saved predictions with filters, each case's image, Grad-CAM and history, the
radiologist's confirmation or correction; export of the cases; and retraining on the reviewed
cases behind a safety gate, with the decision log and roll back."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from bus_core.clinic.cases import (
    AUDIT_FIELDS,
    ORDERABLE,
    STATUSES,
    Case,
    CaseStore,
    display_time,
)
from bus_core.clinic.gate import (
    GATE_FILE,
    GATE_SUBSETS,
    GateResult,
    activate_if_passed,
    current_result,
    decision_for,
    decision_log,
    earlier_models,
    evaluate_candidate,
    reject,
    rollback,
)
from bus_core.clinic.retraining import RetrainPlan, find_plans, prepare_retraining
from bus_core.constants import CLASSES
from bus_core.data.dataset import class_counts
from bus_core.data.roots import default_split
from bus_core.errors import BusError
from bus_core.inference.cam import method_id, overlay
from bus_core.inference.pdf_report import Review, assemble, render_study_pdf
from bus_core.inference.predict import Predictor, flag_sentence
from bus_core.inference.report import ReportContent, mask_note, report_filename
from bus_core.metrics import fmt3
from bus_core.models.registry import active_model_path
from bus_core.roles import Identity
from bus_core.settings import default_dataset_dir
from bus_core.training.jobs import current_job, start_training
from bus_core.training.runs import last_event, progress_fraction, progress_text, read_progress
from ui.auth import require_page
from ui.cases import as_rgb, case_store, export_cases_zip
from ui.charts import probability_chart
from ui.common import md_escape, optional_predictor, show_error, start_job
from ui.data_inputs import resolve_path, resolve_source
from ui.decisions import ACTION_LABELS, decisions_table
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
SORT_LABELS = {"created_at": "Date saved", "updated_at": "Last change", "id": "Case number",
               "status": "Status", "predicted_label": "Model's reading",
               "confirmed_label": "Confirmed label", "reviewer": "Reviewer",
               "model_name": "Model"}


# --- the case table ----------------------------------------------------------------------------

def choice(value: str) -> str | None:
    """A filter's value, None for 'All'."""
    return None if value == ALL else value


def date_bounds(dates: tuple[dt.date, ...]) -> dict[str, dt.datetime]:
    """`since` / `until` of `list_cases` for local calendar days (the end day included)."""
    bounds = {}
    if len(dates) >= 1:
        bounds["since"] = dt.datetime.combine(dates[0], dt.time.min).astimezone()
    if len(dates) == 2:
        bounds["until"] = dt.datetime.combine(dates[1] + dt.timedelta(days=1),
                                              dt.time.min).astimezone()
    return bounds


def filters(everyone: list[Case]) -> dict[str, Any]:
    """Filter and sort widgets; returns the keyword arguments of `CaseStore.list_cases`."""
    c1, c2, c3, c4 = st.columns(4)
    status = c1.selectbox("Status", [ALL, *STATUSES], key="review_f_status")
    predicted = c2.selectbox("Model's reading", [ALL, *CLASSES], key="review_f_predicted")
    confirmed = c3.selectbox("Confirmed label", [ALL, *CLASSES], key="review_f_confirmed")
    reviewers = sorted({c.reviewer for c in everyone if c.reviewer})
    reviewer = c4.selectbox("Reviewer", [ALL, *reviewers], key="review_f_reviewer")
    c5, c6, c7 = st.columns([2, 1, 1], vertical_alignment="bottom")
    today = dt.date.today()
    first = min(dt.datetime.fromisoformat(c.created_at).astimezone().date() for c in everyone)
    dates = c5.date_input("Saved between", value=(min(first, today), today),
                       key="review_f_dates")
    order_by = c6.selectbox("Sort by", ORDERABLE, format_func=SORT_LABELS.get,
                            key="review_f_order")
    descending = c7.toggle("Descending", value=True, key="review_f_desc")
    return dict(status=choice(status), predicted=choice(predicted),
                confirmed=choice(confirmed), reviewer=choice(reviewer),
                order_by=order_by, descending=descending, **date_bounds(tuple(dates)))


def case_table(cases: list[Case]) -> pd.DataFrame:
    """One row per case, newest or as sorted; what a reviewer needs first on the left (a
    narrow window shows those)."""
    return pd.DataFrame([{
        "Case": c.id, "Agreement": AGREEMENT[c.status], "Model's reading": c.reading,
        "Confirmed": c.confirmed_label or "", "Notes": c.notes,
        "Probability": c.probabilities.get(c.predicted_label),
        "Saved": display_time(c.created_at), "Image": c.display_name, "Reviewer": c.reviewer,
        "Model": c.model_name} for c in cases])


def highlight_disagreements(row: pd.Series) -> list[str]:
    """Row style: cases where the radiologist corrected the model stand out."""
    return [DISAGREE_STYLE if row["Agreement"] == AGREEMENT["corrected"] else ""] * len(row)


def show_table(cases: list[Case]) -> None:
    """The cases as a table; clicking a row selects that case below."""
    table = case_table(cases)
    event = st.dataframe(
        table.style.apply(highlight_disagreements, axis=1), hide_index=True, width="stretch",
        on_select="rerun", selection_mode="single-row", key="review_table",
        column_config={"Probability": st.column_config.ProgressColumn(
            format="percent", min_value=0.0, max_value=1.0)})
    rows = event.selection.rows if event else []
    picked = int(table["Case"].iloc[rows[0]]) if rows else None
    if picked is not None and st.session_state.get("_review_last_pick") != picked:
        st.session_state["_review_last_pick"] = picked
        st.session_state["review_case"] = picked


# --- one case ----------------------------------------------------------------------------------

def cam_view(predictor: Predictor | None, why_not: str, case: Case, image: np.ndarray,
             masks: list[np.ndarray]) -> Explanation | None:
    """The Grad-CAM overlay, recomputed when the case's model is the active one (None when
    it is not redrawn)."""
    if predictor is None or predictor.card.weights_sha256 != case.model_hash:
        active = f"the active model is {predictor.card.name}" if predictor else why_not
        st.info(f"This prediction was made by model **{md_escape(case.model_name)}** (weights "
                f"{case.model_hash[:8] or 'unknown'}), and {active}: its Grad-CAM is not "
                "redrawn here.", icon=":material/info:")
        return None
    settings = case.cam_settings or {}
    target = settings.get("target")
    target = target if target in predictor.classes else case.predicted_label
    method = method_id(settings.get("method"))
    key = ("case", case.id, case.image_hash)
    used = masks if predictor.spec.uses_masks else []
    try:
        prediction = predict_cached(predictor, key, image, used)
        cam = cam_cached(predictor, key, prediction, target, method)
    except BusError as exc:
        show_error(exc, "The explanation cannot be redrawn")
        return None
    seen = prediction.explained_by(target).model_view
    opacity = float(settings.get("opacity", 0.45))
    shown = Explanation(overlay(seen, cam, opacity), target, method, opacity)
    st.image(shown.overlay, caption=f"Grad-CAM for '{target}' (recomputed with the active model)",
             alt=f"Grad-CAM heat map of case {case.id} for the class {target}",
             width="stretch")
    return shown


def case_report(predictor: Predictor, case: Case, image: np.ndarray, shown: Explanation
                ) -> bytes:
    """The case's PDF report, with its review and signature block."""
    when = dt.datetime.fromisoformat(case.updated_at).astimezone()
    content = ReportContent(
        image=image, overlay=shown.overlay, probabilities=case.probabilities,
        label=case.predicted_label, model=case.model_name, explained=shown.target,
        method=shown.method, filename=case.display_name, uncertain=case.uncertain,
        mask_note=mask_note(predictor, (case.mask_source or "given") if case.mask_hashes
                            else None),
        flag=flag_sentence(case.probabilities, predictor.card.malignant_threshold))
    review = (Review(case.reviewer, case.confirmed_label, when, case.notes)
              if case.confirmed_label else None)
    return render_study_pdf(assemble(predictor.card, [content], [], name=f"Case {case.id}",
                                     review=review))


def history_table(store: CaseStore, case: Case) -> None:
    """The audit entries of a case, oldest first."""
    entries = store.history(case.id)
    st.dataframe(pd.DataFrame([{"When": display_time(e.at), "Who": e.who or "–",
                                "Action": e.action,
                                "Field": AUDIT_FIELDS.get(e.field or "", e.field or ""),
                                "Before": e.old_value or "", "After": e.new_value or ""}
                               for e in entries]), hide_index=True, width="stretch",
                 key=f"review_history_{case.id}")


def review_form(store: CaseStore, case: Case, who: Identity) -> None:
    """Confirm or correct the label, with notes; signed by the signed-in user."""
    with st.form(f"review_form_{case.id}"):
        label = st.radio("Label", CLASSES, index=CLASSES.index(case.label), horizontal=True,
                         format_func=str.capitalize, key=f"review_label_{case.id}",
                         help="Choose the model's reading to confirm it, another class to "
                              "correct it.")
        notes = st.text_area("Notes", value=case.notes, key=f"review_notes_{case.id}")
        submitted = st.form_submit_button("Save review", type="primary",
                                          icon=":material/fact_check:")
    if not submitted:
        return
    try:
        saved = store.review_case(case.id, label=label, who=who, notes=notes)
    except BusError as exc:
        show_error(exc, "The review was not saved")
        return
    st.session_state["review_flash"] = f"Case {saved.id} {saved.status} as {saved.label}."
    st.rerun()


def case_detail(store: CaseStore, case: Case, who: Identity) -> None:
    """Image with its lesion outline, the model's reading and Grad-CAM, history, review."""
    try:
        image = as_rgb(store.load_image(case))
        masks = store.load_masks(case)
    except BusError as exc:
        show_error(exc)
        return
    predictor, why_not = optional_predictor()
    left, middle, right = st.columns(3, gap="medium")
    union = np.logical_or.reduce(masks) if masks else None
    left.image(image if union is None or not union.any() else outlined(image, union),
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
            shown_image = image if union is None or not union.any() else outlined(image, union)
            st.download_button(
                "Report (PDF)", data=memo("case_pdf", (case.id, case.updated_at,
                                                       digest(shown.overlay)),
                                          lambda: case_report(predictor, case, shown_image,
                                                              shown), max_entries=4),
                file_name=report_filename(f"case {case.id}", dt.datetime.now(), "pdf"),
                mime="application/pdf", icon=":material/picture_as_pdf:", on_click="ignore",
                key=f"review_pdf_{case.id}",
                help="The case's reading, map and review as a PDF for the record.")
    review_form(store, case, who)
    case_from_pacs(store, case, who)
    st.markdown("##### History")
    history_table(store, case)


def cases_tab(store: CaseStore, who: Identity) -> None:
    """Filters, the table, and the selected case."""
    everyone = store.list_cases()
    if not everyone:
        st.info("No cases saved yet: save a prediction as a case on the Diagnose page.",
                icon=":material/info:")
        return
    cases = store.list_cases(**filters(everyone))
    st.caption(f"{len(cases)} of {len(everyone)} cases · "
               f"{sum(c.status == 'corrected' for c in cases)} where the reviewer disagreed "
               "with the model (highlighted)")
    if not cases:
        st.info("No case matches these filters.", icon=":material/filter_alt_off:")
        return
    show_table(cases)
    ids = [c.id for c in cases]
    if st.session_state.get("review_case") not in ids:
        st.session_state["review_case"] = ids[0]
    by_id = {c.id: c for c in cases}
    # no status in an option's text: a browser keeps showing the text it was chosen with, so a
    # review would leave "to review" on screen (the status is shown with the case below)
    picked = st.selectbox("Case", ids, key="review_case",
                          format_func=lambda i: f"Case {i} · {by_id[i].display_name}")
    case_detail(store, by_id[picked], who)


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


# --- retraining --------------------------------------------------------------------------------

def start(plan: RetrainPlan, who: Identity, resume: bool = False) -> None:
    """Start (or resume) the plan's training in the background."""
    if start_job(lambda: start_training(plan.config, who=who, resume=resume),
                 "The training could not start"):
        st.rerun()


def running_view(plan: RetrainPlan) -> None:
    """Progress of the fine-tuning, refreshed every few seconds."""
    @st.fragment(run_every=POLL_S)
    def refresh() -> None:
        if plan.status() != "running":
            st.rerun()
        events = read_progress(plan.files.progress)
        st.progress(progress_fraction(events), text=progress_text(events))

    refresh()


def _signed(value: float) -> str:
    """A difference with its sign, two decimals, a true minus sign: '−0.01', '+0.02'."""
    return f"{value:+.2f}".replace("-", "\u2212")


def difference_text(row: dict[str, Any]) -> str:
    """A gate row's difference (new model minus active) with its 95% interval where one was
    computed: '−0.01 [−0.04, +0.02]'; '' when not compared."""
    if row["difference"] is None:
        return ""
    spread = row.get("difference_ci95")
    interval = f" [{_signed(spread[0])}, {_signed(spread[1])}]" if spread else ""
    return f"{_signed(row['difference'])}{interval}"


def gate_rows(result: GateResult) -> pd.DataFrame:
    """The comparison table of a gate result."""
    verdict = {True: "ok", False: "worse", None: "not compared"}
    return pd.DataFrame([{"Data": GATE_SUBSETS[r["subset"]].removeprefix("the "),
                          "n": (result.candidate[r["subset"]].get("n") or 0),
                          "Metric": r["metric"].replace("_", " "),
                          "New model": fmt3(r["candidate"]), "Active model": fmt3(r["active"]),
                          "Difference [95% interval]": difference_text(r) or "–",
                          "Verdict": verdict[r["ok"]]}
                         for r in result.rows()])


def gate_differences(result: GateResult) -> None:
    """Each compared difference in a sentence, and what 'not worse' means."""
    for row in result.rows():
        if text := difference_text(row):
            st.caption(f"On {GATE_SUBSETS[row['subset']]}: "
                       f"{row['metric'].replace('_', ' ')} difference {text}.")
    st.caption(f"Difference: the new model's figure minus the active one's; in brackets, the "
               f"range it lies in with 95% confidence (both models scored on the same "
               f"resampled images). The new model counts as not worse when that whole range "
               f"stays within {result.tolerance:.2f} of no difference.")


def run_gate(plan: RetrainPlan) -> None:
    """Evaluate the new and the active model on the fixed test split and held-out cases."""
    try:
        with st.spinner("Evaluating both models on the fixed test split and the held-out "
                        "cases…"):
            result = evaluate_candidate(plan.model_dir, active_model_path(),
                                        plan.fixed_test_records(), plan.heldout_records())
        result.save(plan.model_dir / GATE_FILE)
    except BusError as exc:
        show_error(exc, "The comparison failed")
        return
    st.rerun()


def decide(action: Any, **kwargs: Any) -> None:
    """Run a gate decision; a missing name or a refused model is shown."""
    try:
        action(**kwargs)
    except BusError as exc:
        show_error(exc)
        return
    st.rerun()


def decision_buttons(plan: RetrainPlan, result: GateResult, who: Identity) -> None:
    """Activate (passed), or override with a reason (failed): administrators only; or keep
    the current model."""
    left, right = st.columns(2)
    if not who.can("manage_models"):
        left.caption("An administrator activates the new model, or overrides the gate.")
    elif result.passed:
        if left.button("Activate the new model", type="primary", icon=":material/star:",
                       key="review_gate_activate"):
            decide(activate_if_passed, result=result, candidate_path=plan.model_dir,
                   who=who)
    else:
        reason = left.text_input("Reason for overriding the gate (required)",
                                 key="review_gate_reason")
        if left.button("Override and activate", icon=":material/gpp_maybe:",
                       disabled=not reason.strip(), key="review_gate_override"):
            decide(activate_if_passed, result=result, candidate_path=plan.model_dir,
                   override_reason=reason, who=who)
    if right.button("Keep the current model", icon=":material/block:", key="review_gate_reject"):
        decide(reject, result=result, candidate_path=plan.model_dir, who=who)


def gate_view(plan: RetrainPlan, who: Identity, log: list[dict[str, Any]]) -> None:
    """The comparison of a finished model with the active one, and the decision."""
    done = decision_for(plan.model_dir, log)
    result = GateResult.load(plan.model_dir / GATE_FILE) if done else current_result(plan.model_dir)
    if result is None:
        st.info("Fine-tuning finished. Compare the new model with the active one before it "
                "can be used.", icon=":material/check_circle:")
        if st.button("Compare with the active model", type="primary",
                     icon=":material/balance:", key="review_gate_run"):
            run_gate(plan)
        return
    st.dataframe(gate_rows(result), hide_index=True, width="stretch", key="review_gate_table")
    gate_differences(result)
    for reason in result.reasons:
        st.caption(f"• {reason}")
    if done is not None:
        st.success(f"Decision: {ACTION_LABELS[done['action']]} by {md_escape(done['who'])} on "
                   f"{display_time(done['time'])}.", icon=":material/gavel:")
    elif result.passed:
        st.success(f"The new model is not worse than the active one (tolerance "
                   f"{result.tolerance:.2f}).", icon=":material/verified:")
        decision_buttons(plan, result, who)
    else:
        st.error("The new model is worse than the active one: it is not activated unless you "
                 "override the gate with a reason.", icon=":material/gpp_bad:")
        decision_buttons(plan, result, who)


def plan_view(plan: RetrainPlan, who: Identity, log: list[dict[str, Any]]) -> None:
    """The latest retraining: its data, its progress, then the gate."""
    status = plan.status()
    st.markdown(f"**{md_escape(plan.model_dir.name)}**: fine-tunes "
                f"{md_escape(Path(plan.active_model).name)} with "
                f"{len(plan.train_cases)} reviewed cases added to training; "
                f"{len(plan.heldout_cases)} held out for the comparison"
                + (f", {len(plan.excluded_cases)} left out (repeat evaluation images)"
                   if plan.excluded_cases else "") + ".")
    if status == "running":
        running_view(plan)
    elif status == "done":
        gate_view(plan, who, log)
    elif status == "failed":
        error = last_event(read_progress(plan.files.progress), "error")
        why = md_escape(error["message"]) if error else "see the Train page's log."
        st.error(f"The fine-tuning failed: {why}", icon=":material/error:")
    elif st.button("Resume the fine-tuning" if status != "not started" else "Start it",
                   icon=":material/play_arrow:", key="review_retrain_resume"):
        start(plan, who, resume=status != "not started")


def retrain_settings(store: CaseStore, who: Identity) -> None:
    """Base data, split and a few settings; Start."""
    dataset = default_dataset_dir()
    c1, c2 = st.columns(2)
    base_data = c1.text_input("Original training data", str(dataset or ""),
                              key="review_rt_data", help="The folder or CSV manifest the active "
                                                         "model was trained on.")
    base_split = c2.text_input("Its split file (the fixed test subset is taken from it)",
                               str(default_split()), key="review_rt_split")
    c3, c4, c5 = st.columns(3)
    epochs = c3.number_input("Epochs", 1, 100, 5, key="review_rt_epochs")
    share = c4.slider("Held-out share of new cases", 0.1, 0.5, 0.2, 0.05, key="review_rt_share")
    name = c5.text_input("New model name", dt.datetime.now().strftime("retrain-%Y%m%d-%H%M"),
                         key="review_rt_name")
    ready = bool(base_data.strip() and base_split.strip() and active_model_path())
    if st.button("Start fine-tuning on the reviewed cases", type="primary",
                 icon=":material/model_training:", disabled=not ready, key="review_rt_start"):
        try:
            with st.spinner("Exporting and splitting the reviewed cases…"):
                plan = prepare_retraining(store, who=who,
                                          base_data=[resolve_source(base_data)],
                                          base_split=resolve_path(base_split),
                                          heldout_share=share, name=name,
                                          settings={"epochs": int(epochs)})
        except BusError as exc:
            show_error(exc, "The retraining could not be prepared")
            return
        start(plan, who)


def decision_history(who: Identity, log: list[dict[str, Any]]) -> None:
    """Every model decision, newest first, and roll back to an earlier model."""
    st.markdown("##### Model decisions")
    decisions_table(log, "review_decisions")
    targets = earlier_models(log)
    if not targets:
        return
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    target = left.selectbox("Roll back to an earlier model", targets, format_func=lambda p: p.name,
                            key="review_rollback_target")
    if right.button("Roll back", icon=":material/undo:", key="review_rollback",
                    disabled=not who.can("manage_models"),
                    help=None if who.can("manage_models") else "Administrators only."):
        decide(rollback, to_path=target, who=who)


def retrain_tab(store: CaseStore, who: Identity) -> None:
    """Fine-tune the active model on the reviewed cases, gate it, decide; decision log."""
    confirmed = store.confirmed_cases()
    counts = class_counts(confirmed)
    st.markdown(f"**{len(confirmed)} reviewed cases** can be used: "
                + ", ".join(f"{n} {label}" for label, n in counts.items()) + ".")
    st.caption("The active model is fine-tuned on its original training data plus the reviewed "
               "cases (a share of them is held out). The new model is then compared with the "
               "active one on the fixed test split and on the held-out cases; it is activated "
               "only if it is not worse.")
    plans = find_plans()
    log = decision_log()
    if plans:
        with st.container(border=True):
            plan_view(plans[0], who, log)
    running = current_job()
    if running is not None:
        st.info("A training job is running; a new fine-tuning can start when it ends.",
                icon=":material/hourglass_top:")
    elif confirmed:
        with st.expander("New fine-tuning", expanded=not plans):
            retrain_settings(store, who)
    decision_history(who, log)


# --- the page ----------------------------------------------------------------------------------

st.title("Review cases")
st.caption(" ".join(part for part, shown in (
    ("Confirm or correct the model's readings.", who.can("review")),
    ("Reviewed cases become training data; a retrained model replaces the active one only after "
     "a safety check.", True)) if shown))

store = case_store()
if store is None:
    st.stop()
flash = st.session_state.pop("review_flash", None)
if flash:
    st.success(flash, icon=":material/check_circle:")
tabs = [name for name, allowed in (("Cases", who.can("review")), ("Export", who.can("review")),
                                   ("Retrain", who.can("train"))) if allowed]
for name, tab in zip(tabs, st.tabs(tabs)):
    with tab:
        if name == "Cases":
            cases_tab(store, who)
        elif name == "Export":
            export_tab(store, who)
        else:
            retrain_tab(store, who)
