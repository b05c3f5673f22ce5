"""The DICOM objects the app sends to the archive and reads back: a Secondary Capture of the
report and a Comprehensive SR of the result (highdicom), and the finding an SR holds."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from highdicom.sc import SCImage
from highdicom.sr import (
    CodeContentItem,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    PnameContentItem,
    TextContentItem,
)
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from bus_core.integrations.pacs.endpoints import PacsError

if TYPE_CHECKING:
    from bus_core.inference.predict import Prediction


def value_of(ds: Dataset, keyword: str, default: Any = "") -> Any:
    """The attribute `keyword` of `ds`, `default` when it is missing or empty."""
    value = ds.get(keyword)
    return default if value is None or value == "" else value


def int_of(ds: Dataset, keyword: str) -> int | None:
    """The attribute `keyword` of `ds` as an int, None when it is missing or not a number."""
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None


MANUFACTURER = "bus-classifier (research use, not a medical device)"
RESEARCH_NOTE = ("Research use only. This software is not a medical device: the result "
                 "supports, and never replaces, the reading of a qualified radiologist.")
SC_SERIES_DESCRIPTION = "AI report (research use)"
SR_SERIES_DESCRIPTION = "AI result (research use)"
REVIEW_SERIES_DESCRIPTION = "Confirmed label (research use)"
SCHEME = "99BUSAI"
"""The local coding scheme of the concepts below (DICOM has no codes for them)."""
TITLE = Code("report", SCHEME, "Breast ultrasound AI classification")
REVIEW_TITLE = Code("review", SCHEME, "Breast ultrasound confirmed label")
PREDICTED = Code("predicted", SCHEME, "Predicted class")
CONFIRMED = Code("confirmed", SCHEME, "Confirmed class")
UNCERTAIN = Code("uncertain", SCHEME, "Below the model's certainty threshold")
PROBABILITY = "p"
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
SOURCE = Code("121112", "DCM", "Source of Measurement")
COMMENT = Code("121106", "DCM", "Comment")
OBSERVER = Code("121008", "DCM", "Person Observer Name")
NO_UNITS = Code("1", "UCUM", "no units")
YES, NO = Code("373066001", "SCT", "Yes"), Code("373067005", "SCT", "No")


@dataclass(frozen=True)
class Finding:
    """What is sent back or read back: a class, its calibrated probabilities (none for a
    review), whether the model was uncertain, the model's name and version, and for a
    confirmed review label the reviewer's name."""

    label: str
    probabilities: Mapping[str, float]
    model: str
    model_version: str
    uncertain: bool = False
    confirmed_by: str | None = None


def _series_number(source: Dataset, offset: int) -> int:
    return 9000 + offset + (int_of(source, "SeriesNumber") or 0) % 100


