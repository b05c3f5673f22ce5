"""Tests for bus_core.data.masks: combining, bounding boxes, masked crops, the leak-free crop,
canvas drawings -> masks, outlines and overlays. All masks are tiny and made by hand."""

from __future__ import annotations

import numpy as np
import pytest

from bus_core.data.canvas import strokes_to_mask
from bus_core.data.masks import (
    COMBINE_MODES,
    apply_mask_crop,
    combination_note,
    combine_masks,
    draw_outline,
    leak_free_crop,
    mask_bbox,
    mask_outline,
    mask_overlay,
    masked_input,
    pseudo_lesion_mask,
)
from bus_core.errors import MaskError


def box(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """A bool mask of `shape` that is True on rows y0..y1-1 and columns x0..x1-1."""
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def speckle(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 'ultrasound' with no black pixel (values 40..220)."""
    grey = np.random.default_rng(seed).integers(40, 221, size=(h, w), dtype=np.uint8)
    return np.stack([grey] * 3, axis=-1)


# --- combine_masks -------------------------------------------------------------------------

A, B, C = box((10, 10), 2, 6, 2, 6), box((10, 10), 4, 8, 4, 8), box((10, 10), 3, 7, 3, 7)


def test_combine_modes_are_the_three_modes():
    assert COMBINE_MODES == ("intersection", "weighted", "union")


def test_intersection_and_union_of_overlapping_masks():
    assert np.array_equal(combine_masks([A, B, C], "intersection"), box((10, 10), 4, 6, 4, 6))
    assert np.array_equal(combine_masks([A, B, C], "union"), A | B | C)
    assert combine_masks([A, B], "union").dtype == bool


def test_weighted_keeps_what_enough_masks_mark():
    votes = A.astype(int) + B + C
    assert np.array_equal(combine_masks([A, B, C], "weighted", threshold=0.5), votes >= 2)
    # strictly more than the threshold: with 3 masks, one vote (1/3) does not pass 1/3
    assert np.array_equal(combine_masks([A, B, C], "weighted", threshold=1 / 3), votes >= 2)
    assert np.array_equal(combine_masks([A, B, C], "weighted", threshold=0.3), votes >= 1)
    assert np.array_equal(combine_masks([A, B, C], "weighted", threshold=0.0), A | B | C)
    assert np.array_equal(combine_masks([A, B, C], "weighted", threshold=0.9), votes == 3)


def test_weighted_falls_back_to_union_when_nothing_passes():
    left, right = box((10, 10), 0, 4, 0, 4), box((10, 10), 6, 10, 6, 10)
    assert np.array_equal(combine_masks([left, right], "weighted", threshold=0.5), left | right)
    # and only then: an overlap that passes is kept alone
    assert np.array_equal(combine_masks([A, B], "weighted", threshold=0.5), A & B)


def test_combination_note_says_what_weighted_amounts_to():
    left, right = box((10, 10), 0, 4, 0, 4), box((10, 10), 6, 10, 6, 10)
    assert "the same as 'union'" in combination_note([A, B], "weighted", 0.3)
    assert "the same as 'union'" in combination_note([A, B, C], "weighted", 0.3)
    assert "the same as 'intersection'" in combination_note([A, B], "weighted", 0.5)
    assert "at least 3 of them" in combination_note([A, B, C, A, B], "weighted", 0.5)
    assert "falls back to their union" in combination_note([left, right], "weighted", 0.5)
    assert combination_note([A], "weighted") is None
    assert combination_note([A, B], "union") is None


def test_intersection_of_separate_masks_is_empty_not_an_error():
    left, right = box((10, 10), 0, 4, 0, 4), box((10, 10), 6, 10, 6, 10)
    assert not combine_masks([left, right], "intersection").any()


def test_single_and_numeric_masks():
    assert np.array_equal(combine_masks([A]), A)
    as_bytes = [A.astype(np.uint8) * 255, B.astype(np.uint8)]
    assert np.array_equal(combine_masks(as_bytes, "intersection"), A & B)


def test_combine_rejects_bad_input():
    with pytest.raises(MaskError, match="No lesion mask"):
        combine_masks([])
    with pytest.raises(MaskError, match=r"10 x 10 pixels, 12 x 10 pixels"):
        combine_masks([A, np.zeros((10, 12), bool)])
    with pytest.raises(MaskError, match="not a 2-D image"):
        combine_masks([np.zeros((10, 10, 3), bool)])
    with pytest.raises(ValueError, match="combine mode"):
        combine_masks([A], "majority")  # type: ignore[arg-type]
    for threshold in (-0.1, 1.0):
        with pytest.raises(ValueError, match="threshold"):
            combine_masks([A], "weighted", threshold=threshold)


# --- mask_bbox -----------------------------------------------------------------------------

def test_bbox_without_margin_is_the_tight_box():
    assert mask_bbox(box((20, 20), 3, 6, 2, 7), margin=0, min_size=1) == (3, 6, 2, 7)


def test_bbox_margin_is_a_fraction_of_the_box_on_each_side():
    assert mask_bbox(box((20, 24), 8, 12, 6, 16), margin=0.5, min_size=1) == (6, 14, 1, 21)


def test_bbox_margin_is_clipped_at_the_image_border():
    assert mask_bbox(box((20, 30), 0, 4, 26, 30), margin=0.5, min_size=1) == (0, 6, 24, 30)


def test_bbox_min_size_grows_around_the_mask_and_stays_inside():
    assert mask_bbox(box((20, 20), 10, 11, 10, 11), margin=0, min_size=5) == (8, 13, 8, 13)
    assert mask_bbox(box((20, 20), 0, 1, 19, 20), margin=0, min_size=5) == (0, 5, 15, 20)
    # the image is smaller than min_size: the whole image
    assert mask_bbox(box((10, 12), 4, 6, 4, 6)) == (0, 10, 0, 12)


def test_bbox_of_empty_mask_raises():
    with pytest.raises(MaskError, match="lesion mask is empty"):
        mask_bbox(np.zeros((10, 10), bool))


# --- apply_mask_crop / masked_input --------------------------------------------------------

def test_apply_mask_crop_zeroes_outside_and_crops_to_the_box():
    image = speckle(30, 32)
    mask = box((30, 32), 4, 20, 6, 22)
    mask[4, 6] = False  # a pixel inside the box but outside the mask
    crop = apply_mask_crop(image, mask, margin=0.25)
    assert crop.shape == (24, 24, 3) and crop.dtype == np.uint8  # rows 0..24, cols 2..26
    expected = np.where(mask[0:24, 2:26, None], image[0:24, 2:26], 0)
    assert np.array_equal(crop, expected)
    assert not crop[4, 4].any() and (crop[5, 5] == image[5, 7]).all()
    assert not crop[:4].any() and not crop[:, :4].any()


def test_apply_mask_crop_fill_value():
    mask = box((20, 20), 5, 15, 5, 15)
    crop = apply_mask_crop(speckle(20, 20), mask, margin=0.2, fill=7)
    assert (crop[0] == 7).all() and (crop[2:-2, 2:-2] != 7).any()


def test_apply_mask_crop_rejects_bad_masks():
    with pytest.raises(MaskError, match=r"mask is 10 x 10 pixels but the image is 12 x 10"):
        apply_mask_crop(speckle(10, 12), A)
    with pytest.raises(MaskError, match="empty"):
        apply_mask_crop(speckle(10, 10), np.zeros((10, 10), bool))


def test_masked_input_is_combine_then_crop():
    image = speckle(10, 10)
    expected = apply_mask_crop(image, combine_masks([A, B, C], "weighted", 0.5), 0.1)
    assert np.array_equal(masked_input(image, [A, B, C], "weighted", 0.5, 0.1), expected)


def test_masked_input_explains_empty_combinations():
    left, right = box((10, 10), 0, 4, 0, 4), box((10, 10), 6, 10, 6, 10)
    with pytest.raises(MaskError, match=r"intersection is empty.*'union'"):
        masked_input(speckle(10, 10), [left, right], mode="intersection")
    with pytest.raises(MaskError, match="lesion mask is empty"):
        masked_input(speckle(10, 10), [np.zeros((10, 10), bool)] * 2, mode="union")
    assert masked_input(speckle(10, 10), [left, right], mode="union").any()


# --- pseudo lesions and the leak-free crop -------------------------------------------------

def test_pseudo_lesion_mask_is_a_blob_of_plausible_size_inside_its_area():
    for seed in range(10):
        mask = pseudo_lesion_mask((60, 80), np.random.default_rng(seed), min_frac=0.3,
                                  max_frac=0.7, within=(10, 50, 20, 80))
        y0, y1, x0, x1 = mask_bbox(mask, margin=0, min_size=1)
        assert y0 >= 10 and y1 <= 50 and x0 >= 20
        # the irregular border may pull the blob in by up to a fifth of its box
        assert 0.8 * 0.3 * 40 - 1 <= y1 - y0 <= 0.7 * 40 + 1
        assert 0.8 * 0.3 * 60 - 1 <= x1 - x0 <= 0.7 * 60 + 1
        assert mask.sum() < (y1 - y0) * (x1 - x0)  # rounded, not a rectangle


def test_pseudo_lesion_mask_is_reproducible():
    def make(seed: int) -> np.ndarray:
        return pseudo_lesion_mask((40, 40), np.random.default_rng(seed))
    assert np.array_equal(make(1), make(1))
    assert not np.array_equal(make(1), make(2))


def test_leak_free_crop_is_a_non_black_masked_crop_of_plausible_size():
    image = speckle(64, 96)
    crop = leak_free_crop(image, np.random.default_rng(0))
    assert crop.dtype == np.uint8 and crop.ndim == 3
    assert 0.3 * 0.8 * 64 <= crop.shape[0] <= 0.7 * 1.2 * 64 + 2
    assert 0.3 * 0.8 * 96 <= crop.shape[1] <= 0.7 * 1.2 * 96 + 2
    tissue = crop.any(axis=-1)
    assert tissue.mean() > 0.4  # mostly tissue ...
    assert not tissue[0, 0] and not tissue[-1, -1]  # ... on black, like a masked lesion


def test_leak_free_crop_is_reproducible_for_a_seed():
    image = speckle(64, 96)
    first = leak_free_crop(image, np.random.default_rng(5))
    assert np.array_equal(first, leak_free_crop(image, np.random.default_rng(5)))
    assert not np.array_equal(first, leak_free_crop(image, np.random.default_rng(6)))


def test_leak_free_crop_stays_on_tissue_not_black_border():
    image = speckle(64, 96)
    image[:, :48] = 0  # the left half is black border
    for seed in range(8):
        crop = leak_free_crop(image, np.random.default_rng(seed))
        assert crop.any(axis=-1).mean() > 0.4


# --- strokes_to_mask -----------------------------------------------------------------------
# The canvas is 20 x 15 (width x height) over a 40 x 30 image: every canvas pixel is 2 x 2.

CANVAS, IMAGE = (20, 15), (30, 40)


def paint(*objects: dict, erase_color: str | None = None) -> np.ndarray:
    return strokes_to_mask({"version": "7.4.0", "objects": list(objects)}, CANVAS, IMAGE,
                           erase_color=erase_color)


def fabric(kind: str, **fields) -> dict:
    """A Fabric.js 7 object as drawable-canvas serialises it (no stroke unless given)."""
    return {"type": kind, "originX": "left", "originY": "top", "left": 0, "top": 0,
            "scaleX": 1, "scaleY": 1, "angle": 0, "flipX": False, "flipY": False, "skewX": 0,
            "skewY": 0, "stroke": None, "strokeWidth": 0, "strokeUniform": False,
            "fill": "rgba(255, 196, 0, 0.55)", "globalCompositeOperation": "source-over",
            "visible": True, **fields}


def test_no_drawing_is_an_empty_mask():
    for drawing in (None, {}, {"objects": []}):
        mask = strokes_to_mask(drawing, CANVAS, IMAGE)
        assert mask.shape == IMAGE and mask.dtype == bool and not mask.any()


def test_rect_is_scaled_to_the_image():
    mask = paint(fabric("Rect", left=4, top=3, width=6, height=4))
    assert np.array_equal(mask, box(IMAGE, 6, 14, 8, 20))  # canvas x 4..10, y 3..7


def test_rect_origin_scale_and_stroke():
    centred = fabric("rect", originX="center", originY="center", left=10, top=7, width=3,
                     height=4, scaleX=2)  # lower-case type as older Fabric wrote it
    assert np.array_equal(paint(centred), box(IMAGE, 10, 18, 14, 26))  # x 7..13, y 5..9
    # a uniform 2-px stroke: left/top is the stroke's outer corner, the stroke adds 1 px a side
    stroked = fabric("Rect", left=4, top=3, width=6, height=4, stroke="#000", strokeWidth=2,
                     strokeUniform=True)
    assert np.array_equal(paint(stroked), box(IMAGE, 6, 18, 8, 24))  # x 4..12, y 3..9


def test_rect_rotated_about_its_origin():
    rotated = fabric("Rect", left=10, top=2, width=6, height=2, angle=90)
    assert np.array_equal(paint(rotated), box(IMAGE, 4, 16, 16, 20))  # x 8..10, y 2..8


def test_skewed_rect():
    skewed = paint(fabric("Rect", originX="center", originY="center", left=10, top=7, width=4,
                          height=4, skewX=45))  # local (x, y) is drawn at (x + y, y)
    assert skewed[16, 24] and not skewed[16, 16]
    plain = paint(fabric("Rect", originX="center", originY="center", left=10, top=7, width=4,
                         height=4))
    assert plain[16, 16] and not plain[16, 24]


def test_shapes_beyond_the_canvas_are_clipped():
    partly = fabric("LabeledRect", left=15, top=10, width=10, height=10, label="lesion")
    assert np.array_equal(paint(partly), box(IMAGE, 20, 30, 30, 40))
    assert not paint(fabric("Rect", left=30, top=3, width=5, height=5)).any()
    off = fabric("Polygon", points=TRIANGLE, left=-20, top=2, width=10, height=10)
    assert not paint(off).any()


def test_circle_as_the_circle_tool_draws_it():
    # the tool puts the left-centre point at the mouse: centre (8, 7), radius 3 -> image (16, 14), 6
    mask = paint(fabric("Circle", originY="center", left=5, top=7, radius=3, width=6,
                        height=6))
    yy, xx = np.mgrid[:30, :40] + 0.5
    assert np.array_equal(mask, np.hypot(yy - 14, xx - 16) <= 6)
    assert mask[14, 16] and mask[14, 11] and not mask[14, 23] and not mask[7, 16]


def test_circle_stroke_and_rotation():
    # the circle tool rotates about the left-centre point toward the mouse: 90 deg -> centre below
    circle = fabric("Circle", originY="center", left=8, top=2, radius=3, width=6, height=6,
                    angle=90, stroke="#fff", strokeWidth=1)
    mask = paint(circle)  # centre (8, 2 + 3.5), radius 3.5 with the stroke
    yy, xx = np.mgrid[:30, :40] + 0.5
    assert np.array_equal(mask, np.hypot(yy - 11, xx - 16) <= 7)


def test_ellipse():
    mask = paint(fabric("Ellipse", originX="center", originY="center", left=10, top=7, rx=4,
                        ry=2, width=8, height=4))
    assert mask[14, 20] and mask[14, 13] and not mask[14, 5] and not mask[9, 20]


OUTLINE = [["M", 4, 3], ["L", 12, 3], ["L", 12, 10], ["L", 4, 10], ["L", 4, 4]]
"""A freehand lesion outline, not quite closed (bounding box x 4..12, y 3..10)."""


def outline_path(**fields) -> dict:
    return fabric("Path", **{"path": OUTLINE, "originX": "center", "originY": "center",
                             "left": 8, "top": 6.5, "stroke": "rgba(255, 196, 0, 0.55)",
                             "strokeWidth": 1, "fill": None, **fields})


def test_freehand_path_fills_what_it_outlines():
    mask = paint(outline_path())
    assert mask[13, 16] and mask[7, 9] and mask[19, 23]  # inside, and near the corners
    assert not mask[2, 2] and not mask[13, 30] and not mask[25, 16]
    assert mask[6:20, 8:24].all() and not mask[:4].any() and not mask[:, 26:].any()


def test_path_position_follows_left_top_not_its_points():
    moved = paint(outline_path(left=13))  # dragged 5 canvas px right = 10 image px
    assert np.array_equal(moved, np.roll(paint(outline_path()), 10, axis=1))


def test_curved_path():
    curve = [["M", 2, 7], ["Q", 7, -3, 12, 7], ["Q", 7, 17, 2, 7]]  # a lens, x 2..12, y 2..12
    mask = paint(fabric("Path", path=curve, originX="center", originY="center", left=7, top=7,
                        stroke="#f00", strokeWidth=1, fill=None))
    assert mask[14, 14] and mask[8, 14] and mask[20, 14]
    assert not mask[1, 14] and not mask[14, 1] and not mask[5, 5]


TRIANGLE = [{"x": 4, "y": 2}, {"x": 14, "y": 2}, {"x": 4, "y": 12}]


def test_polygon_with_origin_and_path_offset():
    # the polygon tool leaves the default centre origin at the points' box centre (9, 7)
    centred = paint(fabric("Polygon", points=TRIANGLE, originX="center", originY="center",
                           left=9, top=7, width=10, height=10))
    assert centred[8, 12] and centred[18, 10] and centred[6, 20]
    assert not centred[20, 24] and not centred[2, 12] and not centred[8, 30]
    # the same place said with a left/top origin
    same = paint(fabric("Polygon", points=TRIANGLE, left=4, top=2, width=10, height=10))
    assert np.array_equal(same, centred)
    moved = paint(fabric("Polygon", points=TRIANGLE, left=9, top=2, width=10, height=10))
    assert np.array_equal(moved, np.roll(centred, 10, axis=1))


def test_line_is_its_stroke_only():
    line = fabric("Line", originX="center", originY="center", left=10, top=7, x1=-5, y1=0,
                  x2=5, y2=0, width=10, height=0, stroke="#fff", strokeWidth=2)
    mask = paint(line)
    assert mask[13, 20] and mask[14, 12] and mask[14, 28]
    assert not mask[10, 20] and not mask[18, 20] and not mask[14, 35]


def test_eraser_composite_operation_subtracts():
    rect = fabric("Rect", left=2, top=2, width=16, height=11)
    eraser = fabric("Path", path=[["M", 10, 0], ["L", 10, 15]], originX="center",
                    originY="center", left=10, top=7.5, stroke="#000", strokeWidth=2,
                    globalCompositeOperation="destination-out")
    mask = paint(rect, eraser)
    assert not mask[14, 19] and not mask[14, 20] and mask[14, 15] and mask[14, 25]
    assert paint(rect, eraser, rect).all(where=box(IMAGE, 4, 26, 4, 36))  # painting again


def test_eraser_colour_subtracts_only_when_named():
    rect = fabric("Rect", left=2, top=2, width=16, height=11)
    rubber = outline_path(stroke="rgba(0, 0, 0, 1)")
    erased = paint(rect, rubber, erase_color="rgba(0,0,0,1)")
    assert not erased[6, 16] and not erased[13, 8]  # on the eraser's stroke
    assert erased[13, 16]  # an eraser removes what it covers, not what it encloses
    assert paint(rect, rubber).all(where=box(IMAGE, 4, 26, 4, 36))


def test_hidden_and_unknown_objects_are_ignored():
    hidden = fabric("Rect", left=4, top=3, width=6, height=4, visible=False)
    text = fabric("Textbox", left=4, top=3, width=6, height=4, text="lesion")
    assert not paint(hidden, text).any()


# --- outlines and overlays -----------------------------------------------------------------

SQUARE = box((10, 10), 2, 8, 2, 8)


def test_outline_is_on_the_border_only():
    ring = mask_outline(SQUARE, thickness=1)
    assert np.array_equal(ring, SQUARE & ~box((10, 10), 3, 7, 3, 7))
    thick = mask_outline(SQUARE, thickness=2)
    assert np.array_equal(thick, SQUARE & ~box((10, 10), 4, 6, 4, 6))


def test_outline_at_the_image_edge_and_bad_thickness():
    full = np.ones((6, 6), bool)
    assert np.array_equal(mask_outline(full, 1), ~box((6, 6), 1, 5, 1, 5))
    with pytest.raises(ValueError):
        mask_outline(full, 0)


def test_draw_outline_colours_the_border_and_keeps_the_input():
    image = speckle(10, 10)
    before = image.copy()
    drawn = draw_outline(image, SQUARE, color=(0, 255, 0), thickness=1)
    ring = mask_outline(SQUARE, 1)
    assert (drawn[ring] == (0, 255, 0)).all()
    assert np.array_equal(drawn[~ring], image[~ring]) and np.array_equal(image, before)
    with pytest.raises(MaskError):
        draw_outline(speckle(10, 12), SQUARE)


def test_mask_overlay_blends_inside_the_mask_only():
    image = np.full((10, 10, 3), 100, np.uint8)
    tinted = mask_overlay(image, SQUARE, color=(255, 0, 0), alpha=0.5)
    assert (tinted[SQUARE] == (178, 50, 50)).all()
    assert (tinted[~SQUARE] == 100).all() and (image == 100).all()
    with pytest.raises(ValueError):
        mask_overlay(image, SQUARE, alpha=1.5)
    with pytest.raises(MaskError):
        mask_overlay(image, np.zeros((5, 5), bool))
