"""The per-session memo caches: remembered values, remembered errors, entry and byte limits."""

from __future__ import annotations

import numpy as np
import pytest

from bus_core.errors import InvalidImageError
from ui import state
from ui.uploads import Upload


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch) -> dict:
    fake: dict = {}
    monkeypatch.setattr(state.st, "session_state", fake)
    return fake


def test_value_and_error_computed_once(session: dict) -> None:
    calls = []

    def compute() -> int:
        calls.append(1)
        return 7

    assert state.memo("n", "k", compute) == 7
    assert state.memo("n", "k", compute) == 7
    assert len(calls) == 1

    def fail() -> int:
        calls.append(1)
        raise InvalidImageError("bad file")

    for _ in range(2):
        with pytest.raises(InvalidImageError, match="bad file"):
            state.memo("n", "bad", fail)
    assert len(calls) == 2


def test_entry_limit_drops_the_oldest(session: dict) -> None:
    for i in range(4):
        state.memo("n", i, lambda i=i: i, max_entries=2)
    assert list(session["_memo_n"]) == [2, 3]


def test_session_byte_budget_spans_namespaces(session: dict,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "SESSION_BUDGET_BYTES", 2500)
    state.memo("a", 1, lambda: np.zeros(1000, np.uint8))
    state.memo("b", 1, lambda: Upload("x.png", "k", image=np.zeros(1000, np.uint8)))
    assert 1 in session["_memo_a"] and 1 in session["_memo_b"]
    state.memo("a", 2, lambda: np.zeros(1000, np.uint8))  # 3000 bytes: the oldest goes
    assert 1 not in session["_memo_a"]
    assert 1 in session["_memo_b"] and 2 in session["_memo_a"]
    state.memo("b", 2, lambda: np.zeros(10_000, np.uint8))  # alone over the budget: kept
    assert list(session["_memo_b"]) == [2] and not session["_memo_a"]


def test_nbytes_looks_into_containers() -> None:
    upload = Upload("x", "k", image=np.zeros((2, 3, 3), np.uint8))
    assert state.nbytes(upload) == 18
    assert state.nbytes(({"a": b"1234"}, [np.zeros(2, np.int32)], "text")) == 12


def test_widget_values_are_put_back_after_a_run_that_did_not_draw_them(session: dict) -> None:
    session.update({"train_epochs": 3, "train_start": True, "other": 1})
    state.keep_widget_state("_form", ("train_",), skip=("train_start",))
    assert session["_form"] == {"train_epochs": 3}
    del session["train_epochs"], session["train_start"]  # the form was not drawn: forgotten
    state.keep_widget_state("_form", ("train_",), skip=("train_start",))
    assert session["train_epochs"] == 3 and "train_start" not in session
    session["train_epochs"] = 5  # changed by the user later
    state.keep_widget_state("_form", ("train_",), skip=("train_start",))
    assert session["_form"]["train_epochs"] == 5
