"""The review worklist: which cases a reviewer sees, in which order, one page at a time.

A worklist is a `Worklist` (filters and a sort) read from the case store a page at a time, so
it opens as fast with 5,000 cases as with 50: the store counts and sorts in the database and
returns only the page shown (`WorklistPage`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from bus_core.clinic.cases import Case, CaseStore

PAGE_SIZE = 50
"""Cases per worklist page."""

SORTS: dict[str, tuple[str, str, bool]] = {
    "suspicion": ("Most suspicious first", "p_malignant", True),
    "oldest": ("Oldest first", "created_at", False),
    "newest": ("Newest first", "created_at", True),
    "changed": ("Last changed first", "updated_at", True),
}
"""Worklist orders: name -> (words, the store's column, descending)."""

VIEWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "to_review": ("To review", "Cases nobody has reviewed yet.", {"status": "unreviewed"}),
    "flagged": ("Flagged", "Cases to review that the model flagged as possibly malignant.",
                {"status": "unreviewed", "flagged": True}),
    "uncertain": ("Uncertain", "Cases to review where the model was unsure.",
                  {"status": "unreviewed", "uncertain": True}),
    "disagreements": ("Disagreed", "Reviewed cases whose label differs from the model's "
                      "reading.", {"status": "corrected"}),
    "all": ("All", "Every case.", {}),
}
"""The quick views of a worklist (name -> short words, what it holds, filters); each name but
'all' is also a count of `CaseStore.worklist_counts`."""


@dataclass(frozen=True)
class Worklist:
    """What a reviewer asked to see: a quick view (`VIEWS`), further filters (None: any; the
    cases of one study), a sort (`SORTS`) and the page (from 1)."""

    view: str = "to_review"
    predicted: str | None = None
    owner: str | None = None
    reviewer: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    study_id: int | None = None
    sort: str = "suspicion"
    page: int = 1

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"Unknown worklist view {self.view!r}: use one of "
                             f"{', '.join(VIEWS)}.")
        if self.sort not in SORTS:
            raise ValueError(f"Unknown worklist order {self.sort!r}: use one of "
                             f"{', '.join(SORTS)}.")

    def filters(self) -> dict[str, Any]:
        """The filters of `CaseStore.list_cases` this worklist applies (its view's and the
        further ones; no sorting or paging)."""
        further = {"predicted": self.predicted, "owner": self.owner, "reviewer": self.reviewer,
                   "since": self.since, "until": self.until, "study_id": self.study_id}
        return {**VIEWS[self.view][2], **{k: v for k, v in further.items() if v is not None}}

    def base_filters(self) -> dict[str, Any]:
        """The further filters without the view's: what the counts of every view are taken
        among."""
        return replace(self, view="all").filters()


@dataclass(frozen=True)
class WorklistPage:
    """One page of a worklist: its cases, the number of matching cases, the page shown (from
    1, within range) and the number of pages; `counts`: `CaseStore.worklist_counts` among the
    cases matching the further filters."""

    cases: list[Case]
    total: int
    page: int
    pages: int
    counts: dict[str, int]

    @property
    def first(self) -> int:
        """The position (from 1) of this page's first case in the worklist (0 when empty)."""
        return (self.page - 1) * PAGE_SIZE + 1 if self.cases else 0

    @property
    def last(self) -> int:
        """The position of this page's last case (0 when empty)."""
        return self.first + len(self.cases) - 1 if self.cases else 0


def read_page(store: CaseStore, worklist: Worklist, page_size: int = PAGE_SIZE
              ) -> WorklistPage:
    """The page of `worklist` it asks for (the last page when it asks beyond it)."""
    filters = worklist.filters()
    total = store.count_cases(**filters)
    pages = max(1, math.ceil(total / page_size))
    page = min(max(1, worklist.page), pages)
    _, column, descending = SORTS[worklist.sort]
    cases = store.list_cases(**filters, order_by=column, descending=descending,
                             limit=page_size, offset=(page - 1) * page_size)
    return WorklistPage(cases=cases, total=total, page=page, pages=pages,
                        counts=store.worklist_counts(**worklist.base_filters()))


def next_case(ids: list[int], current: int, step: int = 1) -> int | None:
    """The id `step` places after `current` in `ids` (before it when negative); None past
    either end or when `current` is not in `ids`."""
    if current not in ids:
        return None
    position = ids.index(current) + step
    return ids[position] if 0 <= position < len(ids) else None
