"""Evaluate: score one or more registered models on labelled data (optionally one subset of a
split file): metrics, confusion matrix, ROC, calibration, and the misclassified cases with their
Grad-CAM; export the figures; compare models side by side."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from bus_core.data.dataset import Record, load_many
from bus_core.data.images import load_image
from bus_core.data.roots import is_allowed
from bus_core.data.splits import SUBSETS, load_split, split_records
from bus_core.errors import BusError
from bus_core.evaluation.evaluate import (
    EXPERT,
    OUTLINE_POLICIES,
    SERVED,
    Evaluation,
    evaluate,
    reads_outlines,
    with_policy_outlines,
)
from bus_core.inference.cam import overlay
from bus_core.inference.predict import explain_record
from bus_core.metrics import reliability_curve, roc_curves
from bus_core.models.registry import ModelEntry, active_model_path, list_models, no_model_message
from bus_core.settings import default_dataset_dir
from ui.auth import may_open, require_page
from ui.common import load_predictor, md_escape, show_error
from ui.comparison import architecture_comparison
from ui.data_inputs import data_summary, matching_split, resolve_path, sources_from_text
from ui.evaluation import (
    comparison_csv,
    comparison_table,
    confusion_figure,
    evaluation_json,
    interval_note,
    metrics_csv,
    metrics_table,
    per_class_table,
    reliability_figure,
    roc_figure,
    source_table,
)
from ui.state import memo

WHO = require_page("evaluate")

THUMB_PX = 256
PAGE_SIZE = 12
CHART_CONFIG = {"displayModeBar": False}
COMPARISON_VIEW = "Architecture comparison runs"


@dataclass(frozen=True)
class Result:
    """One model's evaluation with the records it covered (by id)."""

    label: str
    path: str
    weights_sha256: str
    evaluation: Evaluation
    records: dict[str, Record]


def model_labels(entries: list[ModelEntry]) -> dict[str, str]:
    """Model folder -> a unique display name (card name, and the folder when names repeat)."""
    names = [e.card.name for e in entries]
    return {str(e.path): e.card.name if names.count(e.card.name) == 1
            else f"{e.card.name} ({e.path.parent.name}/{e.path.name})" for e in entries}


def default_split(models: list[ModelEntry], sources: list[str]) -> str:
    """The split file the first chosen model was trained with, if it is allowed, still exists
    and covers these data; else the split named after the data folder; else ''."""
    file = (models[0].card.split or {}).get("file") if models else None
    if file and is_allowed(file) and Path(file).is_file() and \
            list((models[0].card.training_data or {}).get("sources") or []) == sources:
        return file
    return matching_split(sources)


def choose_models(entries: list[ModelEntry], labels: dict[str, str]) -> list[ModelEntry]:
    """The multiselect of models (default: the active one)."""
    active = active_model_path()
    paths = [str(e.path) for e in entries]
    default = [p for p in paths if active is not None and Path(p).resolve() == active.resolve()]
    chosen = st.multiselect("Models", paths, default=default or paths[:1], format_func=labels.get,
                            key="eval_models",
                            help="Choose two or more to compare them on the same images.")
    return [e for e in entries if str(e.path) in chosen]


def choose_data(models: list[ModelEntry]) -> tuple[list[str], str, str]:
    """Data sources, split file ('' for none) and subset; no sources after showing why typed
    paths cannot be used."""
    default = default_dataset_dir()
    data_col, split_col, subset_col = st.columns([3, 3, 1])
    text = data_col.text_area("Data: folders or CSV manifests, one per line",
                              value=str(default) if default else "", key="eval_data", height=80)
    try:
        sources = sources_from_text(text)
    except BusError as exc:
        show_error(exc)
        sources = []
    split = split_col.text_input("Split file (optional)",
                                 value=default_split(models, sources), key="eval_split",
                                 help="Evaluate one subset of a split; the test subset of the "
                                      "split a model was trained with gives honest figures.")
    subset = subset_col.selectbox("Subset", SUBSETS, index=SUBSETS.index("test"),
                                  key="eval_subset", disabled=not split.strip())
    if sources:
        try:
            data_col.caption(data_summary(tuple(sources)))
        except BusError as exc:
            show_error(exc)
    try:
        return sources, resolve_path(split) if split.strip() else "", subset
    except BusError as exc:
        show_error(exc)
        return [], "", subset


