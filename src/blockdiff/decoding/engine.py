"""One canvas loop; every sampler is a named composition of policies.

region = window.region(canvas)          which block (or the whole canvas) is being decoded
logits = runner.logits(region)          one forward = one NFE, cache handled by the runner
tokens, conf = sample(logits)           scoring
keep = commit.select(conf)              commit rule
(structural) remask lowest snapshot confidence, decode again with a larger block
"""

from __future__ import annotations

import difflib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model import BlockDiffLM
from ..tokenizer import Tokenizer
from .canvas import Canvas, RowStats
from .policies import (
    BlockWindow,
    GlobalWindow,
    Plan,
    SlidingWindow,
    Threshold,
    TopK,
    lowest_confidence,
    sample,
)
from .runner import Runner
from .samplers import ALIASES, PLANS, SAMPLERS
from .speculative import SpecStep


@dataclass
class GenerateOutput:
    texts: list[str]
    rows: list[RowStats]
    tokens: list[list[int]]
    canvas: Canvas
    notes: list[str] = field(default_factory=list)


def _accepted(sampler: str, draft: str) -> set[str]:
    names = set(inspect.signature(PLANS[sampler]).parameters)
    if sampler == "structural":
        names |= set(inspect.signature(PLANS[draft]).parameters)
    names |= {"stop_at_eos", "score"}
    return names - {"model", "max_new_tokens", "notes", "kw"}


# ---- the loop ----------------------------------------------------------------------------------


def _decode(model, c: Canvas, plan: Plan, gens, on_step) -> None:
    """The loop: one step policy call = one forward (NFE) and what it commits."""
    runner = Runner(model, c, plan.attn_block is not None, plan.cache)
    stepper = SpecStep(c, runner, plan, gens) if plan.spec is not None else DenoiseStep(c, runner, plan, gens)
    while stepper.step():
        if on_step is not None:
            on_step(c)


class DenoiseStep:
    """A step of masked denoising: window -> logits -> sample -> commit (-> DCD expansion)."""

    def __init__(self, c: Canvas, runner: Runner, plan: Plan, gens):
        self.c, self.runner, self.plan, self.gens = c, runner, plan, gens
        self.block_causal = plan.attn_block is not None
        self.every = plan.refresh and plan.refresh.startswith("every:")
        self.region, self.step_in_region, self.masks_at_start = None, 0, None
        self.committed_since_refresh = 0
        self.extra = torch.zeros(c.batch, dtype=torch.long)  # DCD expansion so far in the block

    def step(self) -> bool:
        c, plan, runner, window = self.c, self.plan, self.runner, self.plan.window
        active = ~c.done()
        new_region = window.region(c, active) if active.any() else None
        if new_region is None:
            return False
        if self.region is None or new_region[0] != self.region[0]:
            self.step_in_region, self.extra[:] = 0, 0
            self.masks_at_start = (
                window.candidates(c, new_region) if isinstance(window, BlockWindow) else c.masked
            ).sum(1)
            if plan.refresh == "block" and plan.cache in ("prefix", "dual"):
                runner.refresh(new_region[1], new_region[2])
        self.region = region = new_region
        _, lo, hi = region
        if (
            self.every
            and runner.fresh is None
            and (len(runner.cache_idx) == 0 or self.committed_since_refresh >= int(plan.refresh[6:]))
        ):
            runner.refresh(lo, hi)
            self.committed_since_refresh = 0
        cand = window.candidates(c, region) & active[:, None]
        cols_any = cand.any(0).nonzero().flatten()
        q_lo, q_hi = int(cols_any[0]), int(cols_any[-1]) + 1
        logits = runner.logits(q_lo, q_hi, frontier=lo if self.block_causal else 0, end=hi)
        c.step += 1
        rows_w, cols_w, toks_w, conf_w = [], [], [], []
        for r in range(c.batch):
            cols = cand[r].nonzero().flatten()
            if len(cols) == 0:
                continue
            c.nfe[r] += 1
            row_logits = logits[r, cols - q_lo]
            tok, conf = sample(row_logits, plan.temperature, plan.top_k, plan.top_p, self.gens[r], plan.score)
            keep = plan.commit.select(conf, self.step_in_region, int(self.masks_at_start[r]))
            if plan.score != "prob":  # snapshot confidence is always the token's probability
                conf = row_logits.double().softmax(-1).gather(-1, tok[:, None])[:, 0]
            if plan.expand is not None and _expand(c, plan, r, region[0], cols, conf[keep], self.extra):
                continue
            rows_w.append(torch.full((len(keep),), r))
            cols_w.append(cols[keep])
            toks_w.append(tok[keep])
            conf_w.append(conf[keep])
        if rows_w:
            rows, cols, toks = torch.cat(rows_w), torch.cat(cols_w), torch.cat(toks_w)
            c.commit(rows, cols, toks, torch.cat(conf_w))
            self.committed_since_refresh += len(rows)
        self.step_in_region += 1
        return True


