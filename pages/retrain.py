"""Retrain: fine-tune the active model on the cases clinicians reviewed, compare it with the
active one behind a safety gate, decide (activate, override with a reason, reject), and the
model decision log with roll back."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from bus_core.clinic.cases import CaseStore, display_time
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
from bus_core.data.dataset import class_counts
from bus_core.data.roots import default_split
from bus_core.errors import BusError
from bus_core.metrics import fmt3
from bus_core.models.registry import active_model_path
from bus_core.roles import Identity
from bus_core.settings import default_dataset_dir
from bus_core.training.jobs import current_job, start_training
from bus_core.training.runs import last_event, progress_fraction, progress_text, read_progress
from ui.auth import require_page
from ui.cases import case_store
from ui.common import md_escape, show_error, start_job
from ui.data_inputs import resolve_path, resolve_source
from ui.decisions import ACTION_LABELS, decisions_table

who = require_page("retrain")

POLL_S = 3


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
                       key="retrain_gate_activate"):
            decide(activate_if_passed, result=result, candidate_path=plan.model_dir,
                   who=who)
    else:
        reason = left.text_input("Reason for overriding the gate (required)",
                                 key="retrain_gate_reason")
        if left.button("Override and activate", icon=":material/gpp_maybe:",
                       disabled=not reason.strip(), key="retrain_gate_override"):
            decide(activate_if_passed, result=result, candidate_path=plan.model_dir,
                   override_reason=reason, who=who)
    if right.button("Keep the current model", icon=":material/block:", key="retrain_gate_reject"):
        decide(reject, result=result, candidate_path=plan.model_dir, who=who)


def gate_view(plan: RetrainPlan, who: Identity, log: list[dict[str, Any]]) -> None:
    """The comparison of a finished model with the active one, and the decision."""
    done = decision_for(plan.model_dir, log)
    result = GateResult.load(plan.model_dir / GATE_FILE) if done else current_result(plan.model_dir)
    if result is None:
        st.info("Fine-tuning finished. Compare the new model with the active one before it "
                "can be used.", icon=":material/check_circle:")
        if st.button("Compare with the active model", type="primary",
                     icon=":material/balance:", key="retrain_gate_run"):
            run_gate(plan)
        return
    st.dataframe(gate_rows(result), hide_index=True, width="stretch", key="retrain_gate_table")
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
                   icon=":material/play_arrow:", key="retrain_resume"):
        start(plan, who, resume=status != "not started")


def retrain_settings(store: CaseStore, who: Identity) -> None:
    """Base data, split and a few settings; Start."""
    dataset = default_dataset_dir()
    c1, c2 = st.columns(2)
    base_data = c1.text_input("Original training data", str(dataset or ""),
                              key="retrain_data", help="The folder or CSV manifest the active "
                                                         "model was trained on.")
    base_split = c2.text_input("Its split file (the fixed test subset is taken from it)",
                               str(default_split()), key="retrain_split")
    c3, c4, c5 = st.columns(3)
    epochs = c3.number_input("Epochs", 1, 100, 5, key="retrain_epochs")
    share = c4.slider("Held-out share of new cases", 0.1, 0.5, 0.2, 0.05, key="retrain_share")
    name = c5.text_input("New model name", dt.datetime.now().strftime("retrain-%Y%m%d-%H%M"),
                         key="retrain_name")
    ready = bool(base_data.strip() and base_split.strip() and active_model_path())
    if st.button("Start fine-tuning on the reviewed cases", type="primary",
                 icon=":material/model_training:", disabled=not ready, key="retrain_start"):
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
    decisions_table(log, "retrain_decisions")
    targets = earlier_models(log)
    if not targets:
        return
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    target = left.selectbox("Roll back to an earlier model", targets, format_func=lambda p: p.name,
                            key="retrain_rollback_target")
    if right.button("Roll back", icon=":material/undo:", key="retrain_rollback",
                    disabled=not who.can("manage_models"),
                    help=None if who.can("manage_models") else "Administrators only."):
        decide(rollback, to_path=target, who=who)


def retrain_tab(store: CaseStore, who: Identity) -> None:
    """Fine-tune the active model on the reviewed cases, gate it, decide; decision log."""
    confirmed = store.confirmed_cases()
    counts = class_counts(confirmed)
    if confirmed:
        st.markdown(f"**{len(confirmed)} reviewed cases** can be used: "
                    + ", ".join(f"{n} {label}" for label, n in counts.items()) + ".")
    else:
        st.info("No reviewed cases yet: once clinicians confirm or correct cases on the Review "
                "cases page, the active model can be fine-tuned on them here.",
                icon=":material/info:")
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


st.title("Retrain on reviewed cases")
store = case_store()
if store is None:
    st.stop()
retrain_tab(store, who)
