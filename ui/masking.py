"""The lesion-mask panel of a case: no mask, the outline the segmentation model suggests
(accepted, edited on the canvas, or discarded), a mask painted in the browser, or mask files;
their combination; and a preview of the masked crop. The mask logic is bus_core.data.masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st

from bus_core.data.inputs import InputSpec, model_input
from bus_core.data.masks import (
    COMBINE_MODES,
    combination_note,
    combine_masks,
    masked_input,
)
from bus_core.errors import BusError
from bus_core.inference.outline import Segmenter
from bus_core.inference.report import LESION_COLOUR, outlined
from ui.common import md_escape, show_error
from ui.state import digest, memo
from ui.uploads import MASK_TYPES, read_masks

NO_MASK, SUGGEST, PAINT, UPLOAD, DATASET = ("No mask", "Suggest outline", "Paint", "Upload",
                                            "Dataset masks")
MASK_SOURCES: tuple[str, ...] = (NO_MASK, PAINT, UPLOAD)
ORIGINS = {PAINT: "painted", UPLOAD: "uploaded", DATASET: "dataset"}
"""The case store's mask source (`bus_core.clinic.cases.MASK_SOURCES`) of each panel choice."""
ACCEPT, EDIT, DISCARD = "Accept", "Edit", "Discard"
SUGGESTED_COLOUR = (0, 200, 255)


@dataclass(frozen=True)
class MaskChoice:
    """The user's lesion mask for one image (None when there is none), the panel choice that
    made it, and its origin for the case store ('painted', 'suggested, edited', ...)."""

    mask: np.ndarray | None
    source: str
    key: str = ""
    origin: str | None = None


def _combine(image: np.ndarray, masks: list[np.ndarray], spec: InputSpec,
             key: str) -> np.ndarray | None:
    """One mask from several (the combine mode is asked for when there are several), or None
    after showing why the combination cannot be used."""
    mode = spec.combine
    if len(masks) > 1:
        mode = st.radio("Combine masks", COMBINE_MODES, index=list(COMBINE_MODES).index(mode)
                        if mode in COMBINE_MODES else 0, horizontal=True,
                        key=f"combine_{key}",
                        help="Intersection keeps what every mask marks; weighted keeps what "
                             "enough masks mark (the union when that is empty); union keeps "
                             "what any mask marks.")
    try:
        combined = combine_masks(masks, mode=mode, threshold=spec.threshold)
        note = combination_note(masks, mode, spec.threshold)
        if note:
            st.caption(note)
        if not combined.any():  # masked_input says why: nothing marked, or no overlap
            masked_input(image, masks, mode=mode, threshold=spec.threshold)
        return combined
    except BusError as exc:
        show_error(exc)
        return None


def _uploaded_masks(image: np.ndarray, key: str) -> list[np.ndarray]:
    files = st.file_uploader("Mask files", type=MASK_TYPES, accept_multiple_files=True,
                             key=f"mask_files_{key}",
                             help="White (non-zero) pixels mark the lesion. A mask must have "
                                  "the size or the shape of its image.")
    masks, errors, warnings = read_masks(files or [], image.shape[:2])
    for error in errors:
        show_error(error)
    for warning in warnings:
        st.warning(md_escape(warning), icon=":material/content_copy:")
    return masks


def _painted_masks(image: np.ndarray, key: str) -> list[np.ndarray]:
    from ui.canvas import paint_mask  # the canvas component loads only when it is used

    painted = paint_mask(image, key)
    return [] if painted is None else [painted]


def canvas_shown(key: str) -> bool:
    """True when the mask panel of image `key` shows the painting canvas (painting, or editing
    the suggested outline), as chosen by the user's last click."""
    source = st.session_state.get(f"mask_source_{key}")
    return source == PAINT or (source == SUGGEST
                               and st.session_state.get(f"suggest_action_{key}") == EDIT)


def suggested_mask(segmenter: Segmenter, image: np.ndarray, key: str) -> np.ndarray:
    """The segmenter's outline of an image (HxW bool, all False when it finds no lesion),
    computed once per image and segmentation model in this session."""
    return memo("suggested", (key, segmenter.card.weights_sha256),
                lambda: segmenter.segment(image), max_entries=16)


