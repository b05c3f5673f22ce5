"""Teaching: read a random labelled case, commit to a class, then see the truth, the lesion
outline, the model's reading and its Grad-CAM; the learner's and the model's scores are kept
(in the page address too, so a reload keeps them). Cases come from the test subset of the
dataset's split by default: images the released model was not trained on."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import streamlit as st

from bus_core.clinic.teaching import TeachingSession
from bus_core.constants import CLASSES
from bus_core.data.dataset import Record, load_records
from bus_core.data.images import load_image, load_mask
from bus_core.data.masks import combine_masks, draw_outline
from bus_core.data.splits import SUBSETS, load_split, split_records
from bus_core.errors import BusError, DataError
from bus_core.inference.outline import Segmenter
from bus_core.inference.predict import Prediction, Predictor
from bus_core.models.unet import dice_iou
from bus_core.settings import default_dataset_dir
from ui.auth import require_page
from ui.common import active_segmenter, md_escape, optional_predictor, show_error
from ui.data_inputs import matching_split, resolve_path, resolve_source
from ui.masking import SUGGESTED_COLOUR, outlined, suggested_mask
from ui.results import explanation_section, predict_cached, show_prediction
from ui.state import memo

require_page("teach")

OUTLINE = (0, 200, 83)
ALL_IMAGES = "all images"
TOKEN_PARAM = "teach"


@st.cache_data(show_spinner="Reading the dataset…", ttl=600, max_entries=4)
def dataset(folder: str, split: str, subset: str) -> list[Record]:
    """The labelled records (the three known classes) of a folder or manifest, or of one
    subset of its split file."""
    records = [r for r in load_records(folder) if r.label in CLASSES]
    if subset == ALL_IMAGES:
        return records
    return split_records(records, load_split(split), subset)


def choose_cases() -> tuple[str, str, str]:
    """(dataset folder, split file, subset) as typed: the default dataset's test subset, or
    what the user chooses."""
    default = default_dataset_dir()
    with st.expander("Cases", expanded=default is None, icon=":material/folder_open:"):
        folder = st.text_input("Dataset folder or CSV manifest", value=str(default or ""),
                               key="teach_folder", placeholder="/path/to/BUSI",
                               help="A BUSI-layout folder (normal/, benign/, malignant/ with "
                                    "_mask files) or a CSV manifest path,label[,mask].").strip()
        split = matching_split([folder]) if folder else ""
        left, right = st.columns(2)
        split = left.text_input("Split file", value=split, key=f"teach_split_{folder}",
                                help="The split the models were trained with: its test subset "
                                     "holds images no model here has seen.").strip()
        subsets = [*reversed(SUBSETS), ALL_IMAGES] if split else [ALL_IMAGES]
        subset = right.selectbox("Cases from", subsets, key=f"teach_subset_{folder}_{split}",
                                 help="test: images the model never saw in training (a fair "
                                      "comparison); train: images it learned from.")
    return folder, split, subset


def describe_cases(folder: str, split: str, subset: str, n_cases: int) -> str:
    """Which cases the session draws from, and what that means for the model's score."""
    name, split_name = md_escape(Path(folder).name or folder), md_escape(Path(split).name)
    if subset == "test":
        return (f"{n_cases} cases: the test subset of {name} ({split_name}), images the "
                "released models were not trained on.")
    if subset == ALL_IMAGES:
        return (f"{n_cases} cases: every image of {name}, including images the model was "
                "trained on, so its score there is optimistic.")
    return (f"{n_cases} cases: the {subset} subset of {name} ({split_name}); the model "
            "was " + ("trained on these images, so its score is optimistic." if subset == "train"
                      else "tuned on these images, so its score is slightly optimistic."))


def session_for(source: str, n_cases: int) -> TeachingSession:
    """This browser session's teaching state: kept while the cases stay the same, restored
    from the page address after a reload, else new."""
    session = st.session_state.get("teach")
    if session is None or session.source != source or len(session.order) != n_cases:
        token = st.query_params.get(TOKEN_PARAM, "")
        session = TeachingSession.from_token(source, n_cases, token) or \
            TeachingSession.new(source, n_cases)
        st.session_state["teach"] = session
    return session


