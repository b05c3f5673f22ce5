"""Drawings on the browser canvas (streamlit-drawable-canvas, Fabric.js canvas JSON) -> lesion
masks at image resolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

# streamlit-drawable-canvas 0.13 returns Fabric.js 7 canvas JSON. Every object stores `left`,
# `top` (the position of its origin point `originX` / `originY`), `width`, `height`, `scaleX`,
# `scaleY`, `angle` (degrees, about the origin point), `skewX`, `skewY`, `flipX`, `flipY`,
# `strokeWidth` and `strokeUniform`. Its centre is the origin point moved by the origin's
# offset times the object's size including its stroke, rotated by `angle`; a local point p is
# drawn at centre + R(angle) S(scale, flip) K(skew) p. Polygons, polylines and paths keep
# their points in canvas coordinates of when they were drawn: local p = point - pathOffset,
# pathOffset being the centre of the points' bounding box. Line x1..y2 are already local.
# Missing fields take Fabric 7's defaults (origin "center", strokeWidth 1, scale 1).

_ORIGINS = {"left": -0.5, "top": -0.5, "center": 0.0, "right": 0.5, "bottom": 0.5}
_CURVE_STEPS = 8
_CLOSED_TYPES = frozenset({"rect", "labeledrect", "circle", "ellipse", "polygon"})
_POINT_TYPES = frozenset({"polygon", "polyline", "path", "line"})


def _origin(value: Any) -> float:
    return _ORIGINS[value] if isinstance(value, str) else float(value) - 0.5


def _linear(obj: dict) -> np.ndarray:
    """The 2x2 scale (with flips) times skew-x times skew-y matrix of a Fabric object."""
    sx = -obj.get("scaleX", 1) if obj.get("flipX") else obj.get("scaleX", 1)
    sy = -obj.get("scaleY", 1) if obj.get("flipY") else obj.get("scaleY", 1)
    skew_x = np.array([[1, np.tan(np.radians(obj.get("skewX", 0)))], [0, 1]])
    skew_y = np.array([[1, 0], [np.tan(np.radians(obj.get("skewY", 0))), 1]])
    return np.diag([sx, sy]) @ skew_x @ skew_y


def _rotation(obj: dict) -> np.ndarray:
    angle = np.radians(obj.get("angle", 0))
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _object_matrix(obj: dict, width: float, height: float) -> np.ndarray:
    """3x3 affine from an object's local coordinates to canvas coordinates."""
    stroke, uniform = obj.get("strokeWidth", 1), obj.get("strokeUniform", False)
    half = np.array([width, height]) / 2 + (0 if uniform else stroke / 2)
    corners = _linear(obj) @ (np.array([[-1, -1, 1, 1], [-1, 1, -1, 1]]) * half[:, None])
    size = np.ptp(corners, axis=1) + (stroke if uniform else 0)
    offset = -np.array([_origin(obj.get("originX", "center")),
                        _origin(obj.get("originY", "center"))]) * size
    matrix = np.eye(3)
    matrix[:2, :2] = _rotation(obj) @ _linear(obj)
    matrix[:2, 2] = np.array([obj.get("left", 0), obj.get("top", 0)]) + _rotation(obj) @ offset
    return matrix


def _flatten_path(commands: Sequence[Sequence[Any]]) -> list[np.ndarray]:
    """The sub-paths of absolute SVG commands (M, L, Q, C, Z, as Fabric stores them) as
    polylines; curves become short line segments and other commands are skipped."""
    subpaths: list[list[np.ndarray]] = []
    pen = np.zeros(2)
    steps = np.linspace(0, 1, _CURVE_STEPS + 1)[1:, None]
    for op, *args in commands:
        points = np.asarray(args, float).reshape(-1, 2) if args else np.zeros((0, 2))
        if op != "M" and not subpaths:
            subpaths.append([pen])
        if op == "M":
            subpaths.append([points[0]])
        elif op == "L":
            subpaths[-1].append(points[0])
        elif op == "Q":
            (c, end), t = points, steps
            subpaths[-1].extend((1 - t) ** 2 * pen + 2 * (1 - t) * t * c + t ** 2 * end)
        elif op == "C":
            (c1, c2, end), t = points, steps
            subpaths[-1].extend((1 - t) ** 3 * pen + 3 * (1 - t) ** 2 * t * c1
                                + 3 * (1 - t) * t ** 2 * c2 + t ** 3 * end)
        elif op in ("Z", "z"):
            subpaths[-1].append(subpaths[-1][0])
        else:
            continue
        pen = subpaths[-1][-1]
    return [np.array(s) for s in subpaths if len(s) > 1]