def _expand(c: Canvas, plan: Plan, r: int, k: int, cols, kept_conf, extra) -> bool:
    """DCD block expansion for row r; True if the block grew (and nothing is committed)."""
    e = plan.expand
    in_block = int((c.masked[r] & (c.blk[r] == k)).sum())
    at_edge = in_block <= plan.window.masks  # the window already reaches the block's right edge
    if not at_edge or float(kept_conf.min()) >= e.below or int(extra[r]) + e.step > e.max_extra:
        return False
    if not c.expand_block(r, k, e.step, plan.attn_block):
        return False
    extra[r] += e.step
    return True


def _revise(model, c: Canvas, plan: Plan, gens, on_step) -> None:
    for B, gamma in plan.revise:
        rows, cols = lowest_confidence(c, gamma, plan.revise_by, gens)
        c.remask(rows, cols)
        if on_step is not None:
            on_step(c)
        window = GlobalWindow() if B is None else BlockWindow(B)
        c.set_grid(B or c.T)
        commit = plan.commit if not isinstance(plan.commit, TopK) else Threshold(0.9)
        stage = Plan(
            window,
            commit,
            B,
            "none",
            score="prob",
            temperature=plan.temperature,
            top_k=plan.top_k,
            top_p=plan.top_p,
            stop_at_eos=plan.stop_at_eos,
        )
        _decode(model, c, stage, gens, on_step)


@torch.no_grad()
def generate(
    model: BlockDiffLM,
    tokenizer: Tokenizer,
    prompts: list[str] | str,
    sampler: str = "bd3",
    max_new_tokens: int = 64,
    seed: int | list[int] = 0,
    trace: bool = False,
    on_step: Callable[[Canvas], None] | None = None,
    **kwargs,
) -> GenerateOutput:
    """Decode a batch of prompts with a named sampler; `<|mask|>` in a prompt marks a blank to fill.

    Each row decodes as it would alone: own positions, own random stream (seeded by
    seed * 1000003 + row, or by seed[row] when a list is given).
    Returns texts, per-row statistics (NFEs, tokens, tokens per NFE, seconds) and the canvas.
    """
    if sampler not in PLANS:
        close = difflib.get_close_matches(sampler, SAMPLERS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown sampler '{sampler}'{hint}; known samplers: {', '.join(SAMPLERS)}")
    for alias, name in ALIASES.items():
        if alias in kwargs:
            kwargs[name] = kwargs.pop(alias)
    if "remasking" in kwargs and sampler != "llada":
        kwargs.pop("remasking")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    notes: list[str] = []
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    allowed = _accepted(sampler, kwargs.get("draft", "bd3"))
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"sampler '{sampler}' does not take {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}"
        )
    plan = PLANS[sampler](model, max_new_tokens, notes, **kwargs)
    cfg = model.config
    ids = [tokenizer.encode(p) for p in prompts]
    grid = plan.window.within if isinstance(plan.window, SlidingWindow) else plan.window
    round_to = grid.size if isinstance(grid, BlockWindow) else 1
    c = Canvas.build(ids, max_new_tokens, cfg.mask_token_id, tokenizer.eos_id, tokenizer.pad_id, round_to)
    c.set_grid(round_to if isinstance(grid, BlockWindow) else c.T)
    if c.G + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({c.G} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"of {cfg.max_position_embeddings} tokens"
        )
    if round_to > max_new_tokens > 0:
        raise ValueError(f"block_size {round_to} is larger than the canvas ({max_new_tokens} new tokens)")
    c.stop_at_eos = plan.stop_at_eos
    if trace:
        c.trace = []
    seeds = list(seed) if isinstance(seed, list | tuple) else [seed * 1_000_003 + r for r in range(c.batch)]
    if len(seeds) != c.batch:
        raise ValueError(f"got {len(seeds)} seeds for {c.batch} prompts")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    c.started = time.perf_counter()
    _decode(model, c, plan, gens, on_step)
    if plan.revise:
        _revise(model, c, plan, gens, on_step)
    texts = [tokenizer.decode(c.generated(r).tolist()) for r in range(c.batch)]
    toks = [c.generated(r).tolist() for r in range(c.batch)]
    return GenerateOutput(texts, c.stats(), toks, c, notes)
