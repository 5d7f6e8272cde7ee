"""Step scorers: each scores every step of every rollout of a question and counts its forwards.
`OracleScorer` (the task's own step checker: an upper bound), `LogProbScorer` (an AR path's
log-probabilities), `PRMScorer` (a trained process reward model's P(+)); `make_scorer` reads
the CLI's spec."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..eval import tasks as T
from ..objectives import ar_logprobs
from .steps import Rollout, join_steps


class StepScorer(Protocol):
    """Scores every step of every rollout of one question; counts its forwards."""

    name: str
    forwards: int

    def score(self, item: T.Item, rollouts: Sequence[Rollout], sep: str) -> list[list[float]]: ...


@torch.no_grad()
def _causal_logits(model, ids: list[list[int]]) -> list[torch.Tensor]:
    """Raw logits [len, V] of each row under the model's causal path, rows of equal length batched."""
    from ..masks import block_causal

    if not model.config.shifted:
        raise ValueError(
            "this scorer reads next-token probabilities: it needs a model with an AR path "
            "(logits: shifted, trained with block size 1 or an AR loss)"
        )
    dev = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(ids)
    by_len: dict[int, list[int]] = {}
    for j, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(j)
    for n, js in by_len.items():
        for k in range(0, len(js), 64):
            chunk = js[k : k + 64]
            x = torch.tensor([ids[j] for j in chunk], device=dev)
            logits = model(x, mask=block_causal(n, 1, len(chunk)).to(dev)).float()
            for j, row in zip(chunk, logits, strict=True):
                out[j] = row
    return out  # type: ignore[return-value]


@dataclass
class OracleScorer:
    """The task's own check of intermediate states: an upper bound, never a result."""

    task: str
    name: str = "oracle (upper bound)"
    forwards: int = 0

    def score(self, item: T.Item, rollouts: Sequence[Rollout], sep: str) -> list[list[float]]:
        return [[float(v) for v in T.valid_steps(self.task, item, r.steps)] for r in rollouts]


@dataclass
class LogProbScorer:
    """No training: the AR model's geometric-mean probability of a step's tokens given the question
    and the steps before it (how unsurprising the step is to the AR path)."""

    model: object
    tok: object
    name: str = "AR log-prob"
    forwards: int = 0

    def score(self, item: T.Item, rollouts: Sequence[Rollout], sep: str) -> list[list[float]]:
        rows, spans = [], []
        for r in rollouts:
            ends = [
                len(self.tok.encode(item.prompt + join_steps(r.steps[:i], sep)))
                for i in range(1, len(r.steps) + 1)
            ]
            starts = [len(self.tok.encode(item.prompt)), *ends[:-1]][: len(ends)]  # a step owns its separator
            rows.append(self.tok.encode(item.prompt + join_steps(r.steps, sep)))
            spans.append(list(zip(starts, ends, strict=True)))
        starts = [b[0][0] if b else len(ids) for ids, b in zip(rows, spans, strict=True)]
        scored = ar_logprobs(self.model, rows, starts, self.tok.eos_id) if rows else []
        self.forwards += len(rows)
        return [
            [math.exp(float(lp[a - s : b - s].sum()) / max(1, b - a)) for a, b in bounds]
            for (lp, _), bounds, s in zip(scored, spans, starts, strict=True)
        ]


PRM_QUERY, PRM_GOOD, PRM_BAD = "?", "+", "-"


def prm_prompt(prompt: str, steps: Sequence[str], sep: str) -> str:
    """The PRM's input for the last of `steps`: the question, the steps so far, and the query mark;
    the PRM answers "+" (a correct answer is still reachable) or "-"."""
    return prompt + join_steps(steps, sep) + PRM_QUERY


@dataclass
class PRMScorer:
    """A learned process reward model: a blockdiff AR model trained to answer "+"/"-" after each
    step (labels by Monte-Carlo rollouts, `mc_labels`); the score is P(+) / (P(+) + P(-))."""

    model: object
    tok: object
    name: str = "learned PRM"
    forwards: int = 0

    def score(self, item: T.Item, rollouts: Sequence[Rollout], sep: str) -> list[list[float]]:
        good, bad = (_single_token(self.tok, x) for x in (PRM_GOOD, PRM_BAD))
        rows = [
            self.tok.encode(prm_prompt(item.prompt, r.steps[: i + 1], sep))
            for r in rollouts
            for i in range(len(r.steps))
        ]
        logits = _causal_logits(self.model, rows) if rows else []
        self.forwards += len(rows)
        flat = [float(torch.softmax(lg[-1, [good, bad]], -1)[0]) for lg in logits]
        out, k = [], 0
        for r in rollouts:
            out.append(flat[k : k + len(r.steps)])
            k += len(r.steps)
        return out


def _single_token(tok, s: str) -> int:
    ids = tok.encode(s)
    if len(ids) != 1:
        raise ValueError(f"the PRM's label {s!r} must be one token of its tokenizer, got {ids}")
    return ids[0]


def _oracle(task: str, where: str, load: Callable[[str], tuple[object, object]]) -> StepScorer:
    if task not in T.STEPPED:
        raise ValueError(f"{task} has no checkable intermediate steps; tasks that do: {', '.join(T.STEPPED)}")
    return OracleScorer(task)


# name -> (needs a model, factory(task, MODEL, load)): a new scorer is one entry
SCORERS: dict[str, tuple[bool, Callable[..., StepScorer]]] = {
    "oracle": (False, _oracle),
    "logprob": (True, lambda task, where, load: LogProbScorer(*load(where))),
    "prm": (True, lambda task, where, load: PRMScorer(*load(where))),
}


def make_scorer(spec: str, task: str, load: Callable[[str], tuple[object, object]]) -> StepScorer:
    """A scorer from its CLI spec: "oracle", "logprob:MODEL" or "prm:MODEL" (`load` opens MODEL)."""
    kind, _, where = spec.partition(":")
    needs_model, make = SCORERS.get(kind, (None, None))
    if make is None or needs_model != bool(where):
        forms = ", ".join(f"{k}:MODEL" if m else k for k, (m, _) in SCORERS.items())
        raise ValueError(f"unknown scorer {spec!r}: use {forms}")
    return make(task, where, load)
