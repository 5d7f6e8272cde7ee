"""Tasks: a world, its toolbox and one question, as a pure function of (split, seed).

Held-out split: training data is drawn from the "train" stream, evaluation from the "eval" stream
(eval:0..EVAL_POOL-1); the two seed streams are disjoint strings, and `is_held_out` lets training
data skip anything that matches an evaluation question anyway.
"""

from __future__ import annotations

import random
from functools import lru_cache

from .tools import Toolbox
from .world import EVAL_POOL, SPLITS, Task, make_question, make_world


def make_task(split: str, seed: int | str) -> Task:
    """Task `seed` of a split: a world and one question, a pure function of (split, seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; splits: {', '.join(SPLITS)}")
    if split == "eval" and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < EVAL_POOL):
        # one rule for every face (CLI, evaluation, HTTP): the held-out pool is eval:0..EVAL_POOL-1
        raise ValueError(f"a held-out task is an index in [0, {EVAL_POOL}), got {seed!r}")
    rng = random.Random(f"blockdiff-agent:{split}:{seed}")
    world = make_world(rng)
    box = Toolbox(world)
    question = make_question(world, rng, box.finds)
    return Task(split, str(seed), world, question)


def eval_tasks(n: int) -> list[Task]:
    """The held-out evaluation tasks eval:0..n-1 (a fixed set; never training data)."""
    return [make_task("eval", i) for i in range(n)]


def train_tasks(n: int, seed: int = 0) -> list[Task]:
    """n training tasks from stream `seed`, skipping any that matches a held-out question."""
    out, i = [], 0
    while len(out) < n:
        t = make_task("train", f"{seed}:{i}")
        i += 1
        if not is_held_out(t):
            out.append(t)
    return out


@lru_cache(maxsize=1)
def _held_out_questions() -> frozenset[str]:
    return frozenset(t.question.text for t in eval_tasks(EVAL_POOL))


def is_held_out(task: Task) -> bool:
    """Whether a task asks one of the held-out evaluation questions (same text)."""
    return task.question.text in _held_out_questions()
