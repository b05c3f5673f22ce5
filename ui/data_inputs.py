"""Choosing data on the Train, Evaluate, Teaching and Review pages: typed paths (only under the
folders the administrator allows, `bus_core.data.roots`), dataset summaries, split files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import streamlit as st

from bus_core.data.dataset import class_counts, load_many
from bus_core.data.roots import check_allowed, check_data_source, default_split
from bus_core.data.roots import matching_split as find_matching_split
from bus_core.settings import PROJECT_ROOT


def _typed(text: str) -> Path:
    """A typed path; a relative one that does not exist here is taken from the project folder
    (so 'splits/busi.json' works wherever the app was started)."""
    path = Path(text.strip()).expanduser()
    return path if path.is_absolute() or path.exists() else PROJECT_ROOT / path


def resolve_path(text: str) -> str:
    """A typed path (a split file), resolved; PathNotAllowedError outside the allowed
    folders."""
    return str(check_allowed(_typed(text)))


def resolve_source(text: str) -> str:
    """A typed data folder or CSV manifest, resolved; PathNotAllowedError outside the allowed
    folders, or for a manifest naming files outside its own folder."""
    return str(check_data_source(_typed(text)))


def sources_from_text(text: str) -> list[str]:
    """Data folders / manifests, one per non-empty line, as `resolve_source`."""
    return [resolve_source(line) for line in text.splitlines() if line.strip()]


@st.cache_data(ttl=60, show_spinner=False)
def data_summary(sources: tuple[str, ...]) -> str:
    """'N images: normal a, benign b, malignant c' (raises DataError for unusable data)."""
    records = load_many(sources)
    counts = class_counts(records)
    return f"{len(records)} images: " + ", ".join(f"{k} {v}" for k, v in counts.items())


@st.cache_data(ttl=60, show_spinner=False)
def image_count(sources: tuple[str, ...]) -> int:
    """How many images the data sources hold (raises DataError for unusable data)."""
    return len(load_many(sources))


def matching_split(sources: Sequence[str]) -> str:
    """The split file named after the single data folder (`roots.matching_split`), shown
    relative to the project when it lies there; '' when there is none."""
    path = find_matching_split(sources)
    return "" if path is None else shown_path(path)


def default_split_text(sources: Sequence[str] = ()) -> str:
    """The split file to offer for `sources` (`roots.default_split`), as `matching_split`
    shows it."""
    return shown_path(default_split(sources))


def shown_path(path: Path) -> str:
    """`path` relative to the project when it lies there."""
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)