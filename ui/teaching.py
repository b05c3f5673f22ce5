"""The state of a teaching session: the order of the cases, the current one, and the scores.
Plain Python (no Streamlit) so the page keeps one in st.session_state."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Score:
    """Correct answers out of the cases answered."""

    correct: int = 0
    total: int = 0

    def add(self, right: bool) -> None:
        """Count one more answer."""
        self.correct += int(right)
        self.total += 1

    def __str__(self) -> str:
        return f"{self.correct} / {self.total}"


@dataclass
class TeachingSession:
    """Cases of one dataset in a random order; the learner's and the model's scores."""

    source: str
    order: list[int]
    position: int = 0
    answer: str | None = None
    model_label: str | None = None
    learner: Score = field(default_factory=Score)
    model: Score = field(default_factory=Score)

    @classmethod
    def new(cls, source: str, n_cases: int, seed: int | None = None) -> TeachingSession:
        """A session over `n_cases` cases of `source` in a shuffled order."""
        order = list(range(n_cases))
        random.Random(seed).shuffle(order)
        return cls(source, order)

    @property
    def current(self) -> int:
        """The index (in the dataset) of the case on screen."""
        return self.order[self.position % len(self.order)]

    @property
    def revealed(self) -> bool:
        """True once the learner has answered the current case."""
        return self.answer is not None

    def check(self, answer: str, truth: str, model_label: str | None) -> None:
        """Record the learner's answer (and the model's, if any) for the current case."""
        if self.revealed:
            return
        self.answer, self.model_label = answer, model_label
        self.learner.add(answer == truth)
        if model_label is not None:
            self.model.add(model_label == truth)

    def next_case(self) -> None:
        """Move on to the next case (the order starts again after the last one)."""
        self.position += 1
        self.answer = self.model_label = None
