"""Painting a lesion mask on the image in the browser (streamlit-drawable-canvas).

Compatibility with Streamlit 1.67: streamlit-drawable-canvas 0.13 is a Components-v2 component
that sends its background image as a data URL it encodes itself, so it no longer calls
`streamlit.elements.image.image_to_url` (removed from newer Streamlit); no shim is needed.
Its assets are registered when the Streamlit runtime (or AppTest) starts, so the package is
imported here, inside the functions, and never at import time of a page.
The 0.13 drawing modes are freedraw, polygon, rect, circle, line, point, text and
labeled_rect; moving / resizing / deleting shapes (the old "transform" mode) is the edit toggle
of the canvas toolbar, which also has undo, redo and reset.
"""

from __future__ import annotations

import numpy as np
import streamlit as st
from PIL import Image

from bus_core.data.canvas import strokes_to_mask
from bus_core.data.images import image_to_png_bytes
from ui.state import digest, memo

CANVAS_WIDTHS: dict[str, int | None] = {"Fit": None, "Small": 440, "Large": 760}
"""Canvas widths to choose from: "Fit" (the default) is the width the page has for it in this
browser window, measured once; Small and Large are fixed."""
FIT_LIMITS = (280, 900)
"""The narrowest and widest "Fit" canvas, in px."""
_MEASURE_JS = """
export default function(component) {
  const { setStateValue, parentElement } = component;
  const host = parentElement.host ?? parentElement;
  const width = Math.floor(host.getBoundingClientRect().width);
  if (width > 0) setStateValue("width", width);
}
"""
MAX_CANVAS_HEIGHT = 760
TOOLS: dict[str, str] = {"Brush": "freedraw", "Polygon": "polygon", "Rectangle": "rect",
                         "Circle": "circle", "Eraser": "freedraw"}
PAINT, ERASE = "rgba(255, 196, 0, 0.55)", "rgba(255, 255, 255, 0.25)"
"""Stroke colours: lesion paint, and the eraser (strokes of this colour remove paint; a faint
veil, so the anatomy under them stays visible)."""


def canvas_size(image_shape: tuple[int, ...], width: int) -> tuple[int, int]:
    """(width, height) of a canvas about `width` px wide with the image's aspect ratio."""
    h, w = image_shape[:2]
    scale = min(width / w, MAX_CANVAS_HEIGHT / h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def fit_width(key: str) -> int:
    """The width, in px, the page gives the canvas in this browser window (within
    `FIT_LIMITS`), measured once per canvas; Small's until the browser has told it."""
    kept = f"canvas_fit_{key}"
    if kept not in st.session_state:
        measure = st.components.v2.component("bus_available_width", js=_MEASURE_JS)
        seen = measure(key=f"measure_{key}", default={"width": None},
                       on_width_change=lambda: None, height="content").width
        if not seen:
            return fitted(None)
        st.session_state[kept] = fitted(seen)
    return st.session_state[kept]


def fitted(available: float | None) -> int:
    """The "Fit" canvas width for `available` px of page (None: not known yet, Small's)."""
    if not available:
        return CANVAS_WIDTHS["Small"] or FIT_LIMITS[0]
    return min(max(int(available), FIT_LIMITS[0]), FIT_LIMITS[1])


def _background(image: np.ndarray, size: tuple[int, int]) -> bytes:
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return image_to_png_bytes(resized)


def _clear(version_key: str) -> None:
    """Button callback: a new canvas key, so the next run shows an empty canvas."""
    st.session_state[version_key] = st.session_state.get(version_key, 0) + 1


def paint_mask(image: np.ndarray, key: str, base: np.ndarray | None = None,
               background_image: np.ndarray | None = None) -> np.ndarray | None:
    """A canvas over `image` with its tools; the painted lesion mask at the image's size, or
    None while nothing is painted. With `base`, the canvas edits that mask (shown on
    `background_image`): paint adds to it, the eraser removes from it."""
    from streamlit_drawable_canvas import st_canvas

    tool = st.segmented_control("Tool", list(TOOLS), default="Brush", required=True,
                                key=f"tool_{key}", wrap=True) or "Brush"
    stroke_col, size_col = st.columns([3, 2])
    stroke = stroke_col.slider("Brush size", 2, 60, 16, key=f"stroke_{key}")
    choice = size_col.segmented_control(
        "Canvas", list(CANVAS_WIDTHS), default="Fit", required=True, key=f"canvas_width_{key}",
        help="Fit: as wide as the page allows in this window. Choose before you paint: "
             "another size starts an empty canvas.") or "Fit"
    version_key = f"canvas_version_{key}"
    width = CANVAS_WIDTHS[choice] or fit_width(key)
    size = canvas_size(image.shape, width)
    shown = image if background_image is None else background_image
    background = memo("canvas_bg", (key, size, digest(shown)),
                      lambda: _background(shown, size), 8)
    colour = ERASE if tool == "Eraser" else PAINT
    result = st_canvas(fill_color=colour, stroke_width=stroke, stroke_color=colour,
                       background_image=background, width=size[0], height=size[1],
                       drawing_mode=TOOLS[tool],
                       key=f"canvas_{key}_{width}_{st.session_state.get(version_key, 0)}")
    note_col, clear_col = st.columns([5, 1], vertical_alignment="center")
    note_col.caption("Paint over the lesion; eraser strokes (a faint white veil) remove paint. "
                     "Polygon: click the corners, then the first one again to close it. Point "
                     "at the canvas to show its toolbar, above its top right corner: undo, redo, "
                     "the pencil to move, resize or delete shapes, the bin to start again.")
    clear_col.button("Clear", key=f"clear_{key}", help="Remove everything painted.",
                     on_click=_clear, args=(version_key,))
    mask = strokes_to_mask(result.json_data, canvas_size=size, image_shape=image.shape[:2],
                           erase_color=ERASE, base=base)
    return mask if mask.any() else None
