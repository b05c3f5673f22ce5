"""The review a case's or a study's report signs."""

from __future__ import annotations

import datetime as dt

from bus_core.clinic.cases import Case
from bus_core.clinic.reports import review_of


def _case(i: int, confirmed: str | None, reviewer: str = "Dr R", notes: str = "",
          updated: str = "2026-06-01T10:00:00+00:00") -> Case:
    return Case(id=i, created_at=updated, updated_at=updated, image_hash=f"{i:064d}",
                image_name=f"img{i}.png", mask_hashes=(), combine_mode=None, model_name="m",
                model_hash="h", probabilities={"benign": 1.0}, predicted_label="benign",
                cam_settings=None, reviewer=reviewer if confirmed else "",
                confirmed_label=confirmed, notes=notes, status="confirmed" if confirmed
                else "unreviewed")


def test_one_reviewer_of_every_image_signs_the_most_severe_class_last_time_and_notes():
    review = review_of([_case(1, "benign", notes="cyst"),
                        _case(2, "malignant", notes="spiculated",
                              updated="2026-06-02T10:00:00+00:00"),
                        _case(3, "normal")])
    assert review is not None
    assert (review.reviewer, review.label) == ("Dr R", "malignant")
    assert review.reviewed_at == dt.datetime(2026, 6, 2, 10, tzinfo=dt.timezone.utc)
    assert review.notes == "cyst\nspiculated"


def test_no_signature_unless_one_reviewer_reviewed_them_all():
    assert review_of([]) is None
    assert review_of([_case(1, "benign"), _case(2, None)]) is None
    assert review_of([_case(1, "benign"), _case(2, "benign", reviewer="Dr S")]) is None