def choose_outlines(models: list[ModelEntry]) -> str:
    """The outline policy (`bus_core.evaluation.evaluate.OUTLINE_POLICIES`) for models that read a
    lesion outline: the reading clinicians get by default, the data's expert outlines as an
    option."""
    if not any(reads_outlines(m.card) for m in models):
        return SERVED
    return st.radio("Lesion outlines", list(OUTLINE_POLICIES), horizontal=True,
                    format_func=lambda k: ("Suggested, as clinicians get the reading (default)"
                                           if k == SERVED else "The data's expert outlines"),
                    key="eval_outlines",
                    help="For models that read the lesion outline: score them on the outlines "
                         "the outline model suggests (what Diagnose shows), or on the outlines "
                         "drawn by the data set's experts.") or SERVED


def load_data(sources: list[str], split: str, subset: str) -> tuple[list[Record], dict]:
    """The records to evaluate and their description (sources, split file, subset, hash)."""
    records = load_many(sources)
    if not split:
        return records, {"sources": sources, "subset": "all", "n": len(records)}
    chosen = load_split(split)
    wanted = split_records(records, chosen, subset)
    return wanted, {"sources": sources, "split_file": split, "subset": subset,
                    "data_hash": chosen.data_hash, "n": len(wanted)}


def run_evaluations(models: list[ModelEntry], labels: dict[str, str], sources: list[str],
                    split: str, subset: str, outlines: str) -> list[Result]:
    """Each model's evaluation under the outline policy `outlines`, computed once per (model
    version, data, policy) in this session."""
    cache: dict[tuple, Result] = st.session_state.setdefault("eval_cache", {})
    records, data = load_data(sources, split, subset)
    if not records:
        raise BusError("There are no images to evaluate in this data / subset.")
    results = []
    for entry in models:
        key = (str(entry.path), entry.card.weights_sha256, tuple(sources), split, subset,
               outlines)
        if key not in cache:
            with st.spinner(f"Evaluating {md_escape(labels[str(entry.path)])} on "
                            f"{len(records)} images…"):
                predictor = load_predictor(str(entry.path.resolve()), entry.card.weights_sha256)
                scored, masks = with_policy_outlines(predictor.loaded, records, outlines)
                evaluation = evaluate(predictor.loaded, scored, device=predictor.device,
                                      data={**data, "masks": masks} if masks else data)
            cache[key] = Result(labels[str(entry.path)], str(entry.path),
                                entry.card.weights_sha256, evaluation,
                                {r.id: r for r in scored})
        results.append(cache[key])
    return results


def describe(result: Result) -> str:
    """Which images the figures come from."""
    data = result.evaluation.metrics.get("data") or {}
    where = ", ".join(Path(s).name for s in data.get("sources", []))
    text = f"{data.get('n')} images from {md_escape(where)}"
    if data.get("split_file"):
        text += (f" · {data['subset']} subset of {md_escape(Path(data['split_file']).name)} "
                 f"(data hash {str(data.get('data_hash'))[:12]})")
    policy = {"automatic": SERVED, "expert": EXPERT}.get(data.get("masks", ""))
    if policy:
        text += f" · lesion outlines {OUTLINE_POLICIES[policy]}"
    contradicted = result.evaluation.metrics.get("outlined_but_normal")
    if contradicted:
        text += (f" · {contradicted} images with a lesion outline were read as normal "
                 "(flagged uncertain in Diagnose)")
    reading = result.evaluation.metrics.get("reading")
    if reading:
        return text + f" · two-stage reading: {md_escape(reading)}"
    return text + f" · temperature {result.evaluation.metrics.get('temperature', 1.0):.3f}"


