"""Showing a prediction and its Grad-CAM, with per-session caches so reruns are instant."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from bus_core.inference.cam import CAM_LABELS, colour_scale, overlay
from bus_core.inference.predict import Prediction, Predictor
from bus_core.metrics import percent_pair
from ui.charts import probability_chart
from ui.state import memo


def model_key(predictor: Predictor) -> tuple[str, str]:
    """Identifies a model version in cache keys."""
    return predictor.card.name, predictor.card.weights_sha256


def predict_cached(predictor: Predictor, key: Hashable, image: np.ndarray,
                   masks: Sequence[np.ndarray] = ()) -> Prediction:
    """`predictor.predict(image, masks)`, computed once (with a spinner) per (model, key) in
    this session; `key` must identify the image and the masks. The page's mask panel owns the
    outline, so a two-stage predictor does not suggest one itself: without masks it reads the
    whole image. Raises what `predict` raises."""
    def compute() -> Prediction:
        with st.spinner("Reading the image…"):
            return predictor.predict(image, masks, suggest=False)

    return memo("prediction", (model_key(predictor), key), compute, max_entries=24)


def cam_cached(predictor: Predictor, key: Hashable, prediction: Prediction, target: str,
               method: str) -> np.ndarray:
    """The CAM of `prediction` for class `target`, computed once (with a spinner) per (model,
    key, target, method) in this session."""
    def compute() -> np.ndarray:
        with st.spinner("Computing the explanation…"):
            return predictor.explain(prediction, target, method)

    return memo("cam", (model_key(predictor), key, target, method), compute, max_entries=48)


def show_prediction(prediction: Prediction, threshold: float, key: str) -> None:
    """The predicted class (or 'Uncertain'), the probability chart and any scope warnings."""
    top = prediction.probabilities[prediction.label]
    if prediction.uncertain:
        shown, limit = percent_pair(top, threshold)
        st.metric("Model's reading", "Uncertain")
        st.caption(f"Leans **{prediction.label}** ({shown}), below this model's certainty "
                   f"threshold of {limit}: read it as no answer.")
    else:
        st.metric("Model's reading", prediction.label.capitalize())
        st.caption(f"{top:.0%} calibrated probability")
    st.plotly_chart(probability_chart(prediction.probabilities, prediction.label, threshold,
                                      prediction.malignant_threshold),
                    config={"displayModeBar": False, "staticPlot": True}, key=f"chart_{key}")
    if prediction.malignant_flag:
        st.error(prediction.flag_sentence(), icon=":material/flag:")
    for warning in prediction.warnings:
        st.warning(warning, icon=":material/warning:")


@dataclass(frozen=True)
class Explanation:
    """A CAM overlay as shown: the blended image, the class it explains, the method id
    (`cam.CAM_LABELS`) and the opacity."""

    overlay: np.ndarray
    target: str
    method: str
    opacity: float


def _controls(prediction: Prediction, classes: Sequence[str], key: str) -> tuple[str, str, float]:
    """Widgets for the class to explain, the CAM method and the overlay opacity."""
    target = st.selectbox("Explain class", list(classes),
                          index=list(classes).index(prediction.label),
                          format_func=str.capitalize, key=f"target_{key}")
    method = st.segmented_control("Method", list(CAM_LABELS), format_func=CAM_LABELS.__getitem__,
                                  default="gradcam", required=True,
                                  key=f"method_{key}", wrap=True) or "gradcam"
    opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key=f"opacity_{key}")
    return target, method, opacity


def which_model(prediction: Prediction, target: str) -> str:
    """Which of a two-stage reading's models a map for `target` explains, in plain words."""
    if prediction.explained_by(target) is not prediction:
        return (f"Map of the whole-image model: the chance of '{target}' comes from it, reading "
                "the whole image.")
    return (f"Map of the lesion model: it splits the rest between benign and malignant, "
            f"reading the lesion and its surroundings ('{target}' shown).")


def explanation_section(predictor: Predictor, prediction: Prediction, key: str,
                        cache_key: Hashable) -> tuple[Explanation, DeltaGenerator]:
    """What the model saw beside its Grad-CAM overlay, with the controls in a third column
    (returned, so a page can add to it). `cache_key` identifies the prediction."""
    st.markdown("##### Where the model looked")
    seen_col, cam_col, controls_col = st.columns(3, gap="medium")
    with controls_col:
        target, method, opacity = _controls(prediction, predictor.classes, key)
        st.caption("Warm colours mark the regions that raised the score of the chosen class: "
                   "where the model looked, not why. Maps can highlight artefacts.")
    cam = cam_cached(predictor, cache_key, prediction, target, method)
    basis = prediction.explained_by(target)
    shown = Explanation(overlay(basis.model_view, cam, opacity), target, method, opacity)
    seen_col.image(basis.model_view, caption="What the model saw", width="stretch",
                   alt="The image as the model received it (resized and padded)")
    cam_col.image(shown.overlay, caption=f"{CAM_LABELS[method]} for '{target}'", width="stretch",
                  alt=f"{CAM_LABELS[method]} heat map for the class {target} over the image")
    if prediction.whole is not None:
        cam_col.caption(which_model(prediction, target))
    cam_col.image(colour_scale(), width="stretch", caption="low ← influence on the score → high",
                  alt="Colour scale of the map: blue is low influence, red is high")
    return shown, controls_col
