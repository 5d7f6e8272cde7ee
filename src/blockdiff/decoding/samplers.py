"""The named samplers: each a short composition of policies (a `Plan`) run by `engine`.

ar, bd3, mdlm, llada, fastdllm, dcd, structural, spec — see docs/samplers.md. A plan function's
keyword names are its options (checked by `options.py` before it runs); `build_plan` is the one
entry point: sampler name checked, options checked, plan built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import did_you_mean
from ..costs import forward_cost
from ..model import BlockDiffLM
from . import options
from .constraint import constraint_of
from .policies import (
    SCORES,
    BlockWindow,
    Expand,
    Factor,
    GlobalWindow,
    Plan,
    Revise,
    SlidingWindow,
    Threshold,
    TopK,
)
from .runner import RefreshEvery, RefreshPerBlock
from .speculative import Speculate

SPEC_WIDTH = 4  # the most candidates spec weighs for the first drafted token when it chooses


def _trained_sizes(model: BlockDiffLM) -> list[int]:
    return model.config.trained_block_sizes


def _seq_len(model: BlockDiffLM) -> int:
    return model.config.train_seq_len or model.config.max_position_embeddings


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
    if model.config.has_global_block:
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
    score = SCORES["random" if order == "random" else "prob"]
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
        TopK(steps),  # default: one token per step (blanks included when infilling)
        attn,
        cache,
        score=SCORES["random"],
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
    if steps is not None and steps % n_blocks:
        raise ValueError(f"llada: steps {steps} must be a multiple of the number of blocks {n_blocks}")
    attn, cache = _full_attention_cache(model, cache, notes, B)
    score = SCORES["random" if remasking == "random" else "prob"]
    return Plan(
        BlockWindow(B),
        TopK(None if steps is None else steps // n_blocks),
        attn,
        cache,
        refresh=RefreshPerBlock(),
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
    block_size=None,
    threshold=0.9,
    factor=None,
    temperature=0.0,
    top_k=None,
    top_p=None,
    cache="prefix",
    **kw,
) -> Plan:
    # Fast-dLLM's 32 for full-attention models; a block-causal model decodes in its trained block
    block_size = block_size or (32 if model.config.has_global_block else _default_block(model))
    block_size = min(block_size, max(1, max_new_tokens))
    attn, cache = _full_attention_cache(model, cache, notes, block_size)
    return Plan(
        BlockWindow(block_size),
        _commit(threshold, factor, None),
        attn,
        cache,
        refresh=RefreshPerBlock(),
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
    if block_size is not None or not model.config.has_global_block:
        B = block_size or max(_default_block(model), 16 if 16 in _trained_sizes(model) else 0)
        W = window or min(8, B)
        inner = BlockWindow(B)
        win = SlidingWindow(W, max_span, inner) if deferral else BlockWindow(B)
        grow = Expand(expand_step, expand_max, expand_below) if expand and deferral else None
        return Plan(win, commit, B, cache or "exact", expand=grow, **common)
    W = window or 16
    win = SlidingWindow(W, max_span, GlobalWindow()) if deferral else BlockWindow(W)
    cache = cache or "prefix"
    return Plan(win, commit, None, cache, refresh=RefreshEvery(refresh_every), **common)


def plan_structural(
    model, max_new_tokens, notes, draft="bd3", stages=((None, 0.25),), revise_by="snapshot", **kw
) -> Plan:
    """Diffusion in diffusion: draft with small blocks, then each stage remasks the gamma
    fraction with the lowest snapshot confidence and decodes it again with a larger block."""
    if draft not in ("bd3", "dcd", "ar"):
        raise ValueError(f"structural: draft must be bd3, dcd or ar, got '{draft}'")
    p = PLANS[draft](model, max_new_tokens, notes, **kw)
    p.revise = [
        Revise(None if b in (None, "L", "global") else int(b), float(g), revise_by) for b, g in stages
    ]
    return p


def plan_spec(
    model, max_new_tokens, notes, draft_len=None, draft_width=None, temperature=0.0, top_k=None, top_p=None,
    cache="exact", **kw,
) -> Plan:  # fmt: skip
    """Self-speculative: mask blocks draft `draft_len` tokens, `draft_width` candidates for the
    first (a token tree), the AR path verifies (speculative.py). Without either, up to the trained
    block size - 1 drafts and SPEC_WIDTH candidates, as many as pay on this runtime's measured forward
    costs at the measured acceptance (none: plain AR); with one, the other is fixed too (draft
    length: the trained block size - 1; width: 1, a chain)."""
    cfg = model.config
    why = None
    if not cfg.shifted:
        why = "it has aligned logits (no clean causal next-token head)"
    elif cfg.layout != "context_causal":
        why = f"its layout is {cfg.layout}, not context_causal (the clean context is not causal)"
    elif max(_trained_sizes(model)) < 2:
        why = "it was never trained with a mask block larger than 1 (it cannot draft)"
    elif cfg.ar_weight == 0:
        why = "it was trained without the AR loss (ar_weight 0), so its AR path is not a model"
    if why:
        raise ValueError(f"spec needs an NBDiff model (an AR path and a block drafter): {why}")
    if cache != "exact":
        raise ValueError(f"spec decodes with the exact cache (rolled back per row), not '{cache}'")
    cost = None
    if draft_len is None and draft_width is None:
        cost = forward_cost(model)
    draft_len = draft_len or min(max(_trained_sizes(model)) - 1, 8)
    draft_width = draft_width or (SPEC_WIDTH if cost else 1)
    if draft_width > cfg.vocab_size - 1:
        raise ValueError(f"spec: draft_width {draft_width} exceeds the vocabulary ({cfg.vocab_size} tokens)")
    if draft_len + 1 > cfg.max_position_embeddings:
        raise ValueError(f"spec: draft_len {draft_len} exceeds the context ({cfg.max_position_embeddings})")
    if draft_len + 1 not in _trained_sizes(model):
        sizes = _trained_sizes(model)
        notes.append(f"spec: draft blocks of {draft_len + 1} tokens; the model was trained with {sizes}")
    return Plan(
        BlockWindow(1), TopK(1), 1, "exact", temperature=temperature, top_k=top_k, top_p=top_p,
        spec=Speculate(draft_len, draft_width, cost, notes=notes, prior=tuple(cfg.draft_acceptance)), **kw,
    )  # fmt: skip


PLANS: dict[str, Callable[..., Plan]] = {
    "ar": plan_ar,
    "bd3": plan_bd3,
    "mdlm": plan_mdlm,
    "llada": plan_llada,
    "fastdllm": plan_fastdllm,
    "dcd": plan_dcd,
    "structural": plan_structural,
    "spec": plan_spec,
}
SAMPLERS = tuple(PLANS)


def check_options(
    model: BlockDiffLM, sampler: str, kwargs: dict[str, Any], notes: list[str]
) -> dict[str, Any]:
    """The sampler's name and options checked (unknown names and values are errors listing the
    allowed ones), the model's own defaults added: what does not depend on the length."""
    if sampler not in PLANS:
        hint = did_you_mean(sampler, SAMPLERS)
        raise ValueError(f"unknown sampler '{sampler}'{hint}; known samplers: {', '.join(SAMPLERS)}")
    extra: tuple[str, ...] = ()
    if sampler == "structural":  # it passes the draft sampler's options on
        extra = tuple(options.accepted(PLANS.get(kwargs.get("draft"), PLANS["bd3"])))
    allowed = options.accepted(PLANS[sampler], extra)
    kwargs = options.check(sampler, kwargs, allowed)
    # the model's own defaults for this sampler (its config, measured on its model card); what
    # the caller sets wins. structural takes its draft sampler's too.
    if sampler in model.config.sampler_notes:
        notes.append(f"{sampler}: {model.config.sampler_notes[sampler]}")
    own = model.config.sampler_defaults
    mine = {**own.get(kwargs.get("draft", "bd3"), {})} if sampler == "structural" else {}
    mine = {k: v for k, v in {**mine, **own.get(sampler, {})}.items() if k not in kwargs and k in allowed}
    if mine:
        notes.append(f"{sampler}: this model's defaults " + ", ".join(f"{k}={v}" for k, v in mine.items()))
        kwargs = {**kwargs, **options.check(sampler, mine, allowed)}
    return kwargs


def build_plan(
    model: BlockDiffLM, sampler: str, max_new_tokens: int, notes: list[str], kwargs: dict[str, Any]
) -> Plan:
    """The plan of a named sampler with its options checked (`check_options`) for this length;
    what the plan needs to say goes in `notes`."""
    kwargs = check_options(model, sampler, kwargs, notes)
    if "score" in kwargs:  # the option names a scoring; the plan holds the function
        kwargs = {**kwargs, "score": SCORES[kwargs["score"]]}
    kwargs = dict(kwargs)
    constraint = constraint_of(kwargs)
    plan = PLANS[sampler](model, max_new_tokens, notes, **kwargs)
    plan.constraint = constraint
    grid = plan.window.grid_size()
    if grid is not None and grid > max_new_tokens > 0:
        raise ValueError(f"block_size {grid} is larger than the canvas ({max_new_tokens} new tokens)")
    return plan