def metrics_tab(result: Result) -> None:
    """Headline and per-class tables; JSON / CSV export."""
    left, right = st.columns([2, 3])
    left.dataframe(metrics_table(result.evaluation.metrics), hide_index=True, width="stretch")
    right.dataframe(per_class_table(result.evaluation.metrics), hide_index=True,
                    width="stretch")
    right.caption("Sensitivity = recall of the class; specificity = how often other classes "
                  "are not called this class; AUC is one-vs-rest.")
    left.caption(interval_note(result.evaluation.metrics))
    sources = source_table(result.evaluation.metrics)
    if not sources.empty:
        st.markdown("##### By data source")
        st.dataframe(sources, hide_index=True, width="stretch")
    stem = f"evaluation-{result.label}".replace(" ", "_").replace("/", "_")
    c1, c2, _ = st.columns([1, 1, 3])
    c1.download_button("Metrics (JSON)", evaluation_json(result.evaluation),
                       file_name=f"{stem}.json", mime="application/json",
                       icon=":material/download:", on_click="ignore", key="eval_json")
    c2.download_button("Metrics (CSV)", metrics_csv(result.evaluation.metrics),
                       file_name=f"{stem}.csv", mime="text/csv", icon=":material/download:",
                       on_click="ignore", key="eval_csv")


def thumbnail(record: Record) -> np.ndarray:
    """A small copy of a record's image (for the gallery)."""
    def make() -> np.ndarray:
        image = Image.fromarray(load_image(record.path))
        image.thumbnail((THUMB_PX, THUMB_PX))
        return np.asarray(image)

    return memo("eval_thumb", str(record.path), make, max_entries=64)


def cam_view(result: Result, record: Record, predicted: str) -> np.ndarray:
    """Grad-CAM of the predicted class over exactly the input the evaluation gave the model
    (for mask models: the masked crop, or the leak-free crop of a lesion-free image)."""
    predictor = load_predictor(str(Path(result.path).resolve()), result.weights_sha256)

    def make() -> np.ndarray:
        row = result.evaluation.probs[result.evaluation.ids.index(record.id)]
        seen, cam = explain_record(predictor, record, row, predicted)
        return overlay(seen, cam, 0.45)

    return memo("eval_cam", (result.weights_sha256, record.id, predicted), make, max_entries=48)


def open_in_diagnose(record: Record) -> None:
    """Hand a case to the Diagnose page."""
    st.session_state["diagnose_path"] = str(record.path)
    st.session_state["diagnose_masks"] = [str(m) for m in record.masks]
    st.switch_page("pages/diagnose.py")


def case_card(result: Result, index: int, case: tuple[str, str, str, float],
              show_cam: bool) -> None:
    """One misclassified image: thumbnail or Grad-CAM, true / predicted class, Open button."""
    record_id, true, predicted, probability = case
    record = result.records[record_id]
    with st.container(border=True):
        try:
            if show_cam:
                st.image(cam_view(result, record, predicted), width="stretch",
                         alt=f"Grad-CAM of {record.id} for the class {predicted}")
            else:
                st.image(thumbnail(record), width="stretch", alt=f"Image {record.id}")
        except BusError as exc:
            show_error(exc)
        st.markdown(f"True **{true}** · predicted **{predicted}** ({probability:.0%})")
        st.caption(md_escape(record_id))
        if may_open(WHO, "diagnose") and st.button("Open in Diagnose",
                                                    icon=":material/stethoscope:",
                                                    key=f"eval_open_{index}"):
            open_in_diagnose(record)


