"""Per-session memo caches: results kept in st.session_state so a rerun (a slider moved, a
widget touched) reuses decoded images, predictions and CAM maps instead of recomputing them."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Collection, Hashable
from typing import TypeVar

import numpy as np
import streamlit as st

from bus_core.errors import BusError

T = TypeVar("T")

SESSION_BUDGET_BYTES: int = 256 * 1024 * 1024
"""Most array and byte data all memo caches of one session keep together; the oldest entries
(of any namespace) are dropped beyond it."""
_ORDER = "_memo_order"


def digest(data: bytes | np.ndarray) -> str:
    """A short content hash of bytes or an array (shape and dtype included)."""
    h = hashlib.sha1()
    if isinstance(data, np.ndarray):
        h.update(f"{data.shape}{data.dtype}".encode())
        data = np.ascontiguousarray(data).tobytes()
    h.update(data)
    return h.hexdigest()[:16]


def keep_widget_state(store: str, prefixes: tuple[str, ...], skip: Collection[str] = ()) -> None:
    """Keep the values of the widgets whose keys start with `prefixes` (but not those in
    `skip`, e.g. buttons) while a page does not draw them: Streamlit forgets the state of a
    widget that is not drawn in a run and would show its default again. The values are copied
    to `st.session_state[store]` on every run and put back when forgotten. Call it at the top
    of the page."""
    saved: dict[str, object] = st.session_state.setdefault(store, {})
    for key, value in saved.items():
        if key not in st.session_state:
            st.session_state[key] = value
    saved.update({key: st.session_state[key] for key in list(st.session_state)
                  if str(key).startswith(prefixes) and key not in skip})


def nbytes(value: object) -> int:
    """Approximate bytes held by the arrays and byte strings in `value` (looking into tuples,
    lists, dicts and dataclasses)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def memo(namespace: str, key: Hashable, compute: Callable[[], T], max_entries: int = 32) -> T:
    """`compute()`, remembered in this session under (namespace, key).

    A `BusError` is remembered too and raised again on every later call with the same key,
    so a bad file is decoded once. The oldest entries are dropped past `max_entries` in the
    namespace, and across namespaces while the session keeps more than
    `SESSION_BUDGET_BYTES` (the newest entry always stays).
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
        _keep_within_budget(namespace, key, nbytes(store[key][1]))
    ok, value = store[key]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def _keep_within_budget(namespace: str, key: Hashable, size: int) -> None:
    """Record the new entry's size and drop the session's oldest entries beyond the budget."""
    order: dict[tuple[str, Hashable], int] = st.session_state.setdefault(_ORDER, {})
    order[(namespace, key)] = size
    for (space, old), _ in list(order.items()):
        store = st.session_state.get(f"_memo_{space}", {})
        if old not in store:  # dropped by its namespace's entry limit
            order.pop((space, old))
    while sum(order.values()) > SESSION_BUDGET_BYTES and len(order) > 1:
        space, old = next(iter(order))
        order.pop((space, old))
        st.session_state.get(f"_memo_{space}", {}).pop(old, None)
