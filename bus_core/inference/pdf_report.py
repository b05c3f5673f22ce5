"""The PDF report of a study: for each image the input with its outline, the Grad-CAM overlay
with its colour scale, the reading and the flag in words, which mask was used and whose; the
study's combined reading and its rule; the model's name, version and published test figures;
the reviewer's confirmation and a signature block; the research-software statement (fpdf2, no
Streamlit). The study is named by its pseudonym unless the user chose to print an identifier.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fpdf import FPDF
from PIL import Image

from bus_core.inference.cam import CAM_LABELS, colour_scale, overlay
from bus_core.inference.outline import Segmenter
from bus_core.inference.predict import Prediction, Predictor
from bus_core.inference.report import NOTE, ReportContent, headline, mask_note, outlined
from bus_core.inference.study import DEFAULT_RULE, RULES, combine_predictions
from bus_core.models.card import ModelCard

INK, MUTED, RED, AMBER = (27, 39, 51), (96, 108, 120), (192, 57, 43), (156, 87, 0)
PAGE_WIDTH, MARGIN = 210.0, 15.0  # A4 portrait, millimetres
PANEL = (PAGE_WIDTH - 2 * MARGIN - 6) / 2


@dataclass(frozen=True)
class Review:
    """A reviewer's confirmation of a study's class."""

    reviewer: str
    label: str
    reviewed_at: dt.datetime
    notes: str = ""


@dataclass(frozen=True)
class StudyReport:
    """What a study's PDF shows. `images`: each image's content (as for the PNG report);
    `combined`: the study's probabilities with `combined_label` and `rule` (its words), for a
    study of two or more images; `figures`: the model's published test figures in words;
    `name`: the study's pseudonym (or, where the user opted in, an identifier)."""

    images: Sequence[ReportContent]
    model: str
    name: str = ""
    version: str = ""
    figures: str = ""
    combined: Mapping[str, float] | None = None
    combined_label: str = ""
    combined_uncertain: bool = False
    combined_flag: str = ""
    rule: str = ""
    review: Review | None = None
    created: dt.datetime = field(default_factory=lambda: dt.datetime.now().astimezone())


def published_figures(metrics: Mapping[str, Any]) -> str:
    """The test figures of a card's `metrics` in one sentence ('' when it has none)."""
    test = metrics.get("test") or {}
    if not test.get("n"):
        return ""
    parts = [f"accuracy {test['accuracy']:.3f}" if test.get("accuracy") is not None else "",
             f"AUC for malignant {test['auc_malignant']:.3f}"
             if test.get("auc_malignant") is not None else ""]
    at = test.get("at_threshold") or {}
    if at.get("sensitivity") is not None and at.get("specificity") is not None:
        parts.append(f"at the flag, sensitivity {at['sensitivity']:.3f} and specificity "
                     f"{at['specificity']:.3f}")
    return (f"Published test figures ({test['n']} images): "
            + ", ".join(p for p in parts if p) + ".")