def secondary_capture(source: Dataset, report_png: bytes) -> Dataset:
    """A Secondary Capture of the report image in a new series of `source`'s study, with the
    source image named as its source (SourceImageSequence)."""
    pixels = np.asarray(Image.open(io.BytesIO(report_png)).convert("RGB"))
    sc = SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", patient_orientation=("L", "F"),
        series_instance_uid=generate_uid(), series_number=_series_number(source, 1),
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER)
    del sc.PatientOrientation  # a report page has no anatomical orientation
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageComments = RESEARCH_NOTE
    sc.BurnedInAnnotation = "NO"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def structured_report(source: Dataset, finding: Finding) -> Dataset:
    """A Comprehensive SR in a new series of `source`'s study: the class (predicted, or
    confirmed by `finding.confirmed_by`), the calibrated probabilities, whether the model was
    uncertain, the model's name and version, the research-use note and the source image."""
    contains = "CONTAINS"
    review = finding.confirmed_by is not None
    root = ContainerContentItem(REVIEW_TITLE if review else TITLE)
    items: list[Any] = [
        CodeContentItem(CONFIRMED if review else PREDICTED, _class_code(finding.label),
                        relationship_type=contains)]
    items += [NumContentItem(_probability_code(name), float(value), NO_UNITS,
                             relationship_type=contains)
              for name, value in finding.probabilities.items()]
    if not review:
        items.append(CodeContentItem(UNCERTAIN, YES if finding.uncertain else NO,
                                     relationship_type=contains))
    else:
        items.append(PnameContentItem(OBSERVER, _person_name(finding.confirmed_by or ""),
                                      relationship_type=contains))
    items += [TextContentItem(ALGORITHM_NAME, finding.model, relationship_type=contains),
              TextContentItem(ALGORITHM_VERSION, finding.model_version,
                              relationship_type=contains),
              TextContentItem(COMMENT, RESEARCH_NOTE, relationship_type=contains),
              ImageContentItem(SOURCE, source.SOPClassUID, source.SOPInstanceUID,
                               relationship_type=contains)]
    root.ContentSequence = ContentSequence(items)
    sr = ComprehensiveSR(evidence=[source], content=root, series_instance_uid=generate_uid(),
                         series_number=_series_number(source, 3 if review else 2),
                         sop_instance_uid=generate_uid(), instance_number=1,
                         manufacturer=MANUFACTURER, is_complete=True)
    sr.SeriesDescription = REVIEW_SERIES_DESCRIPTION if review else SR_SERIES_DESCRIPTION
    return sr


def _class_code(label: str) -> Code:
    return Code(label, SCHEME, label)


def _probability_code(label: str) -> Code:
    return Code(f"{PROBABILITY}-{label}", SCHEME, f"Probability of {label}")


def _person_name(name: str) -> str:
    """A signer's name as a single-component DICOM person name (the trailing '^' says so)."""
    return name.replace("^", " ").replace("=", " ")[:63] + "^"


def read_finding(sr: Dataset) -> Finding:
    """The finding of an SR made by `structured_report`; `PacsError` for any other SR."""
    try:
        title = sr.ConceptNameCodeSequence[0]
        if title.CodingSchemeDesignator != SCHEME:
            raise ValueError("not ours")
        values: dict[str, Any] = {}
        probabilities: dict[str, float] = {}
        for item in sr.ContentSequence:
            concept = item.ConceptNameCodeSequence[0]
            code = str(concept.get("CodeValue") or concept.LongCodeValue)
            if item.ValueType == "NUM":
                value = float(item.MeasuredValueSequence[0].NumericValue)
                probabilities[code.removeprefix(f"{PROBABILITY}-")] = value
            elif item.ValueType == "CODE":
                values[code] = str(item.ConceptCodeSequence[0].CodeValue)
            elif item.ValueType in ("TEXT", "PNAME"):
                values[code] = str(item.TextValue if item.ValueType == "TEXT"
                                      else item.PersonName).rstrip("^")
    except (AttributeError, IndexError, KeyError, ValueError) as exc:
        raise PacsError("This structured report was not made by this app.") from exc
    label = values.get(PREDICTED.value) or values.get(CONFIRMED.value)
    if label is None:
        raise PacsError("This structured report names no class.")
    return Finding(label=label, probabilities=probabilities,
                   model=values.get(ALGORITHM_NAME.value, ""),
                   model_version=values.get(ALGORITHM_VERSION.value, ""),
                   uncertain=values.get(UNCERTAIN.value) == YES.value,
                   confirmed_by=values.get(OBSERVER.value))


def model_version(weights_sha256: str) -> str:
    """The version of a model named in what is sent: the start of its weights' hash."""
    return f"sha256:{weights_sha256[:16]}"


def prediction_finding(prediction: Prediction, weights_sha256: str) -> Finding:
    """The finding to send for a prediction of the model whose weights hash is given."""
    return Finding(label=prediction.label, probabilities=dict(prediction.probabilities),
                   model=prediction.model, model_version=model_version(weights_sha256),
                   uncertain=prediction.uncertain)