def _suggestion(image: np.ndarray, key: str, segmenter: Segmenter
                ) -> tuple[list[np.ndarray], str | None, bool]:
    """The suggested outline as accepted, edited or discarded: (masks, origin, whether the
    canvas already shows the image). An edit is kept: Accept then uses the edited outline, and
    Edit again starts from it."""
    suggested = suggested_mask(segmenter, image, key)
    if not suggested.any():
        st.info(f"No lesion found: the outline model ({md_escape(segmenter.card.name)}) marks "
                "nothing on this image. If you see a lesion, paint it yourself.",
                icon=":material/search_off:")
        return [], None, False
    action = st.segmented_control(
        "Suggested outline (automatic)", (ACCEPT, EDIT, DISCARD), default=ACCEPT, required=True,
        key=f"suggest_action_{key}", wrap=True,
        help="Accept uses the outline (with your edits, if you made any); Edit lets you add to "
             "it (brush, shapes) or remove from it (eraser); Discard drops it.") or ACCEPT
    edited_key, base_key = f"_suggest_edited_{key}", f"_suggest_edit_base_{key}"
    last_key = f"_suggest_last_{key}"
    came_from = st.session_state.get(last_key)
    st.session_state[last_key] = action
    edit: np.ndarray | None = st.session_state.get(edited_key)
    if action == DISCARD:
        return [], None, False
    if action == EDIT:
        from ui.canvas import paint_mask

        if came_from != EDIT or base_key not in st.session_state:  # a new canvas
            st.session_state[base_key] = suggested if edit is None else edit
        base = st.session_state[base_key]
        background = memo("suggest_bg", (key, digest(base)),
                          lambda: outlined(image, base, SUGGESTED_COLOUR), max_entries=8)
        painted = paint_mask(image, f"{key}_edit", base=base, background_image=background)
        edit = np.zeros_like(suggested) if painted is None else painted
        st.session_state[edited_key] = edit
        if not edit.any():
            return [], None, True
        same = bool(np.array_equal(edit, suggested))
        return [edit], "suggested" if same else "suggested, edited", True
    if edit is not None and not np.array_equal(edit, suggested):
        if not edit.any():
            st.info("Your edit removed the whole automatic outline: no outline is used.",
                    icon=":material/ink_eraser:")
            return [], None, False
        st.caption(f"Automatic outline by {md_escape(segmenter.card.name)}, with your edits: "
                   "check that it covers the lesion before you rely on it.")
        return [edit], "suggested, edited", False
    st.caption(f"Automatic outline by {md_escape(segmenter.card.name)}: check that it covers "
               "the lesion before you rely on it.")
    return [suggested], "suggested", False


def mask_panel(image: np.ndarray, spec: InputSpec, key: str,
               dataset_masks: list[np.ndarray] | None = None,
               segmenter: Segmenter | None = None) -> MaskChoice:
    """The mask controls for one image; shows the image (painted on, or outlined) and
    returns the combined mask. `dataset_masks` (a case opened from a dataset) are offered as
    a source of their own and chosen by default; with a `segmenter`, its suggested outline is
    offered too, and chosen by default for models that read a lesion mask."""
    sources = ((NO_MASK,) + ((SUGGEST,) if segmenter else ()) + MASK_SOURCES[1:]
               + ((DATASET,) if dataset_masks else ()))
    default = DATASET if dataset_masks else SUGGEST if segmenter and spec.uses_masks else NO_MASK
    source = st.segmented_control("Lesion mask", sources, default=default, required=True,
                                  key=f"mask_source_{key}", wrap=True) or NO_MASK
    masks: list[np.ndarray] = []
    origin = ORIGINS.get(source)
    on_canvas = source == PAINT
    if source == DATASET and dataset_masks:
        masks = [m for m in dataset_masks if m.any()]
    elif source == SUGGEST and segmenter is not None:
        masks, origin, on_canvas = _suggestion(image, key, segmenter)
    elif source == PAINT:
        masks = _painted_masks(image, key)
    elif source == UPLOAD:
        masks = _uploaded_masks(image, key)
    mask = _combine(image, masks, spec, key) if masks else None
    if not on_canvas:
        colour = SUGGESTED_COLOUR if source == SUGGEST else LESION_COLOUR
        # an unusable combination still shows the masks it was made of (their union)
        drawn = mask if mask is not None else np.any(masks, axis=0) if masks else None
        shown = image if drawn is None else memo(
            "outlined", (key, digest(drawn), colour), lambda: outlined(image, drawn, colour),
            max_entries=16)
        st.image(shown, width="stretch",
                 alt="The image" + (" with the lesion mask outlined" if drawn is not None else ""),
                 caption="Suggested outline (automatic)" if source == SUGGEST and mask is not None
                 else None)
    return MaskChoice(mask, source, digest(mask) if mask is not None else "",
                      origin if mask is not None else None)


def show_crop_preview(image: np.ndarray, choice: MaskChoice, spec: InputSpec) -> None:
    """The crop of the mask (the model's own input for a lesion model, else the masked crop),
    said to be what the model sees only when it is."""
    if choice.mask is None:
        return
    try:
        crop = (model_input(image, [choice.mask], spec) if spec.uses_masks
                else masked_input(image, [choice.mask], mode="union", margin=spec.margin))
    except BusError as exc:
        show_error(exc)
        return
    preview_col, note_col = st.columns([1, 2], vertical_alignment="center")
    context = spec.mode == "lesion-context"
    alt = "The lesion and its surroundings" if context else "The masked lesion crop"
    preview_col.image(crop, width="stretch", alt=alt)
    if context:
        note_col.caption("**Lesion crop**: this is what the model looks at: the box around the "
                         "outline with the tissue around it (only the box matters, not the "
                         "outline's exact shape).")
    elif spec.uses_masks:
        note_col.caption("**Masked crop**: this is what the model looks at.")
    else:
        note_col.caption("**Masked crop** (preview only): this model looks at the whole "
                         "image; the mask is drawn for reference and does not change the "
                         "prediction.")
