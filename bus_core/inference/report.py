"""A one-page PNG report of a prediction: the input (with its lesion outline, if any), the
Grad-CAM overlay with its colour scale, the calibrated probabilities, the sensitivity-first
flag, which mask was used and whose, the model, the date and a research-use note (Pillow only,
no Streamlit)."""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bus_core.constants import MALIGNANT, NORMAL
from bus_core.data.masks import draw_outline, mask_overlay
from bus_core.inference.cam import CAM_LABELS, colour_scale
from bus_core.inference.predict import Predictor

WIDTH, MARGIN, PANEL = 1000, 40, 440
INK, MUTED, RULE, TRACK = (27, 39, 51), (96, 108, 120), (214, 221, 228), (232, 237, 241)
BAR_COLOURS = {NORMAL: (46, 139, 87), "benign": (15, 110, 140), MALIGNANT: (192, 57, 43)}
DEFAULT_BAR = (110, 110, 110)
LESION_COLOUR = (255, 196, 0)
"""The colour a lesion outline is drawn in."""
NOTE = ("Research use only. This software is not a medical device: the prediction supports, "
        "and never replaces, the reading of a qualified radiologist.")


@dataclass(frozen=True)
class ReportContent:
    """What a report shows. `overlay` is the Grad-CAM overlay of `explained` (a class);
    `mask_note` says whether a lesion mask was used and who made it ('' = no mask); `flag` is
    the sensitivity-first malignant flag's sentence ('' when not raised)."""

    image: np.ndarray
    overlay: np.ndarray
    probabilities: Mapping[str, float]
    label: str
    model: str
    explained: str = ""
    method: str = "gradcam"
    filename: str = ""
    uncertain: bool = False
    warnings: Sequence[str] = ()
    mask_note: str = ""
    flag: str = ""
    created: dt.datetime = field(default_factory=lambda: dt.datetime.now().astimezone())


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def _fit(image: np.ndarray, box: int) -> Image.Image:
    """`image` scaled to fit a `box` x `box` square, keeping its aspect ratio."""
    picture = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    scale = box / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.LANCZOS)


