"""One canvas loop; every sampler is a named composition of policies (a `Plan`).

region = window.region(canvas)          which block (or the whole canvas) is being decoded
runner.before_step(region)              the runner's refresh policy may refresh its cache
logits = runner.logits(region)          one forward = one NFE, cache handled by the runner
tokens, conf = sample(logits)           scoring
keep = commit.select(conf)              commit rule (or plan.expand grows the block instead)
for stage in plan.revise:               structural revision: remask, decode again as a plan

A step policy (`DenoiseStep`, or `speculative.SpecStep` when the plan speculates) does one
forward per call. `start_decoding` returns a `Decoding` that yields a `StepEvent` per step
(committed, remasked, NFEs, finished rows) and can `cancel(row)`; `generate` runs it to the end.
The engine knows no sampler by name and no window by type: what differs is in the plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..model import BlockDiffLM
from ..tokenizer import Tokenizer
from .canvas import Canvas, RowStats
from .policies import PROB, Plan, Recheck, sample
from .request import DEFAULT_SAMPLER, DecodeSpec
from .runner import Runner
from .samplers import PLANS, SAMPLERS, build_plan
from .speculative import SpecStep

__all__ = ["PLANS", "SAMPLERS", "Decoding", "GenerateOutput", "StepEvent", "generate", "start_decoding"]


@dataclass
class GenerateOutput:
    texts: list[str]
    rows: list[RowStats]
    tokens: list[list[int]]
    canvas: Canvas
    notes: list[str] = field(default_factory=list)


# ---- the loop ----------------------------------------------------------------------------------


def _stepper(model, c: Canvas, plan: Plan, gens) -> DenoiseStep | SpecStep:
    runner = Runner(model, c, plan.attn_block is not None, plan.cache, plan.refresh)
    if plan.spec is not None:
        return SpecStep(c, runner, plan, gens, DenoiseStep)
    return DenoiseStep(c, runner, plan, gens)


def _steps(model, c: Canvas, plan: Plan, gens, stepper=None) -> Iterator[None]:
    """The loop: one step policy call = one forward (NFE) and what it commits; then the
    structural revision stages (remask, decode again), each remask yielded as a step too."""
    stepper = stepper or _stepper(model, c, plan, gens)
    while stepper.step():
        yield
    for stage in _revision_stages(c, plan, gens):
        yield  # the remask
        yield from _steps(model, c, stage, gens)


def _decode(model, c: Canvas, plan: Plan, gens, on_step=None) -> None:
    for _ in _steps(model, c, plan, gens):
        if on_step is not None:
            on_step(c)


class DenoiseStep:
    """A step of masked denoising: window -> logits -> sample -> commit (or DCD expansion).

    Knows no sampler: the window says where to decode, the commit rule what to keep, the plan's
    `expand` stage whether a block grows instead, and the runner when its cache is refreshed."""

    def __init__(self, c: Canvas, runner: Runner, plan: Plan, gens):
        self.c, self.runner, self.plan, self.gens = c, runner, plan, gens
        self.block_causal = plan.attn_block is not None
        self.region, self.step_in_region, self.masks_at_start = None, 0, None
        self.extra = torch.zeros(c.batch, dtype=torch.long)  # DCD expansion so far in the block

    def step(self) -> bool:
        c, plan, runner, window = self.c, self.plan, self.runner, self.plan.window
        active = ~c.done()
        new_region = window.region(c, active) if active.any() else None
        if new_region is None:
            return False
        starts = self.region is None or new_region[0] != self.region[0]
        if starts:
            self.step_in_region, self.extra[:] = 0, 0
            self.masks_at_start = window.start_masks(c, new_region)
        self.region = region = new_region
        _, lo, hi = region
        runner.before_step(lo, hi, active, starts)
        cand = window.candidates(c, region) & active[:, None]
        cols_any = cand.any(0).nonzero().flatten()
        q_lo, q_hi = int(cols_any[0]), int(cols_any[-1]) + 1
        logits = runner.logits(q_lo, q_hi, frontier=lo if self.block_causal else 0, end=hi)
        c.step += 1
        rows_w, cols_w, toks_w, conf_w, steer_w = [], [], [], [], []
        for r in range(c.batch):
            cols = cand[r].nonzero().flatten()
            if len(cols) == 0:
                continue
            c.nfe[r] += 1
            row_logits = logits[r, cols - q_lo]
            steered = torch.zeros(len(cols), dtype=torch.bool)
            if plan.constraint is not None:
                top = row_logits.argmax(-1)
                row_logits = plan.constraint.mask(c, r, cols, row_logits)
                steered = torch.isneginf(row_logits.gather(-1, top[:, None])[:, 0])  # its top pick forbidden
            tok, conf = sample(row_logits, plan.temperature, plan.top_k, plan.top_p, self.gens[r], plan.score)
            keep = plan.commit.select(conf, self.step_in_region, int(self.masks_at_start[r]))
            if plan.constraint is not None and len(keep) > 1:  # jointly completable, or by confidence
                keep = keep[plan.constraint.admit(c, r, cols[keep], tok[keep], conf[keep])]
            if plan.score is not PROB:  # snapshot confidence is always the token's probability
                conf = row_logits.double().softmax(-1).gather(-1, tok[:, None])[:, 0]
            if plan.expand is not None and plan.expand.grow(
                c, r, region[0], conf[keep], self.extra, window.masks, plan.attn_block
            ):
                continue
            rows_w.append(torch.full((len(keep),), r))
            cols_w.append(cols[keep])
            toks_w.append(tok[keep])
            conf_w.append(conf[keep])
            steer_w.append(steered[keep])
        if rows_w:
            rows, cols, toks = torch.cat(rows_w), torch.cat(cols_w), torch.cat(toks_w)
            c.commit(rows, cols, toks, torch.cat(conf_w), torch.cat(steer_w))
            runner.committed(len(rows))
        self.step_in_region += 1
        return True

    def between_blocks(self) -> tuple[int, int] | None:
        """(block id, first column) of the block the next step starts, when the last step ended
        one (rows may join or leave here); None mid-block, before the first step, or at the end."""
        c = self.c
        active = ~c.done()
        nxt = self.plan.window.region(c, active) if active.any() else None
        if self.region is None or nxt is None or nxt[0] == self.region[0]:
            return None
        return nxt[0], nxt[1]

    def regrid(self, parts: list[tuple[DenoiseStep, list[int], int]]) -> None:
        """Become, in place, the rows of each part's step policy (between blocks: the next step
        starts a block, so only the per-row state moves)."""
        self.runner.regrid([(p.runner, rows, s) for p, rows, s in parts])
        self.extra = torch.cat([p.extra[rows] for p, rows, _ in parts])
        self.gens[:] = [p.gens[r] for p, rows, _ in parts for r in rows]


def _revision_stages(c: Canvas, plan: Plan, gens) -> Iterator[Plan]:
    """Structural revision: each stage remasks, then is decoded as a plan of its own."""
    for stage in plan.revise:
        stage.remask(c, gens)
        yield stage.plan(plan)


@dataclass
class StepEvent:
    """What one step changed: enough to rebuild the text and the statistics of every row."""

    step: int
    committed: list[tuple[int, int, int]]  # (row, canvas column, token)
    remasked: list[tuple[int, int]]  # (row, canvas column)
    nfe: list[int]  # per row, so far
    finished: list[int]  # rows that finished at this step
    steered: list[tuple[int, int]] = field(default_factory=list)  # committed where a constraint overruled


class Decoding:
    """A decode in progress: iterate for step events, `cancel(row)` to stop one row (the other
    rows decode exactly as they would have), `output()` for the result."""

    def __init__(self, model, tokenizer: Tokenizer, c: Canvas, plan: Plan, gens, notes: list[str]):
        self.tok, self.c, self.notes, self.plan = tokenizer, c, notes, plan
        self.stepper = _stepper(model, c, plan, gens)
        self._it = _steps(model, c, plan, gens, self.stepper)
        self.cancelled: set[int] = set()
        # Later stages may remask committed tokens: nothing is final before the decode ends.
        self.revises = bool(plan.revise)
        self.ended = False

    def cancel(self, row: int) -> None:
        c = self.c
        self.cancelled.add(row)
        left = c.masked[row].nonzero().flatten()
        if len(left):  # the row's text ends before its first undecided column; its work stops
            c.valid[row, int(left[0]) :] = False
        c.masked[row] = False
        if torch.isnan(c.finished_at[row]):
            c.finished_at[row] = time.perf_counter() - c.started

    def __iter__(self) -> Iterator[StepEvent]:
        c = self.c
        while True:
            masked, tokens, done = c.masked.clone(), c.tokens.clone(), c.done()
            with torch.no_grad():
                if next(self._it, StopIteration) is StopIteration:
                    self.ended = True
                    return
            com = (masked & ~c.masked) | ((tokens != c.tokens) & ~c.masked)
            rem = ~masked & c.masked
            steer = com & c.steered
            yield StepEvent(
                c.step,
                [(r, k, int(c.tokens[r, k])) for r, k in com.nonzero().tolist()],
                [tuple(x) for x in rem.nonzero().tolist()],
                c.nfe.tolist(),
                (~done & c.done()).nonzero().flatten().tolist(),
                [tuple(x) for x in steer.nonzero().tolist()],
            )

    def output(self) -> GenerateOutput:
        for _ in self:  # finish whatever is left
            pass
        c = self.c
        texts = [self.text(r) for r in range(c.batch)]
        toks = [c.generated(r).tolist() for r in range(c.batch)]
        return GenerateOutput(texts, c.stats(), toks, c, self.notes)

    def text(self, r: int) -> str:
        """Row r's text: its generated tokens, or for a prompt with blanks the whole text filled.
        A character cut by the end (EOS or the length limit inside its bytes) is dropped, not
        shown as U+FFFD."""
        c = self.c
        if (c.commit_step[r, : c.start[r]] > 0).any():
            ids = c.tokens[r, c.valid[r] & (torch.arange(c.T) < c.eos_at[r])].tolist()
        else:
            ids = c.generated(r).tolist()
        return self.tok.decode(ids).rstrip("\ufffd")

    def final_prefix(self, r: int) -> list[int]:
        """Row r's generated tokens that can no longer change: those before its first undecided
        column (before EOS), or none while a later stage may still remask them."""
        c = self.c
        if self.revises and not self.ended:
            return []
        g = int(c.start[r])
        left = c.masked[r, g:].nonzero()
        end = g + int(left[0]) if len(left) else c.T
        end = min(end, int(c.eos_at[r]))
        cols = torch.arange(g, max(g, end))
        return c.tokens[r, cols[c.valid[r, cols]]].tolist()


def check_length(model: BlockDiffLM, prompt_tokens: int, max_new_tokens: int) -> None:
    """A prompt and its answer must fit the model's context (checked before anything is built)."""
    limit = model.config.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens"
        )


