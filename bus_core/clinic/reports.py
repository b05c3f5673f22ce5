"""What a case's or a study's report signs: the review of its cases (`review_of`), for
`bus_core.inference.pdf_report`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from bus_core.clinic.cases import Case
from bus_core.constants import CLASSES
from bus_core.inference.pdf_report import Review
from bus_core.inference.study import most_severe


def review_of(reviewed: Sequence[Case]) -> Review | None:
    """The signature block of a report of these cases (one case, or a study's): when one
    reviewer reviewed them all, their name, the most severe class they confirmed (a study's
    class), the last review's time and the notes; else None."""
    if not reviewed or any(c.confirmed_label is None for c in reviewed) or len(
            {c.reviewer for c in reviewed}) > 1:
        return None
    label = CLASSES[most_severe([CLASSES.index(str(c.confirmed_label)) for c in reviewed])]
    when = max(datetime.fromisoformat(c.updated_at) for c in reviewed).astimezone()
    notes = "\n".join(c.notes for c in reviewed if c.notes)
    return Review(reviewed[0].reviewer, label, when, notes)
