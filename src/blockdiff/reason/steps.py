"""Reasoning traces as steps: splitting a text into steps, a rollout's scored steps, and the
paths a scorer's step scores pick (ALGORITHMS.md §3)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def split_steps(text: str, sep: str = "\n") -> list[str]:
    """A rollout's steps: pieces between `sep` (a string; "sentences"; or "chunks:N", N characters
    each, for answers without separators such as a grid's digits), stripped, empty dropped."""
    if sep.startswith("chunks:"):
        n, text = _chunk(sep), text.strip()
        return [text[i : i + n] for i in range(0, len(text), n)]
    parts = _SENTENCE.split(text) if sep == "sentences" else text.split(sep)
    return [p.strip() for p in parts if p.strip()]


def _chunk(sep: str) -> int:
    n = sep.removeprefix("chunks:")
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"splitter {sep!r}: chunks:N needs a width N >= 1")
    return int(n)


def _glue(sep: str) -> str:
    """What goes between two steps when they are written back."""
    return " " if sep == "sentences" else "" if sep.startswith("chunks:") else sep


def join_steps(steps: Sequence[str], sep: str = "\n") -> str:
    return _glue(sep).join(steps)


def path_score(scores: Sequence[float]) -> float:
    """Geometric mean of a path's step scores (0 for a path with no steps): one bad step sinks it."""
    if not scores:
        return 0.0
    if min(scores) <= 0.0:
        return 0.0
    return math.exp(sum(math.log(s) for s in scores) / len(scores))


@dataclass
class Rollout:
    text: str
    steps: list[str]
    nfe: int
    scores: list[float] = field(default_factory=list)

    @property
    def answer(self) -> str:
        """What a vote compares: the whole solution, whitespace-normalised."""
        return " ".join(self.text.split())

    @property
    def score(self) -> float:
        return path_score(self.scores)


def best_path(rollouts: Sequence[Rollout]) -> Rollout:
    """The rollout with the highest geometric-mean step score (first one on ties)."""
    return max(rollouts, key=lambda r: r.score)


def majority(rollouts: Sequence[Rollout]) -> Rollout:
    """The first rollout whose answer is the most common one (empty answers never win if others exist)."""
    votes = Counter(r.answer for r in rollouts if r.answer) or Counter(r.answer for r in rollouts)
    top = votes.most_common(1)[0][0]
    return next(r for r in rollouts if r.answer == top)


Complete = Callable[[list[str], int], list[tuple[str, int]]]  # (prompts, seed) -> (text, NFEs)