def errors_tab(result: Result) -> None:
    """The misclassified cases as a gallery; Grad-CAM on demand."""
    cases = result.evaluation.misclassified()
    n = len(result.evaluation.ids)
    if not cases:
        st.success(f"All {n} images are classified correctly.", icon=":material/check_circle:")
        return
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    left.caption(f"{len(cases)} of {n} images are misclassified, most confident errors first.")
    show_cam = right.toggle("Show Grad-CAM of the predicted class", key="eval_cam")
    cases = sorted(cases, key=lambda c: -c[3])
    shown = st.session_state.get("eval_shown", PAGE_SIZE)
    with st.spinner("Computing the explanations…") if show_cam else contextlib.nullcontext():
        columns = st.columns(4)
        for i, case in enumerate(cases[:shown]):
            with columns[i % 4]:
                case_card(result, i, case, show_cam)
    if shown < len(cases) and st.button(f"Show {min(PAGE_SIZE, len(cases) - shown)} more",
                                        key="eval_more"):
        st.session_state["eval_shown"] = shown + PAGE_SIZE
        st.rerun()


def details(result: Result) -> None:
    """Tabs of one model's evaluation."""
    st.caption(describe(result))
    evaluation = result.evaluation
    tabs = st.tabs(["Metrics", "Confusion matrix", "ROC curves", "Calibration", "Misclassified"])
    with tabs[0]:
        metrics_tab(result)
    with tabs[1]:
        normalise = st.toggle("As fractions of each true class", key="eval_cm_norm")
        st.plotly_chart(confusion_figure(evaluation.metrics, normalise), config=CHART_CONFIG)
    with tabs[2]:
        curves = roc_curves(evaluation.y_true, evaluation.probs, evaluation.classes)
        if curves:
            st.plotly_chart(roc_figure(curves), config=CHART_CONFIG)
        else:
            st.info("ROC curves need images of at least two classes.")
    with tabs[3]:
        curve = reliability_curve(evaluation.y_true, evaluation.probs, n_bins=10)
        st.plotly_chart(reliability_figure(curve, evaluation.metrics.get("ece")),
                        config=CHART_CONFIG)
        st.caption("Bars on the diagonal mean the stated confidence matches the accuracy. The "
                   "probabilities are temperature-scaled as in the model card.")
    with tabs[4]:
        errors_tab(result)


def comparison(results: list[Result]) -> None:
    """Headline metrics of every evaluated model, one column each."""
    st.markdown("#### Comparison")
    table = comparison_table({r.label: r.evaluation.metrics for r in results})
    st.dataframe(table, width="stretch")
    st.download_button("Comparison (CSV)", comparison_csv(table), file_name="comparison.csv",
                       mime="text/csv", icon=":material/download:", on_click="ignore",
                       key="eval_compare_csv")


st.title("Evaluate")
if st.radio("View", ("Models on data", COMPARISON_VIEW), horizontal=True, key="eval_view",
            label_visibility="collapsed") == COMPARISON_VIEW:
    architecture_comparison(CHART_CONFIG)
    st.stop()
st.caption("Score models on labelled images, ideally the test subset of the split they were "
           "trained with. Evaluation runs here; about 100 images take 10–30 s on a CPU.")

entries = list_models(task="classification")
st.caption("Outline (segmentation) models are scored outside the app, with the evaluate "
           "command the README describes.")
if not entries:
    st.warning(no_model_message(), icon=":material/warning:")
    st.stop()
labels = model_labels(entries)
models = choose_models(entries, labels)
sources, split, subset = choose_data(models)
outlines = choose_outlines(models)

if st.button("Evaluate", type="primary", icon=":material/analytics:",
             disabled=not models or not sources, key="eval_run"):
    try:
        st.session_state["eval_current"] = run_evaluations(models, labels, sources, split,
                                                           subset, outlines)
        st.session_state["eval_shown"] = PAGE_SIZE
    except BusError as exc:
        show_error(exc, "Evaluation failed")

current: list[Result] = st.session_state.get("eval_current", [])
if current:
    st.divider()
    if len(current) > 1:
        comparison(current)
        chosen = st.selectbox("Details for", range(len(current)),
                              format_func=lambda i: current[i].label, key="eval_detail")
        details(current[chosen])
    else:
        st.markdown(f"#### {md_escape(current[0].label)}")
        details(current[0])
