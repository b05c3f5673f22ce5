"""The painting canvas's sizes and stroke colours."""

from __future__ import annotations

from ui.canvas import CANVAS_WIDTHS, ERASE, canvas_size


def test_the_canvas_can_be_large_and_keeps_the_image_aspect_ratio():
    assert canvas_size((300, 400), CANVAS_WIDTHS["Small"]) == (440, 330)
    assert canvas_size((300, 400), CANVAS_WIDTHS["Large"]) == (760, 570)


def test_eraser_strokes_leave_the_anatomy_visible():
    *_, alpha = ERASE.removeprefix("rgba(").rstrip(")").split(",")
    assert float(alpha) <= 0.3