class _Page:
    """A growing white page with a cursor `y`; drawing calls move the cursor down."""

    def __init__(self) -> None:
        self.image = Image.new("RGB", (WIDTH, 4000), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.y = MARGIN

    def text(self, text: str, size: int, colour=INK, gap: int = 8) -> None:
        font = _font(size)
        for line in _wrap(self.draw, text, font, WIDTH - 2 * MARGIN):
            self.draw.text((MARGIN, self.y), line, fill=colour, font=font)
            self.y += round(size * 1.3)
        self.y += gap

    def rule(self) -> None:
        self.draw.line((MARGIN, self.y, WIDTH - MARGIN, self.y), fill=RULE, width=2)
        self.y += 18

    def panels(self, images: Sequence[tuple[np.ndarray, str]], scale_under: int | None = None
               ) -> None:
        """Images side by side with captions; the map colour scale under panel `scale_under`."""
        caption_font, x, tallest = _font(16), MARGIN, 0
        gap = WIDTH - 2 * MARGIN - 2 * PANEL
        lefts = []
        for array, caption in images:
            picture = _fit(array, PANEL)
            self.draw.text((x, self.y), caption, fill=MUTED, font=caption_font)
            self.image.paste(picture, (x, self.y + 26))
            tallest = max(tallest, picture.height)
            lefts.append(x)
            x += PANEL + gap
        self.y += 26 + tallest + 10
        if scale_under is not None:
            left = lefts[scale_under]
            self.image.paste(Image.fromarray(colour_scale(PANEL, 12)), (left, self.y))
            self.draw.text((left, self.y + 16), "low", fill=MUTED, font=caption_font)
            self.draw.text((left + PANEL // 2, self.y + 16), "influence on the score",
                           fill=MUTED, font=caption_font, anchor="ma")
            self.draw.text((left + PANEL, self.y + 16), "high", fill=MUTED, font=caption_font,
                           anchor="ra")
            self.y += 40
        self.y += 14

    def bars(self, probabilities: Mapping[str, float]) -> None:
        font, x0, x1 = _font(18), MARGIN + 130, WIDTH - MARGIN - 90
        for name, value in probabilities.items():
            self.draw.text((MARGIN, self.y), name.capitalize(), fill=INK, font=font)
            self.draw.rounded_rectangle((x0, self.y + 2, x1, self.y + 22), 4, fill=TRACK)
            end = x0 + round((x1 - x0) * min(max(value, 0.0), 1.0))
            if end > x0:
                self.draw.rounded_rectangle((x0, self.y + 2, end, self.y + 22), 4,
                                            fill=BAR_COLOURS.get(name, DEFAULT_BAR))
            self.draw.text((x1 + 14, self.y), f"{value:.0%}", fill=INK, font=font)
            self.y += 34
        self.y += 10

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.crop((0, 0, WIDTH, self.y + MARGIN)).save(buffer, format="PNG")
        return buffer.getvalue()


def outlined(image: np.ndarray, mask: np.ndarray,
             colour: tuple[int, int, int] = LESION_COLOUR) -> np.ndarray:
    """`image` with the lesion tinted and outlined in `colour`."""
    tinted = mask_overlay(image, mask, color=colour, alpha=0.25)
    return draw_outline(tinted, mask, color=colour,
                        thickness=max(2, round(max(image.shape[:2]) / 250)))


def mask_note(predictor: Predictor, origin: str | None) -> str:
    """For a report: who made the lesion mask (`origin`, a `store.MASK_SOURCES` value or
    'given'; None: no mask, '') and whether `predictor`'s model read it."""
    if origin is None:
        return ""
    made = {"suggested": "suggested automatically by the outline model",
            "suggested, edited": "suggested automatically, then edited by the user"}.get(
        origin, origin)
    use = ("the model read the lesion and its surroundings, and the whole image for normal "
           "vs lesion" if predictor.two_stage
           else "the model read the lesion and its surroundings"
           if predictor.spec.mode == "lesion-context"
           else "the model read the masked lesion" if predictor.spec.uses_masks
           else "shown for reference; the model read the whole image")
    return f"{made} ({use})"


def headline(label: str, probabilities: Mapping[str, float], uncertain: bool) -> str:
    """One line saying what the model predicts, e.g. 'Benign (72%)' or 'Uncertain ...'."""
    top = probabilities.get(label, 0.0)
    if uncertain:
        return f"Uncertain: leans {label} ({top:.0%})"
    return f"{label.capitalize()} ({top:.0%})"


def render_report(content: ReportContent) -> bytes:
    """The report as PNG file bytes."""
    page = _Page()
    page.text("Breast ultrasound: model analysis", 30, gap=4)
    details = [f"Created {content.created:%Y-%m-%d %H:%M %Z}".strip(), f"Model {content.model}"]
    if content.filename:
        details.insert(0, f"File {content.filename}")
    page.text("   |   ".join(details), 16, MUTED, gap=14)
    page.rule()
    explained = content.explained or content.label
    page.panels([(content.image, "Input image" + (" (lesion outlined)" if content.mask_note
                                                   else "")),
                 (content.overlay,
                  f"{CAM_LABELS.get(content.method, content.method)} for '{explained}'")],
                scale_under=1)
    page.text(f"Lesion mask: {content.mask_note or 'none'}", 16, MUTED, gap=10)
    page.text(f"Prediction: {headline(content.label, content.probabilities, content.uncertain)}",
              24, gap=10)
    page.bars(content.probabilities)
    if content.flag:
        page.text(content.flag, 17, (192, 57, 43), gap=8)
    for warning in content.warnings:
        page.text(f"Warning: {warning}", 16, (156, 87, 0), gap=4)
    page.rule()
    page.text(NOTE, 15, MUTED, gap=0)
    return page.png()


def report_filename(filename: str, created: dt.datetime, suffix: str = "png") -> str:
    """A download name such as 'scan-report-20250101-0930.png' (or `suffix`)."""
    stem = filename.rsplit(".", 1)[0] if filename else "case"
    safe = re.sub(r"[^A-Za-z0-9_]+", "-", stem).strip("-") or "case"
    return f"{safe}-report-{created:%Y%m%d-%H%M}.{suffix}"