def _font_file() -> Path | None:
    """A Unicode TrueType font (DejaVu Sans, shipped with matplotlib), if installed."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "mpl-data/fonts/ttf/DejaVuSans.ttf"
    return path if path.is_file() else None


class _Document(FPDF):
    """An A4 page set with the research statement in every footer."""

    def __init__(self) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.set_margins(MARGIN, MARGIN, MARGIN)
        self.set_auto_page_break(auto=True, margin=MARGIN + 8)
        font = _font_file()
        self.body_font = "helvetica"
        if font is not None:
            self.add_font("DejaVu", "", str(font))
            self.body_font = "DejaVu"

    def footer(self) -> None:
        self.set_y(-MARGIN - 4)
        self.write_text(NOTE, 7, MUTED)

    def write_text(self, text: str, size: float, colour: tuple[int, int, int] = INK,
                   gap: float = 1.0) -> None:
        """`text` in a paragraph of the page's width."""
        self.set_font(self.body_font, size=size)
        self.set_text_color(*colour)
        if self.body_font == "helvetica":  # the core font has Latin-1 glyphs only
            text = text.encode("latin-1", "replace").decode("latin-1")
        self.multi_cell(0, size * 0.45, text, new_x="LMARGIN", new_y="NEXT")
        self.ln(gap)

    def rule(self) -> None:
        """A thin horizontal line across the page."""
        self.set_draw_color(214, 221, 228)
        self.line(MARGIN, self.get_y(), PAGE_WIDTH - MARGIN, self.get_y())
        self.ln(3)

    def panels(self, pictures: Sequence[tuple[np.ndarray, str]]) -> None:
        """Pictures side by side, each fitted into a square panel and captioned under the
        row."""
        images = [Image.fromarray(np.ascontiguousarray(p)).convert("RGB") for p, _ in pictures]
        sizes = [(im.width * PANEL / max(im.size), im.height * PANEL / max(im.size))
                 for im in images]
        height = max(h for _, h in sizes)
        top = self.get_y()
        for i, (image, (w, h), (_, caption)) in enumerate(zip(images, sizes, pictures,
                                                               strict=True)):
            x = MARGIN + i * (PANEL + 6)
            self.image(image, x=x, y=top, w=w, h=h)
            self.set_xy(x, top + height + 1)
            self.set_font(self.body_font, size=8)
            self.set_text_color(*MUTED)
            self.cell(PANEL, 4, caption)
        self.set_xy(MARGIN, top + height + 6)

    def keep_room(self, height: float) -> None:
        """Start a new page unless `height` millimetres are left on this one."""
        if self.get_y() + height > self.h - MARGIN - 8:
            self.add_page()

    def colour_scale(self) -> None:
        """The Grad-CAM colour strip under the right-hand panel, low to high."""
        x = MARGIN + PANEL + 6
        self.image(Image.fromarray(colour_scale()), x=x, y=self.get_y(), w=PANEL, h=3)
        self.set_xy(x, self.get_y() + 3.5)
        self.set_font(self.body_font, size=7)
        self.set_text_color(*MUTED)
        self.cell(PANEL / 2, 3, "low")
        self.cell(PANEL / 2, 3, "high", align="R")
        self.set_xy(MARGIN, self.get_y() + 6)


