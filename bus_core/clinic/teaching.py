"""The state of a teaching session: the order of the cases, the current one, and the scores.
Plain Python: the Teaching page keeps one in its state, and as a short token (in
the page address) so a reload keeps the learner's place and scores."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

from bus_core.constants import CLASSES


@dataclass
class Score:
    """Correct answers out of the cases answered; `no_answer` of those got none (an uncertain
    model reading counts as answered and not correct)."""

    correct: int = 0
    total: int = 0
    no_answer: int = 0

    def add(self, right: bool, *, answered: bool = True) -> None:
        """Count one more case: right or wrong, or without an answer."""
        self.correct += int(right and answered)
        self.total += 1
        self.no_answer += int(not answered)

    def __str__(self) -> str:
        return f"{self.correct} / {self.total}" + (
            f" ({self.no_answer} no answer)" if self.no_answer else "")


@dataclass
class TeachingSession:
    """Cases of one source (dataset and subset) in a random order drawn from `seed`; the
    learner's and the model's scores."""

    source: str
    order: list[int]
    seed: int = 0
    position: int = 0
    answer: str | None = None
    learner: Score = field(default_factory=Score)
    model: Score = field(default_factory=Score)

    @classmethod
    def new(cls, source: str, n_cases: int, seed: int | None = None) -> TeachingSession:
        """A session over `n_cases` cases of `source` in a shuffled order."""
        seed = random.randrange(2 ** 31) if seed is None else seed
        return cls(source, _order(n_cases, seed), seed)

    @property
    def current(self) -> int:
        """The index (in the dataset) of the case on screen."""
        return self.order[self.position % len(self.order)]

    @property
    def revealed(self) -> bool:
        """True once the learner has answered the current case."""
        return self.answer is not None

    def check(self, answer: str, truth: str, model_label: str | None,
              model_uncertain: bool = False) -> None:
        """Record the learner's answer and the model's reading of the current case (None: no
        model, not scored; `model_uncertain`: the model gave no answer, scored as such)."""
        if self.revealed:
            return
        self.answer = answer
        self.learner.add(answer == truth)
        if model_label is not None:
            self.model.add(model_label == truth, answered=not model_uncertain)

    def next_case(self) -> None:
        """Move on to the next case (the order starts again after the last one)."""
        self.position += 1
        self.answer = None

    def token(self) -> str:
        """The session as a short text (source check, seed, place, answer, scores)."""
        answer = CLASSES.index(self.answer) if self.answer in CLASSES else "x"
        numbers = (self.seed, self.position, self.learner.correct, self.learner.total,
                   self.model.correct, self.model.total, self.model.no_answer)
        return "-".join([_source_tag(self.source), str(answer), *map(str, numbers)])

    @classmethod
    def from_token(cls, source: str, n_cases: int, token: str) -> TeachingSession | None:
        """The session `token` describes, if it was made for `source`; None otherwise (or when
        the token is damaged)."""
        parts = token.split("-")
        if len(parts) != 9 or parts[0] != _source_tag(source) or n_cases < 1:
            return None
        try:
            seed, position, lc, lt, mc, mt, mn = (int(p) for p in parts[2:])
            answer = None if parts[1] == "x" else CLASSES[int(parts[1])]
        except (ValueError, IndexError):
            return None
        if min(seed, position, lc, lt, mc, mt, mn) < 0 or lc > lt or mc + mn > mt:
            return None
        return cls(source, _order(n_cases, seed), seed, position, answer,
                   Score(lc, lt), Score(mc, mt, mn))


def _order(n_cases: int, seed: int) -> list[int]:
    order = list(range(n_cases))
    random.Random(seed).shuffle(order)
    return order


def _source_tag(source: str) -> str:
    return f"{zlib.crc32(source.encode()):08x}"