def row_seeds(seed: int, rows: Iterable[int]) -> list[int]:
    """Each row's own random stream: what makes a row decode the same alone, in any batch, at
    any position (`generate`, the server's jobs and `decode_all` all seed through here)."""
    return [seed * 1_000_003 + r for r in rows]


def start_decoding(
    model: BlockDiffLM,
    tokenizer: Tokenizer,
    prompts: list[str] | str,
    sampler: str | DecodeSpec = DEFAULT_SAMPLER,
    max_new_tokens: int = 64,
    seed: int | list[int] | None = None,
    trace: bool = False,
    check: Callable[[str], int | None] | None = None,
    check_rounds: int = 2,
    **kwargs,
) -> Decoding:
    """A decode of a batch of prompts with a named sampler or a checked `DecodeSpec` (its
    sampler, options, length and seed), to be stepped through (see `Decoding`); `generate` runs
    one to the end. Arguments as for `generate`."""
    if isinstance(sampler, DecodeSpec):
        spec = sampler
        sampler, max_new_tokens, kwargs = spec.sampler, spec.max_new_tokens, {**spec.kwargs, **kwargs}
        seed = spec.seed if seed is None else seed
    seed = 0 if seed is None else seed
    if "gen_length" in kwargs:
        max_new_tokens = kwargs.pop("gen_length")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    notes: list[str] = []
    plan = build_plan(model, sampler, max_new_tokens, notes, kwargs)
    if check is not None:
        if isinstance(check_rounds, bool) or not isinstance(check_rounds, int) or check_rounds < 1:
            raise ValueError(f"check_rounds must be an integer >= 1, got {check_rounds!r}")
        plan.revise = [*plan.revise, Recheck(check, check_rounds, decode=tokenizer.decode)]
    cfg = model.config
    ids = [tokenizer.encode(p) for p in prompts]
    check_length(model, max((len(i) for i in ids), default=0), max_new_tokens)  # before allocating
    if plan.constraint is not None:
        if any(cfg.mask_token_id in i for i in ids):
            raise ValueError("a constraint applies to the answer: a prompt with blanks cannot take one")
        plan.constraint = plan.constraint.bind(tokenizer)
        plan.constraint.check_fits(max_new_tokens)
    grid = plan.window.grid_size()  # None: the whole canvas is one block
    c = Canvas.build(ids, max_new_tokens, cfg.mask_token_id, tokenizer.eos_id, tokenizer.pad_id, grid or 1)
    c.set_grid(grid or c.T)
    c.stop_at_eos = plan.stop_at_eos
    if trace:
        c.trace = []
    seeds = list(seed) if isinstance(seed, list | tuple) else row_seeds(seed, range(c.batch))
    if len(seeds) != c.batch:
        raise ValueError(f"got {len(seeds)} seeds for {c.batch} prompts")
    # any integer seed is legal (OpenAI clients send 64-bit ones); torch takes 63 bits
    gens = [torch.Generator().manual_seed(int(s) % 2**63) for s in seeds]
    c.started = time.perf_counter()
    return Decoding(model, tokenizer, c, plan, gens, notes)