def lesion(record: Record, shape: tuple[int, int]) -> np.ndarray | None:
    """The union of a record's lesion masks, or None for a case without a lesion."""
    masks = [load_mask(p, shape=shape) for p in record.masks]
    masks = [m for m in masks if m.any()]
    return combine_masks(masks, mode="union") if masks else None


def case_lesion(record: Record, image: np.ndarray) -> np.ndarray | None:
    """The case's lesion outline (`lesion`), read from its mask files once per case."""
    return memo("teach_lesion", record.id, lambda: lesion(record, image.shape[:2]),
                max_entries=8)


def model_reading(predictor: Predictor, record: Record, image: np.ndarray) -> Prediction:
    """The model's prediction for a case, given the case's lesion outline."""
    mask = case_lesion(record, image)
    return predict_cached(predictor, ("teach", record.id), image, [] if mask is None else [mask])


def check(session: TeachingSession, record: Record, image: np.ndarray,
          predictor: Predictor | None) -> None:
    """Button callback: score the learner's answer and the model's reading."""
    answer = st.session_state.get(f"teach_answer_{session.position}")
    if answer is None:
        return
    label, uncertain = None, False
    if predictor is not None:
        try:
            reading = model_reading(predictor, record, image)
            label, uncertain = reading.label, reading.uncertain
        except BusError as exc:  # the learner is scored; the model has no answer for this case
            logging.getLogger("bus_core.ui.teach").warning("No model reading of %s: %s",
                                                           record.id, exc)
    session.check(answer, record.label, label, model_uncertain=uncertain)


def scoreboard(session: TeachingSession, has_model: bool) -> None:
    """The learner's and the model's running scores on the same cases."""
    you, model, case_no = st.columns(3)
    you.metric("Your score", str(session.learner))
    model.metric("Model's score", str(session.model) if has_model else "–",
                 help="The active model on the cases you answered; an uncertain reading is "
                      "no answer, so it does not count as right.")
    case_no.metric("Case", f"{session.position + 1} of {len(session.order)}")


def verdict(session: TeachingSession, record: Record) -> None:
    """The truth and whether the learner found it."""
    if session.answer == record.label:
        st.success(f"Correct: this case is **{record.label}**.", icon=":material/check_circle:")
    else:
        st.error(f"You said {session.answer}; this case is **{record.label}**.",
                 icon=":material/cancel:")
    st.caption(f"Case {md_escape(record.id)}")


def reveal_model(predictor: Predictor, record: Record, image: np.ndarray,
                 key: str) -> Prediction | None:
    """The model's reading of the case, or None after saying why there is none."""
    try:
        prediction = model_reading(predictor, record, image)
    except BusError as exc:
        show_error(exc, "The model cannot read this case")
        return None
    show_prediction(prediction, predictor.card.uncertain_below, key)
    if prediction.uncertain:
        st.caption("The model is uncertain: no answer, scored as not right.")
    else:
        right = prediction.label == record.label
        st.caption(f"The model's top class, {prediction.label}, is "
                   f"{'right' if right else 'wrong'} for this case.")
    return prediction


def compare_outlines(image: np.ndarray, expert_view: np.ndarray, expert: np.ndarray | None,
                     segmenter: Segmenter, record: Record) -> None:
    """The dataset's outline beside the one the segmentation model suggests, with their Dice."""
    try:
        suggested = suggested_mask(segmenter, image, f"teach_{record.id}")
    except BusError as exc:
        show_error(exc, "No outline can be suggested")
        st.image(expert_view, width="stretch", alt="The teaching case")
        return
    own, auto = st.columns(2)
    own.image(expert_view, width="stretch", alt="The case with the dataset's lesion outline",
              caption="Dataset outline (green)" if expert is not None
              else "Dataset: no lesion marked")
    auto.image(outlined(image, suggested, SUGGESTED_COLOUR) if suggested.any() else image,
               width="stretch", alt="The case with the automatically suggested outline",
               caption=f"Suggested outline (automatic, {md_escape(segmenter.card.name)})"
               if suggested.any() else "Suggested outline: no lesion found")
    if expert is not None and suggested.any():
        st.caption(f"Overlap of the two outlines (Dice): {dice_iou(suggested, expert)[0]:.2f}")


