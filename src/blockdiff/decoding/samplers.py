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
    Expand,
    Factor,
    GlobalWindow,
    SlidingWindow,
    Threshold,
    TopK,
    lowest_confidence,
    sample,
)
from .runner import Runner


@dataclass
class Plan:
    window: BlockWindow | GlobalWindow | SlidingWindow
    commit: TopK | Threshold | Factor
    attn_block: int | None  # block-causal attention block; None = full attention
    cache: str = "none"
    refresh: str | None = None  # prefix/dual: "block" (at each region start) or "every:N" committed tokens
    score: str = "prob"
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    revise: list = field(default_factory=list)  # structural: [(block_size or None, gamma), ...]
    revise_by: str = "snapshot"
    stop_at_eos: bool = True
    expand: Expand | None = None  # DCD block expansion (block-causal only)


@dataclass
class GenerateOutput:
    texts: list[str]
    rows: list[RowStats]
    tokens: list[list[int]]
    canvas: Canvas
    notes: list[str] = field(default_factory=list)


def _trained_sizes(model: BlockDiffLM) -> list[int]:
    return model.config.block_sizes or [model.config.block_size]


def _seq_len(model: BlockDiffLM) -> int:
    return model.config.train_seq_len or model.config.max_position_embeddings


def _global(model: BlockDiffLM) -> bool:
    """Was the model trained with the global block (full attention)?"""
    return any(b >= _seq_len(model) for b in _trained_sizes(model))


def _default_block(model: BlockDiffLM) -> int:
    small = [b for b in _trained_sizes(model) if b < _seq_len(model)]
    return small[0] if small else 32


def _commit(threshold, factor, steps_per_window):
    if factor is not None:
        return Factor(factor)
    if threshold is not None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        return Threshold(threshold)
    return TopK(steps_per_window)


def _full_attention_cache(model, cache, notes, block):
    """Full-attention samplers on a model never trained with the global block fall back to
    block-causal attention with the exact cache (said in `notes`, never silent)."""
    if _global(model):
        return None, cache
    notes.append(f"model has no global block: using block-causal attention (B={block}) with the exact cache")
    return block, "none" if cache == "none" else "exact"


# ---- the named samplers ------------------------------------------------------------------------


def plan_ar(
    model, max_new_tokens, notes, block_size=1, temperature=0.0, top_k=None, top_p=None, cache="exact", **kw
) -> Plan:
    if block_size != 1:
        raise ValueError(f"ar decodes one token per step: block_size must be 1, got {block_size}")
    return Plan(BlockWindow(1), TopK(1), 1, cache, temperature=temperature, top_k=top_k, top_p=top_p, **kw)


def plan_bd3(
    model,
    max_new_tokens,
    notes,
    block_size=None,
    steps=None,
    threshold=None,
    temperature=1.0,
    top_p=0.9,
    top_k=None,
    order="random",
    cache="exact",
    **kw,
) -> Plan:
    B = block_size or _default_block(model)
    score = "random" if order == "random" else "prob"
    return Plan(
        BlockWindow(B),
        _commit(threshold, None, steps or B),
        B,
        cache,
        score=score,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        **kw,
    )


def plan_mdlm(
    model, max_new_tokens, notes, steps=None, temperature=1.0, top_p=None, top_k=None, cache="none", **kw
):
    attn, cache = _full_attention_cache(model, cache, notes, _default_block(model))
    window = GlobalWindow() if attn is None else BlockWindow(attn)
    return Plan(
        window,
        TopK(steps or max_new_tokens),
        attn,
        cache,
        score="random",
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        **kw,
    )


