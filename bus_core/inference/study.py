"""One reading per study from the readings of its images.

A breast-ultrasound examination holds several images of one breast (two orthogonal views of a
lesion at least, often more frames, sometimes lesion-free views beside them); a radiologist
reports per study. A study is the images that share a key: the patient (or study) column of a
manifest, a PACS study, or the images one user uploaded together; an image without a key is a
study of its own. The study's true class is its most severe image's (malignant over benign over
normal). Its reading combines its images' calibrated probabilities by one of `RULES`; its
malignant flag is raised when any image's is (sensitivity first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bus_core.constants import CLASSES, MALIGNANT, NORMAL
from bus_core.inference.predict import Prediction, flag_sentence

MEAN, MOST_SUSPICIOUS, LEAST_NORMAL = "mean", "most-suspicious", "least-normal"
RULES: dict[str, str] = {
    MEAN: "the mean of its images' probabilities",
    MOST_SUSPICIOUS: "the probabilities of its image most likely malignant",
    LEAST_NORMAL: "the probabilities of its image least likely normal",
}
"""How a study's probabilities come from its images' (the rule's name: in words)."""
DEFAULT_RULE = LEAST_NORMAL
"""The rule the app and the command line use: on the validation patients of BUS-BRA and
BUS-UCLM it called the fewest lesion studies normal (with `MOST_SUSPICIOUS`) and, of those
two, had the higher AUC (`recipes/study-rule/README.md`). Whatever the rule, a study is
flagged when any of its images is."""
SEVERITY: tuple[str, ...] = (NORMAL, "benign", MALIGNANT)
"""Classes from least to most severe: a study's true class is its most severe image's."""


@dataclass(frozen=True)
class Studies:
    """Study-level results: `keys` (one per study, in order of first appearance), their true
    class index `y_true`, combined `probs`, the number of images `sizes` and each study's image
    indices `members` (into the per-image arrays)."""

    keys: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    sizes: np.ndarray
    members: list[np.ndarray]


def combine(probs: np.ndarray, rule: str = DEFAULT_RULE,
            classes: Sequence[str] = CLASSES) -> np.ndarray:
    """The study's probabilities from its images' (`probs`, one row per image) by `rule`."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not len(p):
        raise ValueError("A study needs the probabilities of at least one image.")
    if rule == MEAN:
        return p.mean(axis=0)
    if rule == MOST_SUSPICIOUS:
        return p[int(np.argmax(p[:, list(classes).index(MALIGNANT)]))]
    if rule == LEAST_NORMAL:
        return p[int(np.argmin(p[:, list(classes).index(NORMAL)]))]
    raise ValueError(f"Unknown study rule {rule!r}: choose one of {', '.join(RULES)}.")


def most_severe(labels: Sequence[int], classes: Sequence[str] = CLASSES) -> int:
    """The class index (in `classes`) of the most severe of `labels` (class indices)."""
    names = [classes[i] for i in labels]
    return list(classes).index(max(names, key=lambda name: SEVERITY.index(name)))


def study_keys(ids: Sequence[str], patients: Sequence[str | None],
               sources: Sequence[str] | None = None) -> list[str]:
    """Each image's study key: its source and patient, or its own id where it has no patient
    (sources keep the patient numbers of two data sets apart)."""
    where = sources or [""] * len(ids)
    return [f"{source}:{patient}" if patient else f"{source}:image:{image}"
            for image, patient, source in zip(ids, patients, where, strict=True)]


def by_study(keys: Sequence[str], y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
             rule: str = DEFAULT_RULE, classes: Sequence[str] = CLASSES) -> Studies:
    """Group per-image results (`y_true`, `probs`, one `keys` entry per image) into studies."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if not len(keys) == len(y) == len(p):
        raise ValueError("keys, y_true and probs must have one entry per image.")
    order = list(dict.fromkeys(keys))
    index = {key: i for i, key in enumerate(order)}
    groups: list[list[int]] = [[] for _ in order]
    for i, key in enumerate(keys):
        groups[index[key]].append(i)
    members = [np.asarray(g, dtype=np.int64) for g in groups]
    return Studies(
        keys=order,
        y_true=np.asarray([most_severe(y[m].tolist(), classes) for m in members], dtype=np.int64),
        probs=(np.stack([combine(p[m], rule, classes) for m in members])
               if members else np.zeros((0, len(classes)))),
        sizes=np.asarray([len(m) for m in members], dtype=np.int64),
        members=members)


@dataclass(frozen=True)
class StudyReading:
    """The reading of a study of several images: its probabilities by `rule`, top class,
    whether it is uncertain, and the malignant flag's sentence ('' when not raised) with the
    index of the image that raised it."""

    rule: str
    probabilities: dict[str, float]
    label: str
    uncertain: bool
    flag: str
    flag_image: int | None = None


def combine_readings(probabilities: Sequence[Mapping[str, float]], rule: str = DEFAULT_RULE, *,
                     uncertain_below: float = 0.0, threshold: float | None = None
                     ) -> StudyReading:
    """One reading of a study from its images' class probabilities by `rule`; uncertain when
    its top probability is below `uncertain_below`. The malignant flag is raised when any
    image reaches the malignant `threshold` (`flag_image` says which: the most suspicious)."""
    if not probabilities:
        raise ValueError("A study needs the reading of at least one image.")
    classes = list(probabilities[0])
    rows = np.asarray([[p[c] for c in classes] for p in probabilities])
    combined = combine(rows, rule, classes)
    reading = {c: float(v) for c, v in zip(classes, combined, strict=True)}
    label = classes[int(np.argmax(combined))]
    suspicious = int(np.argmax(rows[:, classes.index(MALIGNANT)])) if MALIGNANT in classes else 0
    flag = flag_sentence(probabilities[suspicious], threshold)
    return StudyReading(rule=rule, probabilities=reading, label=label,
                        uncertain=reading[label] < uncertain_below,
                        flag=f"Image {suspicious + 1}: {flag}" if flag else "",
                        flag_image=suspicious if flag else None)


def combine_predictions(predictions: Sequence[Prediction], rule: str = DEFAULT_RULE,
                        uncertain_below: float = 0.0) -> StudyReading:
    """`combine_readings` of the `predictions` of one model's images, at its threshold."""
    if not predictions:
        raise ValueError("A study needs the reading of at least one image.")
    return combine_readings([p.probabilities for p in predictions], rule,
                            uncertain_below=uncertain_below,
                            threshold=predictions[0].malignant_threshold)