def show_case(session: TeachingSession, record: Record, predictor: Predictor | None,
              model_note: str) -> None:
    """The case, the answer controls, and after checking the truth and the model."""
    try:
        image = memo("teach_image", record.id, lambda: load_image(record.path), max_entries=8)
        mask = case_lesion(record, image) if session.revealed else None
    except BusError as exc:
        show_error(exc, "This case cannot be shown")
        st.button("Next case", on_click=session.next_case, key="teach_skip")
        return
    key = f"teach_{session.position}"
    left, right = st.columns([3, 2], gap="large")
    with left:
        shown = image if mask is None else memo(
            "teach_outline", record.id, lambda: draw_outline(image, mask, color=OUTLINE,
                                                             thickness=3), max_entries=8)
        segmenter, _ = active_segmenter() if session.revealed else (None, "")
        if segmenter is None:
            st.image(shown, width="stretch", alt="The teaching case" + (
                " with the dataset's lesion outline" if mask is not None else ""))
            if session.revealed:
                st.caption("Green: the lesion outline of the dataset." if mask is not None
                           else "No lesion is marked in this case.")
        else:
            compare_outlines(image, shown, mask, segmenter, record)
    prediction = None
    with right:
        if not session.revealed:
            st.radio("Your reading", CLASSES, index=None, format_func=str.capitalize,
                     key=f"teach_answer_{session.position}")
            st.button("Check", type="primary", on_click=check, key=f"teach_check_{key}",
                      args=(session, record, image, predictor),
                      disabled=st.session_state.get(f"teach_answer_{session.position}") is None)
        else:
            verdict(session, record)
            if predictor is not None:
                prediction = reveal_model(predictor, record, image, key)
            else:
                st.caption(model_note)
            st.button("Next case", type="primary", on_click=session.next_case,
                      key=f"teach_next_{key}", icon=":material/arrow_forward:")
    if prediction is not None:
        explanation_section(predictor, prediction, key, ("teach", record.id))


st.title("Teaching")
st.caption("Read each case as you would in clinic and commit to an answer; then compare it with "
           "the dataset's label, the lesion outline and the model's reading.")

folder, split_file, subset = choose_cases()
if not folder:
    st.info("Enter the folder of a labelled dataset (for example BUSI) to start.",
            icon=":material/info:")
    st.stop()
try:
    folder, split_file = resolve_source(folder), resolve_path(split_file) if split_file else ""
except BusError as exc:
    show_error(exc)
    st.stop()
try:
    records = dataset(folder, split_file, subset)
except DataError as exc:
    if subset == ALL_IMAGES:
        show_error(exc)
        st.stop()
    st.warning(f"The split file cannot be used with this dataset: {md_escape(exc)} The cases "
               "come from all its images.", icon=":material/warning:")
    subset = ALL_IMAGES
    try:
        records = dataset(folder, split_file, subset)
    except DataError as exc:
        show_error(exc)
        st.stop()
if not records:
    st.warning("These cases hold no image labelled normal, benign or malignant.")
    st.stop()

st.caption(describe_cases(folder, split_file, subset, len(records)))
teach_predictor, no_model_note = optional_predictor()
teaching = session_for(f"{folder}|{split_file}|{subset}", len(records))
scoreboard(teaching, teach_predictor is not None)
show_case(teaching, records[teaching.current], teach_predictor, no_model_note)
st.query_params[TOKEN_PARAM] = teaching.token()