def plan_llada(
    model,
    max_new_tokens,
    notes,
    block_size=32,
    steps=None,
    temperature=0.0,
    remasking="low_confidence",
    top_k=None,
    top_p=None,
    cache="none",
    **kw,
) -> Plan:
    B = min(block_size, max(1, max_new_tokens))
    if max_new_tokens % B:
        raise ValueError(f"llada: max_new_tokens {max_new_tokens} must be a multiple of block_size {B}")
    n_blocks = max(1, max_new_tokens // B)
    steps = steps or max_new_tokens
    if steps % n_blocks:
        raise ValueError(f"llada: steps {steps} must be a multiple of the number of blocks {n_blocks}")
    attn, cache = _full_attention_cache(model, cache, notes, B)
    score = "random" if remasking == "random" else "prob"
    return Plan(
        BlockWindow(B),
        TopK(steps // n_blocks),
        attn,
        cache,
        refresh="block",
        score=score,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        **kw,
    )


def plan_fastdllm(
    model,
    max_new_tokens,
    notes,
    block_size=32,
    threshold=0.9,
    factor=None,
    temperature=0.0,
    top_k=None,
    top_p=None,
    cache="prefix",
    **kw,
) -> Plan:
    block_size = min(block_size, max(1, max_new_tokens))
    attn, cache = _full_attention_cache(model, cache, notes, block_size)
    return Plan(
        BlockWindow(block_size),
        _commit(threshold, factor, None),
        attn,
        cache,
        refresh="block",
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        **kw,
    )


def plan_dcd(
    model,
    max_new_tokens,
    notes,
    block_size=None,
    window=None,
    threshold=0.9,
    max_span=128,
    deferral=True,
    expand=True,
    expand_step=4,
    expand_max=16,
    expand_below=0.5,
    temperature=0.0,
    top_k=None,
    top_p=None,
    cache=None,
    refresh_every=32,
    **kw,
) -> Plan:
    """Block-causal (`block_size` given, or no global block): the window slides inside cache
    blocks with the exact cache, and a block grows (`expand_step`, at most `expand_max`) when
    the window is cut by its edge with low confidence. Otherwise (models trained with the
    global block): the window slides over the whole canvas, prefix cache refreshed every
    `refresh_every` committed tokens, the delayed region recomputed meanwhile."""
    common = dict(temperature=temperature, top_k=top_k, top_p=top_p, **kw)
    commit = _commit(threshold, None, None)
    if block_size is not None or not _global(model):
        B = block_size or max(_default_block(model), 16 if 16 in _trained_sizes(model) else 0)
        W = window or min(8, B)
        inner = BlockWindow(B)
        win = SlidingWindow(W, max_span, inner) if deferral else BlockWindow(B)
        grow = Expand(expand_step, expand_max, expand_below) if expand and deferral else None
        return Plan(win, commit, B, cache or "exact", expand=grow, **common)
    W = window or 16
    win = SlidingWindow(W, max_span, GlobalWindow()) if deferral else BlockWindow(W)
    cache = cache or "prefix"
    return Plan(
        win, commit, None, cache, refresh=f"every:{refresh_every}" if cache != "none" else None, **common
    )


def plan_structural(
    model, max_new_tokens, notes, draft="bd3", stages=((None, 0.25),), revise_by="snapshot", **kw
) -> Plan:
    """Diffusion in diffusion: draft with small blocks, then each stage remasks the gamma
    fraction with the lowest snapshot confidence and decodes it again with a larger block."""
    if draft not in ("bd3", "dcd", "ar"):
        raise ValueError(f"structural: draft must be bd3, dcd or ar, got '{draft}'")
    p = PLANS[draft](model, max_new_tokens, notes, **kw)
    p.revise = [(None if b in (None, "L", "global") else int(b), float(g)) for b, g in stages]
    p.revise_by = revise_by
    return p


PLANS: dict[str, Callable[..., Plan]] = {
    "ar": plan_ar,
    "bd3": plan_bd3,
    "mdlm": plan_mdlm,
    "llada": plan_llada,
    "fastdllm": plan_fastdllm,
    "dcd": plan_dcd,
    "structural": plan_structural,
}
SAMPLERS = tuple(PLANS)
ALIASES = {"gen_length": "max_new_tokens", "block_length": "block_size", "alg": "order"}


def _accepted(sampler: str, draft: str) -> set[str]:
    names = set(inspect.signature(PLANS[sampler]).parameters)
    if sampler == "structural":
        names |= set(inspect.signature(PLANS[draft]).parameters)
    names |= {"stop_at_eos", "score"}
    return names - {"model", "max_new_tokens", "notes", "kw"}


# ---- the loop ----------------------------------------------------------------------------------


def _decode(model, c: Canvas, plan: Plan, gens, on_step) -> None:
    block_causal = plan.attn_block is not None
    runner = Runner(model, c, block_causal, plan.cache)
    window, every = plan.window, plan.refresh and plan.refresh.startswith("every:")
    region, step_in_region, masks_at_start = None, 0, None
    committed_since_refresh = 0
    extra = torch.zeros(c.batch, dtype=torch.long)  # DCD expansion so far in the current block
    while True:
        active = ~c.done()
        new_region = window.region(c, active) if active.any() else None
        if new_region is None:
            return
        if region is None or new_region[0] != region[0]:
            step_in_region, extra[:] = 0, 0
            masks_at_start = (
                window.candidates(c, new_region) if isinstance(window, BlockWindow) else c.masked
            ).sum(1)
            if plan.refresh == "block" and plan.cache in ("prefix", "dual"):
                runner.refresh(new_region[1], new_region[2])
        region = new_region
        _, lo, hi = region
        if (
            every
            and runner.fresh is None
            and (len(runner.cache_idx) == 0 or committed_since_refresh >= int(plan.refresh[6:]))
        ):
            runner.refresh(lo, hi)
            committed_since_refresh = 0
        cand = window.candidates(c, region) & active[:, None]
        cols_any = cand.any(0).nonzero().flatten()
        q_lo, q_hi = int(cols_any[0]), int(cols_any[-1]) + 1
        logits = runner.logits(q_lo, q_hi, frontier=lo if block_causal else 0, end=hi)
        c.step += 1
        rows_w, cols_w, toks_w, conf_w = [], [], [], []
        for r in range(c.batch):
            cols = cand[r].nonzero().flatten()
            if len(cols) == 0:
                continue
            c.nfe[r] += 1
            row_logits = logits[r, cols - q_lo]
            tok, conf = sample(row_logits, plan.temperature, plan.top_k, plan.top_p, gens[r], plan.score)
            keep = plan.commit.select(conf, step_in_region, int(masks_at_start[r]))
            if plan.score != "prob":  # snapshot confidence is always the token's probability
                conf = row_logits.double().softmax(-1).gather(-1, tok[:, None])[:, 0]
            if plan.expand is not None and _expand(c, plan, r, region[0], cols, conf[keep], extra):
                continue
            rows_w.append(torch.full((len(keep),), r))
            cols_w.append(cols[keep])
            toks_w.append(tok[keep])
            conf_w.append(conf[keep])
        if rows_w:
            rows, cols, toks = torch.cat(rows_w), torch.cat(cols_w), torch.cat(toks_w)
            c.commit(rows, cols, toks, torch.cat(conf_w))
            committed_since_refresh += len(rows)
        step_in_region += 1
        if on_step is not None:
            on_step(c)


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