def _local_polylines(obj: dict, kind: str) -> tuple[list[np.ndarray], float, float]:
    """A point-based object's polylines in local coordinates, and its width and height."""
    if kind == "line":
        ends = [[obj.get("x1", 0), obj.get("y1", 0)], [obj.get("x2", 0), obj.get("y2", 0)]]
        line = np.array(ends, float)
        size = np.abs(line[1] - line[0])
        return [line], size[0], size[1]
    if kind == "path":
        lines = _flatten_path(obj.get("path") or [])
    else:
        points = [(p["x"], p["y"]) for p in obj.get("points") or []]
        lines = [np.array(points, float)] if points else []
    if not lines:
        return [], 0.0, 0.0
    every = np.concatenate(lines)
    low, high = every.min(axis=0), every.max(axis=0)
    centre = (low + high) / 2
    return ([line - centre for line in lines], obj.get("width", high[0] - low[0]),
            obj.get("height", high[1] - low[1]))


def _stroke_width(obj: dict) -> float:
    """Width of the object's stroke in canvas pixels (0 when it has none)."""
    if not obj.get("stroke") or obj.get("strokeWidth", 1) <= 0:
        return 0.0
    scale = 1.0 if obj.get("strokeUniform") else np.sqrt(
        abs(obj.get("scaleX", 1) * obj.get("scaleY", 1)))
    return float(obj.get("strokeWidth", 1) * scale)


_Window = tuple[int, int, int, int]
"""(y0, y1, x0, x1), end-exclusive: the part of the image an object's region is computed in."""


def _window(points: np.ndarray, pad: float, shape: tuple[int, int]) -> _Window | None:
    """The pixels within `pad` of the box around image-space points, clipped to the image;
    None when that misses the image."""
    x0, y0 = np.maximum(np.floor(points.min(axis=0) - pad).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(points.max(axis=0) + pad).astype(int) + 1, shape[::-1])
    return (int(y0), int(y1), int(x0), int(x1)) if x0 < x1 and y0 < y1 else None


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def _points_region(obj: dict, kind: str, to_image: np.ndarray, shape: tuple[int, int],
                   filled: bool) -> tuple[_Window, np.ndarray] | None:
    """A polygon / polyline / path / line: its stroke, and its interior when `filled`."""
    lines, width, height = _local_polylines(obj, kind)
    if not lines:
        return None
    matrix = to_image @ _object_matrix(obj, width, height)
    image_lines = [_apply(matrix, line) for line in lines]
    stroke = _stroke_width(obj) * np.sqrt(abs(np.linalg.det(to_image[:2, :2])))
    window = _window(np.concatenate(image_lines), stroke / 2 + 1, shape)
    if window is None:
        return None
    y0, y1, x0, x1 = window
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    # OpenCV puts pixel centres at integers; 4 fractional bits keep sub-pixel positions
    polylines = [np.round((line - (x0 + 0.5, y0 + 0.5)) * 16).astype(np.int32)
                 for line in image_lines]
    if filled:
        cv2.fillPoly(canvas, [p for p in polylines if len(p) > 2], 1, cv2.LINE_8, 4)
    if stroke > 0:
        cv2.polylines(canvas, polylines, kind == "polygon", 1, max(1, round(stroke)),
                      cv2.LINE_8, 4)
    region = canvas.astype(bool)
    return window, ndimage.binary_fill_holes(region) if filled and kind != "polygon" else region


