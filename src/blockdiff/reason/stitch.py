"""Stitching noisy diffusion thoughts: Sample -> Score -> Stitch -> Refine (ALGORITHMS.md §3).

Many cheap diffusion rollouts are each partly right; a step scorer finds the good steps wherever
they are, and an AR solver reads them (stitched, with their scores) and writes the answer. Costs
are counted per question so the result can be set against one long rollout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from ..decoding.request import DecodeSpec, as_spec
from ..eval import tasks as T
from .scorers import PRM_BAD, PRM_GOOD, StepScorer, prm_prompt
from .steps import Complete, Rollout, _glue, best_path, join_steps, majority, split_steps


def stitched_steps(
    rollouts: Sequence[Rollout], threshold: float = 0.9, cap: int = 80, agree: bool = False
) -> list[tuple[int, float, str]]:
    """(step index, score, text) for the stitched context: every step scoring above `threshold`,
    grouped by step index (best first within an index, each text once per index), at most `cap`,
    plus the best path's last step; with `agree`, only paths whose answer is the best path's."""
    best = best_path(rollouts)
    pool = [r for r in rollouts if not agree or r.answer == best.answer]
    seen: dict[tuple[int, str], float] = {}
    for r in pool:
        for i, (s, c) in enumerate(zip(r.steps, r.scores, strict=True)):
            if c > threshold and c > seen.get((i, s), -1.0):
                seen[(i, s)] = c
    order = lambda x: (x[0], -x[1])  # noqa: E731
    lines = sorted(((i, c, s) for (i, s), c in seen.items()), key=order)[:cap]
    if best.steps:
        last = (len(best.steps) - 1, best.scores[-1], best.steps[-1])
        if all((i, s) != (last[0], last[2]) for i, _, s in lines):
            lines = sorted([*lines[: cap - 1], last], key=order)
    return lines


def stitch_prompt(prompt: str, lines: Sequence[tuple[int, float, str]]) -> str:
    """The solver's input: one "i: [c=0.xx] step" line per stitched step (i = the step's index,
    1-based: which step it is matters where steps look alike, e.g. grid rows), then the question as
    the task asks it (so the answer follows the question exactly as in plain training rows)."""
    return "".join(f"{i + 1}: [c={c:.2f}] {s}\n" for i, c, s in lines) + prompt


def fit_lines(
    prompt: str, lines: list[tuple[int, float, str]], tok, limit: int | None
) -> list[tuple[int, float, str]]:
    """Drop the lowest-scoring stitched lines until the solver's prompt has at most `limit`
    tokens (the same rule for the solver's training data and at test time)."""
    lines = list(lines)
    while limit is not None and lines and len(tok.encode(stitch_prompt(prompt, lines))) > limit:
        lines.remove(min(lines, key=lambda x: x[1]))
    return lines


def diffusion_completer(
    model, tok, sampler: str | DecodeSpec, new_tokens: int | None, batch_size: int, **kw
) -> Complete:
    """Decode prompts with a diffusion sampler. Prompt j gets its own random stream (seed *
    1000003 + j), so a row's text never depends on the other rows of the call. A global-block model
    (MDLM-style) reads the canvas length as a cue, so by default its canvas ends where its
    training rows ended; rows are batched by prompt length for that."""
    from ..decoding import decode_all

    base = as_spec(model, sampler, None, 0, kw)  # the length per prompt group, the seed per call
    cfg = model.config
    rows_len = cfg.train_seq_len if cfg.has_global_block and cfg.train_seq_len else None
    if new_tokens is None and rows_len is None:
        raise ValueError("give new_tokens: the model has no global block whose row length to fill")

    def complete(prompts: list[str], seed: int) -> list[tuple[str, int]]:
        out: list[tuple[str, int] | None] = [None] * len(prompts)
        groups: dict[int, list[int]] = {}
        for j, p in enumerate(prompts):
            n = new_tokens if new_tokens is not None else rows_len - len(tok.encode(p))
            if n < 1:
                raise ValueError(f"the prompt fills the model's {rows_len}-token rows: {p[:60]!r}")
            groups.setdefault(n, []).append(j)
        for n, js in groups.items():
            spec = replace(base.with_length(model, n), seed=seed)
            texts, _, rows, _ = decode_all(model, tok, [prompts[j] for j in js], spec, batch_size, index=js)
            for j, t, r in zip(js, texts, rows, strict=True):
                out[j] = (t, r.nfe)
        return out  # type: ignore[return-value]

    return complete


def mc_labels(
    task: str,
    its: Sequence[T.Item],
    rollouts: Sequence[Sequence[Rollout]],
    complete: Complete,
    k: int,
    sep: str,
    seed: int = 0,
) -> list[dict]:
    """Math-Shepherd-style step labels: from each step prefix, `k` completions by the policy,
    checked by the task's checker; value = the fraction that reach a correct answer, label "+"
    when any does (hard estimation). A prefix that is already a correct solution is worth 1 with
    no completion (continuing it could only spoil it). Returns PRM training pairs, value beside."""
    prompts, keys = [], []
    for q, (it, rs) in enumerate(zip(its, rollouts, strict=True)):
        for r in rs:
            for i in range(len(r.steps)):
                solved = T.score(task, it, join_steps(r.steps[: i + 1], sep)) == 1.0
                prefix = it.prompt + join_steps(r.steps[: i + 1], sep) + _glue(sep)
                keys.append((q, r.steps[: i + 1], prefix, None if solved else len(prompts)))
                prompts += [] if solved else [prefix] * k
    done = complete(prompts, seed) if prompts else []
    out = []
    for q, steps, prefix, at in keys:
        it = its[q]
        if at is None:
            value = 1.0
        else:
            tails = done[at : at + k]
            value = sum(T.score(task, it, prefix[len(it.prompt) :] + t) == 1.0 for t, _ in tails) / k
        label = PRM_GOOD if value > 0 else PRM_BAD
        out.append({"prompt": prm_prompt(it.prompt, steps, sep), "answer": label, "value": value})
    return out


@dataclass
class Cost:
    rollout_nfe: int = 0  # diffusion NFEs summed over rollouts
    rollout_nfe_max: int = 0  # the longest rollout's NFEs (latency when rollouts run in parallel)
    scorer_forwards: int = 0
    solver_tokens: int = 0
    solver_nfe: int = 0
    seconds: float = 0.0


@dataclass
class Record:
    """One question under one method: the chosen text, its score, and what it cost."""

    method: str
    text: str
    correct: bool
    cost: Cost


def sample_rollouts(
    its: Sequence[T.Item], complete: Complete, n: int, sep: str, seed: int = 0
) -> list[list[Rollout]]:
    """n rollouts per question, all questions batched together, each row its own random stream."""
    prompts = [it.prompt for it in its for _ in range(n)]
    done = complete(prompts, seed)
    return [
        [Rollout(t, split_steps(t, sep), nfe) for t, nfe in done[q * n : (q + 1) * n]]
        for q in range(len(its))
    ]


def solve(
    model, tok, prompts: list[str], new_tokens: int, batch_size: int = 32
) -> list[tuple[str, int, int]]:
    """The AR solver: greedy `ar` decoding; (text, generated tokens, NFEs) per prompt."""
    from ..decoding import decode_all

    spec = DecodeSpec.build(model, "ar", new_tokens, 0, temperature=0.0)
    texts, _, rows, _ = decode_all(model, tok, prompts, spec, batch_size)
    return [(t, r.tokens, r.nfe) for t, r in zip(texts, rows, strict=True)]


def run_stitching(
    task: str,
    its: Sequence[T.Item],
    complete: Complete,
    n_rollouts: int,
    sep: str,
    seed: int,
    scorers: Sequence[StepScorer],
    solver: tuple[object, object] | None,
    *,
    long_complete: Complete | None = None,
    **settings,
) -> dict[str, list[Record]]:
    """Sample -> Score -> Stitch -> Refine on `its`, every method on the same rollouts, with the
    rollouts' wall time and (`long_complete`: one greedy long rollout per question) the
    reference cost; `settings` as for `evaluate_stitching`."""
    t = time.perf_counter()
    rolls = sample_rollouts(its, complete, n_rollouts, sep, seed)
    secs = time.perf_counter() - t
    long = None
    if long_complete is not None:
        t = time.perf_counter()
        long = ([r[0] for r in sample_rollouts(its, long_complete, 1, sep, seed)], time.perf_counter() - t)
    return evaluate_stitching(
        task, its, rolls, scorers, solver, sep, rollout_seconds=secs, long=long, **settings
    )


def evaluate_stitching(
    task: str,
    its: Sequence[T.Item],
    rollouts: list[list[Rollout]],
    scorers: Sequence[StepScorer],
    solver: tuple[object, object] | None,
    sep: str,
    *,
    threshold: float = 0.9,
    cap: int = 80,
    agree: bool = False,
    solver_tokens: int = 64,
    rollout_seconds: float = 0.0,
    alone: tuple[object, object] | None = None,
    long: tuple[list[Rollout], float] | None = None,
) -> dict[str, list[Record]]:
    """Every method on the same rollouts: single rollout (the first), majority vote, best-of-N by
    each scorer, stitching with each scorer (when a solver is given), an AR model alone on the
    plain question (`alone`, default the solver), and one long rollout per question (`long`: the
    rollouts and their seconds) for the cost comparison."""
    base = [
        Cost(sum(r.nfe for r in rs), max(r.nfe for r in rs), seconds=rollout_seconds / max(1, len(its)))
        for rs in rollouts
    ]

    def rec(method: str, it: T.Item, text: str, cost: Cost) -> Record:
        return Record(method, text, T.score(task, it, text) == 1.0, cost)

    out: dict[str, list[Record]] = {
        "single rollout": [
            rec("single rollout", it, rs[0].text, Cost(rs[0].nfe, rs[0].nfe, seconds=b.seconds / len(rs)))
            for it, rs, b in zip(its, rollouts, base, strict=True)
        ],
        "majority vote": [
            rec("majority vote", it, majority(rs).text, b)
            for it, rs, b in zip(its, rollouts, base, strict=True)
        ],
    }
    if long is not None:
        per_long = long[1] / max(1, len(its))
        out["one long rollout"] = [
            rec("one long rollout", it, r.text, Cost(r.nfe, r.nfe, seconds=per_long))
            for it, r in zip(its, long[0], strict=True)
        ]
    for sc in scorers:
        t0 = time.perf_counter()
        scored = []
        for it, rs in zip(its, rollouts, strict=True):
            f = sc.forwards
            s = sc.score(it, rs, sep)
            rs = [Rollout(r.text, r.steps, r.nfe, v) for r, v in zip(rs, s, strict=True)]
            scored.append((rs, sc.forwards - f))
        per_q = (time.perf_counter() - t0) / max(1, len(its))
        out[f"best-of-N, {sc.name}"] = [
            rec(
                f"best-of-N, {sc.name}",
                it,
                best_path(rs).text,
                Cost(b.rollout_nfe, b.rollout_nfe_max, fw, seconds=b.seconds + per_q),
            )
            for it, (rs, fw), b in zip(its, scored, base, strict=True)
        ]
        if solver is not None:
            t1 = time.perf_counter()
            model, tok = solver
            room = model.config.max_position_embeddings - solver_tokens
            prompts = [
                stitch_prompt(
                    it.prompt, fit_lines(it.prompt, stitched_steps(rs, threshold, cap, agree), tok, room)
                )
                for it, (rs, _) in zip(its, scored, strict=True)
            ]
            done = solve(*solver, prompts, solver_tokens)
            per_s = (time.perf_counter() - t1) / max(1, len(its))
            out[f"stitch, {sc.name}"] = [
                rec(
                    f"stitch, {sc.name}",
                    it,
                    text,
                    Cost(b.rollout_nfe, b.rollout_nfe_max, fw, ntok, nfe, b.seconds + per_q + per_s),
                )
                for it, (_, fw), b, (text, ntok, nfe) in zip(its, scored, base, done, strict=True)
            ]
    alone = alone or solver
    if alone is not None:
        t2 = time.perf_counter()
        done = solve(*alone, [it.prompt for it in its], solver_tokens)
        per = (time.perf_counter() - t2) / max(1, len(its))
        out["AR model alone"] = [
            rec("AR model alone", it, text, Cost(solver_tokens=ntok, solver_nfe=nfe, seconds=per))
            for it, (text, ntok, nfe) in zip(its, done, strict=True)
        ]
    return out


def summary(results: dict[str, list[Record]]) -> list[dict]:
    """One row per method: accuracy and mean costs per question."""
    rows = []
    for method, recs in results.items():
        n = len(recs)
        means = {k: round(sum(getattr(r.cost, k) for r in recs) / n, 5) for k in asdict(Cost())}
        rows.append({"method": method, "n": n, "accuracy": sum(r.correct for r in recs) / n, **means})
    return rows


def prm_data(
    task: str, its: Sequence[T.Item], complete: Complete, rollouts: int, k: int, sep: str, seed: int = 0
) -> list[dict]:
    """PRM training pairs for training questions: the policy's own rollouts, labelled per step by
    `k` Monte-Carlo completions each (see `mc_labels`)."""
    rolls = sample_rollouts(its, complete, rollouts, sep, seed)
    return mc_labels(task, its, rolls, complete, k, sep, seed + 1)


def solver_data(
    its: Sequence[T.Item],
    rollouts: list[list[Rollout]],
    scorer: StepScorer,
    sep: str,
    *,
    threshold: float = 0.9,
    cap: int = 80,
    agree: bool = False,
    tok=None,
    max_prompt_tokens: int | None = None,
) -> list[dict]:
    """Training pairs for a stitch-reading solver: the stitched context of scored rollouts of a
    training question as the prompt (fitted to `max_prompt_tokens` as at test time), the
    reference answer as the target."""
    out = []
    for it, rs in zip(its, rollouts, strict=True):
        s = scorer.score(it, rs, sep)
        scored = [Rollout(r.text, r.steps, r.nfe, v) for r, v in zip(rs, s, strict=True)]
        lines = fit_lines(it.prompt, stitched_steps(scored, threshold, cap, agree), tok, max_prompt_tokens)
        out.append({"prompt": stitch_prompt(it.prompt, lines), "answer": it.answer})
    return out
