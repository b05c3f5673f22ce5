"""The painting canvas's sizes and stroke colours."""

from __future__ import annotations

from ui.canvas import CANVAS_WIDTHS, ERASE, FIT_LIMITS, canvas_size, fitted


def test_the_canvas_can_be_large_and_keeps_the_image_aspect_ratio():
    assert canvas_size((300, 400), CANVAS_WIDTHS["Small"]) == (440, 330)
    assert canvas_size((300, 400), CANVAS_WIDTHS["Large"]) == (760, 570)


def test_fit_is_the_default_and_follows_the_width_the_page_has():
    assert next(iter(CANVAS_WIDTHS)) == "Fit" and CANVAS_WIDTHS["Fit"] is None
    assert fitted(None) == CANVAS_WIDTHS["Small"]  # until the browser has told the width
    assert fitted(520.7) == 520
    assert fitted(2000) == FIT_LIMITS[1] and fitted(100) == FIT_LIMITS[0]


def test_eraser_strokes_leave_the_anatomy_visible():
    *_, alpha = ERASE.removeprefix("rgba(").rstrip(")").split(",")
    assert float(alpha) <= 0.3
