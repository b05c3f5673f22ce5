"""The study's PDF report, rendered back to text and pictures (pypdfium2)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pypdfium2 as pdfium
import pytest

from bus_core.inference.pdf_report import Review, StudyReport, published_figures, render_study_pdf
from bus_core.inference.report import NOTE, ReportContent, report_filename

PROBS = {"normal": 0.05, "benign": 0.25, "malignant": 0.70}


def _content(name: str = "", colour: int = 200) -> ReportContent:
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    image[30:90, 40:120] = colour
    return ReportContent(image=image, overlay=image[..., ::-1].copy(), probabilities=PROBS,
                         label="malignant", model="densenet121-context-v2", explained="malignant",
                         filename=name, mask_note="suggested outline, accepted",
                         flag="Flagged: P(malignant) 70% is at or above the flag's 19%.",
                         warnings=("Check the outline.",))


def _pages(pdf: bytes) -> list[tuple[str, np.ndarray]]:
    doc = pdfium.PdfDocument(pdf)
    try:
        return [(" ".join(page.get_textpage().get_text_range().split()),
                 np.asarray(page.render(scale=0.5).to_pil().convert("RGB")))
                for page in doc]
    finally:
        doc.close()


def test_a_study_report_says_the_reading_rule_model_and_review_in_words() -> None:
    when = dt.datetime(2026, 3, 1, 9, 30, tzinfo=dt.timezone.utc)
    report = StudyReport(
        images=[_content("Case 12 view 1"), _content("Case 12 view 2", 90)],
        model="densenet121-context-v2", name="Case 12", version="0.9",
        figures="Published test figures (490 images): accuracy 0.780.",
        combined=PROBS, combined_label="malignant", rule="the probabilities of its image most "
        "likely malignant", combined_flag="Flagged as possibly malignant.",
        review=Review("Dr Łucja Nowak", "malignant", when, "Biopsy <advised> & booked"),
        created=when)
    pages = _pages(render_study_pdf(report))
    text = " ".join(t for t, _ in pages)
    for expected in ("Case 12 |", "2 images", "model densenet121-context-v2 (version 0.9)",
                     "Published test figures (490 images): accuracy 0.780.",
                     "Study reading: Malignant (70%)", "Rule: the probabilities of its image",
                     "Flagged as possibly malignant.", "Image 1: Case 12 view 1",
                     "Image 2: Case 12 view 2", "Grad-CAM for 'malignant'", "low high",
                     "Lesion mask: suggested outline, accepted",
                     "Reading: Malignant (70%) (normal 5%, benign 25%, malignant 70%)",
                     "Warning: Check the outline.",
                     "Reviewed by Dr Łucja Nowak on 2026-03-01 09:30 UTC: confirmed malignant.",
                     "Notes: Biopsy <advised> & booked", "Signature:", " ".join(NOTE.split())):
        assert expected in text, expected
    # the research statement is on every page, and the pictures are drawn (not a blank page)
    assert all(" ".join(NOTE.split()) in t for t, _ in pages)
    assert pages[0][1].std() > 10


def test_an_unreviewed_single_image_report_has_no_study_reading_and_no_name() -> None:
    text = " ".join(t for t, _ in _pages(render_study_pdf(StudyReport(
        images=[_content()], model="m"))))
    assert "Not yet reviewed." in text
    assert "Study reading" not in text
    assert "Case" not in text
    assert "1 image " in text


def test_a_report_needs_an_image() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        render_study_pdf(StudyReport(images=[], model="m"))


def test_published_figures_come_from_the_cards_test_metrics() -> None:
    metrics = {"test": {"n": 490, "accuracy": 0.78, "auc_malignant": 0.8659,
                        "at_threshold": {"sensitivity": 0.847, "specificity": 0.66}}}
    assert published_figures(metrics) == (
        "Published test figures (490 images): accuracy 0.780, AUC for malignant 0.866, at the "
        "flag, sensitivity 0.847 and specificity 0.660.")
    assert published_figures({}) == ""
    assert published_figures({"test": {"n": 10, "accuracy": 0.5}}) == (
        "Published test figures (10 images): accuracy 0.500.")


def test_report_file_names_take_the_pdf_suffix() -> None:
    when = dt.datetime(2026, 3, 1, 9, 30)
    assert report_filename("Case 12", when, "pdf") == "Case-12-report-20260301-0930.pdf"