def _shape_region(obj: dict, kind: str, to_image: np.ndarray, shape: tuple[int, int]
                  ) -> tuple[_Window, np.ndarray] | None:
    """A rect / circle / ellipse with its stroke, tested at every pixel centre."""
    if kind == "circle":
        half = np.array([obj.get("radius", 0), obj.get("radius", 0)], float)
    elif kind == "ellipse":
        half = np.array([obj.get("rx", 0), obj.get("ry", 0)], float)
    else:
        half = np.array([obj.get("width", 0), obj.get("height", 0)], float) / 2
    matrix = to_image @ _object_matrix(obj, *(2 * half))
    if obj.get("stroke"):
        scale = np.abs([obj.get("scaleX", 1), obj.get("scaleY", 1)])
        stroke = obj.get("strokeWidth", 1) / 2
        half = half + (stroke / np.maximum(scale, 1e-9) if obj.get("strokeUniform") else stroke)
    if np.any(half <= 0):
        return None
    corners = _apply(matrix, np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) * half)
    window = _window(corners, 1, shape)
    if window is None:
        return None
    y0, y1, x0, x1 = window
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    inverse = np.linalg.inv(matrix)
    x = (inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2]) / half[0]
    y = (inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2]) / half[1]
    if kind in ("rect", "labeledrect"):
        return window, (np.abs(x) <= 1) & (np.abs(y) <= 1)
    return window, x ** 2 + y ** 2 <= 1


def _same_colour(a: Any, b: str) -> bool:
    return isinstance(a, str) and "".join(a.split()).lower() == "".join(b.split()).lower()


def _is_eraser(obj: dict, erase_color: str | None) -> bool:
    return obj.get("globalCompositeOperation") == "destination-out" or (
        erase_color is not None and _same_colour(obj.get("stroke"), erase_color))


def strokes_to_mask(canvas_json: dict | None, canvas_size: tuple[int, int],
                    image_shape: tuple[int, int], *, erase_color: str | None = None,
                    base: np.ndarray | None = None) -> np.ndarray:
    """The HxW bool mask (at image resolution) of a streamlit-drawable-canvas drawing.

    `canvas_json` is `st_canvas(...).json_data` (Fabric.js canvas JSON, {"objects": [...]});
    `canvas_size` is the canvas (width, height) in browser pixels, stretched over the whole
    image of `image_shape` (H, W). Objects are applied in drawing order. Painted regions:
    rects, circles, ellipses and polygons with their interior and stroke; freehand paths and
    polylines with their stroke and what they enclose (the path closed from its end back to
    its start: a lesion outline counts as the lesion); lines with their stroke. Eraser objects
    (`globalCompositeOperation` "destination-out", or a stroke colour equal to `erase_color`)
    remove what they cover: shapes their area, paths and lines only their stroke. Text and
    other objects are ignored. No drawing gives an all-False mask, or `base` (an HxW mask the
    drawing edits: paint adds to it, erasers remove from it) when one is given.
    """
    mask = np.zeros(tuple(image_shape[:2]), bool)
    if base is not None:
        if base.shape[:2] != mask.shape:
            raise ValueError(f"The mask to edit is {base.shape[:2]}, the image {mask.shape}.")
        mask |= base.astype(bool)
    if not canvas_json:
        return mask
    (canvas_w, canvas_h), (height, width) = canvas_size, mask.shape
    if canvas_w <= 0 or canvas_h <= 0:
        raise ValueError(f"The canvas size must be positive (got {canvas_size}).")
    to_image = np.diag([width / canvas_w, height / canvas_h, 1.0])
    for obj in canvas_json.get("objects") or []:
        kind = str(obj.get("type", "")).lower()
        if not obj.get("visible", True) or kind not in _CLOSED_TYPES | _POINT_TYPES:
            continue
        erase = _is_eraser(obj, erase_color)
        if kind in _POINT_TYPES:
            filled = kind == "polygon" or (kind != "line" and not erase)
            found = _points_region(obj, kind, to_image, (height, width), filled)
        else:
            found = _shape_region(obj, kind, to_image, (height, width))
        if found is not None:
            (y0, y1, x0, x1), region = found
            part = mask[y0:y1, x0:x1]
            mask[y0:y1, x0:x1] = part & ~region if erase else part | region
    return mask