def _probabilities(probabilities: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {p:.0%}" for name, p in probabilities.items())


def render_study_pdf(report: StudyReport) -> bytes:
    """The study's report as PDF file bytes."""
    if not report.images:
        raise ValueError("A report needs at least one image.")
    pdf = _Document()
    pdf.set_title("Breast ultrasound: model reading")
    pdf.set_creator("bus_core")
    pdf.add_page()
    pdf.write_text("Breast ultrasound: model reading", 16, gap=2)
    version = f" (version {report.version})" if report.version else ""
    details = [report.name,
               f"{len(report.images)} image{'s' if len(report.images) > 1 else ''}",
               f"created {report.created:%Y-%m-%d %H:%M %Z}".strip(),
               f"model {report.model}{version}"]
    pdf.write_text("   |   ".join(d for d in details if d), 9, MUTED, gap=1)
    if report.figures:
        pdf.write_text(report.figures, 9, MUTED, gap=2)
    pdf.rule()
    if report.combined is not None:
        pdf.write_text("Study reading: " + headline(report.combined_label, report.combined,
                                                    report.combined_uncertain), 13, gap=1)
        pdf.write_text(f"{_probabilities(report.combined)}. Rule: {report.rule}.", 9, MUTED)
        if report.combined_flag:
            pdf.write_text(report.combined_flag, 10, RED)
        pdf.rule()
    for number, content in enumerate(report.images, start=1):
        title = f"Image {number}" + (f": {content.filename}" if content.filename else "")
        pdf.keep_room(PANEL + 30)  # the title stays with its pictures
        pdf.write_text(title, 11, gap=1)
        explained = content.explained or content.label
        pdf.panels([(content.image, "Input image" + (" (lesion outlined)" if content.mask_note
                                                     else "")),
                    (content.overlay,
                     f"{CAM_LABELS.get(content.method, content.method)} for '{explained}'")])
        pdf.colour_scale()
        pdf.write_text(f"Lesion mask: {content.mask_note or 'none'}", 9, MUTED)
        pdf.write_text("Reading: " + headline(content.label, content.probabilities,
                                              content.uncertain)
                       + f" ({_probabilities(content.probabilities)})", 11)
        if content.flag:
            pdf.write_text(content.flag, 10, RED)
        for warning in content.warnings:
            pdf.write_text(f"Warning: {warning}", 9, AMBER)
        pdf.rule()
    if report.review is not None:
        pdf.write_text(f"Reviewed by {report.review.reviewer} on "
                       f"{report.review.reviewed_at:%Y-%m-%d %H:%M %Z}".strip()
                       + f": confirmed {report.review.label}.", 11)
        if report.review.notes:
            pdf.write_text(f"Notes: {report.review.notes}", 9)
    else:
        pdf.write_text("Not yet reviewed.", 11, MUTED)
    pdf.ln(8)
    pdf.write_text("Signature: ______________________________      "
                   "Date: ________________", 10, gap=2)
    return bytes(pdf.output())


def read_study(predictor: Predictor, images: Sequence[np.ndarray], *,
               names: Sequence[str] = (), name: str = "", rule: str = DEFAULT_RULE,
               segmenter: Segmenter | None = None) -> StudyReport:
    """Read each image of one study as the app does (the suggested outline where the model
    reads one: a two-stage model's own, else `segmenter`'s, by default the bundled), explain
    each reading with Grad-CAM over the network that gave its class, and combine the readings
    by `rule` (for two or more images). `names` (one per image) and `name` appear in the
    report only when given."""
    contents, predictions = [], []
    for number, image in enumerate(images):
        masks = []
        if predictor.spec.uses_masks and not predictor.two_stage:
            segmenter = segmenter or Segmenter.from_path()
            masks = [found] if (found := segmenter.segment(image)).any() else []
        prediction = predictor.predict(image, masks)
        target = prediction.label
        heat = predictor.explain(prediction, target=target)
        mask = prediction.outline if prediction.outline is not None else (
            masks[0] if masks else None)
        drawn = image if mask is None or not mask.any() else outlined(image, mask)
        contents.append(ReportContent(
            image=drawn, overlay=overlay(prediction.explained_by(target).model_view, heat),
            probabilities=prediction.probabilities, label=target, model=prediction.model,
            explained=target, filename=names[number] if number < len(names) else "",
            uncertain=prediction.uncertain, warnings=prediction.warnings,
            mask_note=mask_note(predictor, "suggested" if drawn is not image else None),
            flag=prediction.flag_sentence()))
        predictions.append(prediction)
    return assemble(predictor.card, contents, predictions, rule=rule, name=name)


def assemble(card: ModelCard, contents: Sequence[ReportContent],
             predictions: Sequence[Prediction], *, rule: str = DEFAULT_RULE, name: str = "",
             review: Review | None = None) -> StudyReport:
    """The report of a study whose images' `contents` show `predictions` of the model of
    `card` (same order), their readings combined by `rule` when there are two or more, with
    its `review` when it has one."""
    combined = (combine_predictions(predictions, rule, card.uncertain_below)
                if len(predictions) > 1 else None)
    return StudyReport(
        images=list(contents), model=card.name, name=name, version=card.code_version,
        figures=published_figures(card.metrics),
        combined=combined.probabilities if combined else None,
        combined_label=combined.label if combined else "",
        combined_uncertain=combined.uncertain if combined else False,
        combined_flag=combined.flag if combined else "", rule=RULES[rule] if combined else "",
        review=review)
