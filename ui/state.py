"""Per-session memo caches: results kept in st.session_state so a rerun (a slider moved, a
widget touched) reuses decoded images, predictions and CAM maps instead of recomputing them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from typing import TypeVar

import numpy as np
import streamlit as st

from bus_core.errors import BusError

T = TypeVar("T")


def digest(data: bytes | np.ndarray) -> str:
    """A short content hash of bytes or an array (shape and dtype included)."""
    h = hashlib.sha1()
    if isinstance(data, np.ndarray):
        h.update(f"{data.shape}{data.dtype}".encode())
        data = np.ascontiguousarray(data).tobytes()
    h.update(data)
    return h.hexdigest()[:16]


def memo(namespace: str, key: Hashable, compute: Callable[[], T], max_entries: int = 32) -> T:
    """`compute()`, remembered in this session under (namespace, key).

    A `BusError` is remembered too and raised again on every later call with the same key,
    so a bad file is decoded once. The oldest entries are dropped past `max_entries`.
    """
    store: dict[Hashable, tuple[bool, object]] = st.session_state.setdefault(
        f"_memo_{namespace}", {})
    if key not in store:
        try:
            store[key] = (True, compute())
        except BusError as exc:
            store[key] = (False, exc)
        while len(store) > max_entries:
            store.pop(next(iter(store)))
    ok, value = store[key]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