@torch.no_grad()
def generate(
    model: BlockDiffLM,
    tokenizer: Tokenizer,
    prompts: list[str] | str,
    sampler: str | DecodeSpec = DEFAULT_SAMPLER,
    max_new_tokens: int = 64,
    seed: int | list[int] | None = None,
    trace: bool = False,
    on_step: Callable[[Canvas], None] | None = None,
    check: Callable[[str], int | None] | None = None,
    check_rounds: int = 2,
    **kwargs,
) -> GenerateOutput:
    """Decode a batch of prompts with a named sampler (or a `DecodeSpec`); `<|mask|>` in a prompt
    marks a blank to fill.

    Each row decodes as it would alone: own positions, own random stream (seeded by
    seed * 1000003 + row, or by seed[row] when a list is given).
    Returns texts (for a prompt with blanks: the whole text, blanks filled), per-row statistics
    (NFEs, tokens, tokens per NFE, seconds) and the canvas. `on_step(canvas)` after every step.
    `check(text)` -> offset of an error or None: rejected spans are remasked and decoded again,
    at most `check_rounds` times (`policies.Recheck`).
    """
    d = start_decoding(
        model, tokenizer, prompts, sampler, max_new_tokens, seed, trace, check, check_rounds, **kwargs
    )
    for _ in d._it:  # the steps alone: no per-step events to build when nobody reads them
        if on_step is not None:
            on_step(d.c)
    return d.output()
