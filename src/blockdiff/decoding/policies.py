"""The four choices of a decoding step: window, scoring, commit rule, remask rule.

Windows say which masked columns may be committed now; scoring samples a token and a confidence
for each; the commit rule picks which to keep; a remask rule (structural revision) may send
committed tokens back to the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .canvas import Canvas

# ---- windows -----------------------------------------------------------------------------------


Region = tuple[int, int, int]  # (block index k, first column, end column) over all rows


@dataclass
class BlockWindow:
    """Fixed blocks of `size` (the canvas grid `blk`), decoded left to right. All rows work on
    their k-th block together: a row done with it waits, so every row sees the same steps."""

    size: int

    def region(self, c: Canvas, active: Tensor) -> Region | None:
        live = c.masked & active[:, None]
        if not live.any():
            return None
        k = int(c.blk[live].min())
        cols = (c.blk == k).any(0).nonzero().flatten()
        return k, int(cols[0]), int(cols[-1]) + 1

    def candidates(self, c: Canvas, region: Region) -> Tensor:
        return c.masked & (c.blk == region[0])


@dataclass
class GlobalWindow:
    """The whole canvas at once (full-sequence diffusion)."""

    def region(self, c: Canvas, active: Tensor) -> Region | None:
        return (0, 0, c.T) if c.masked[active].any() else None

    def candidates(self, c: Canvas, region: Region) -> Tensor:
        return c.masked.clone()


@dataclass
class SlidingWindow:
    """DCD: per row, from the first still-masked column, the next ~`masks` masked columns
    (span at most `max_span`) inside the region. Low-confidence columns stay masked while the
    window grows past them: commitment is deferred, not forced at a block edge."""

    masks: int
    max_span: int = 128
    within: BlockWindow | GlobalWindow | None = None  # region the window lives in

    def region(self, c: Canvas, active: Tensor) -> Region | None:
        return (self.within or GlobalWindow()).region(c, active)

    def candidates(self, c: Canvas, region: Region) -> Tensor:
        inner = (self.within or GlobalWindow()).candidates(c, region)
        m = torch.zeros_like(c.masked)
        for r in range(c.batch):
            cols = inner[r].nonzero().flatten()
            if len(cols) == 0:
                continue
            cols = cols[cols < cols[0] + self.max_span][: self.masks]
            m[r, cols] = True
        return m


@dataclass
class Expand:
    """DCD block expansion (block-causal): when a row's window is cut by its block's right edge
    and even its best candidate is below `below`, commit nothing, grow the block by `step`
    columns (at most `max_extra` in all) and decode again."""

    step: int = 4
    max_extra: int = 16
    below: float = 0.5


# ---- scoring -----------------------------------------------------------------------------------


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_l, idx = logits.sort(-1, descending=True)
        cum = sorted_l.softmax(-1).cumsum(-1)
        drop = cum - sorted_l.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    gen: torch.Generator,
    score: str,
) -> tuple[Tensor, Tensor]:
    """Tokens and confidences [n] for logits [n, V] of one row.

    Gumbel-max in float64 (as LLaDA does: float32 Gumbel noise visibly lowers quality);
    temperature 0 is argmax. Confidence: 'prob' (probability of the chosen token under the
    model), 'margin' (top1 - top2 probability), 'entropy' (negative entropy), 'random'.
    """
    probs = logits.double().softmax(-1)
    if temperature == 0:
        tok = logits.argmax(-1)  # top-k / top-p never remove the argmax
    else:
        u = torch.rand(logits.shape, generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0)
        filtered = filter_logits(logits / temperature, top_k, top_p).double()
        tok = (filtered - torch.log(-torch.log(u))).argmax(-1)
    if score == "prob":
        conf = probs.gather(-1, tok[:, None])[:, 0]
    elif score == "margin":
        top2 = probs.topk(2, -1).values
        conf = top2[:, 0] - top2[:, 1]
    elif score == "entropy":
        conf = (probs * probs.clamp_min(1e-300).log()).sum(-1)
    elif score == "random":
        conf = torch.rand(len(tok), generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"unknown score '{score}' (known: prob, margin, entropy, random)")
    return tok, conf


# ---- commit rules ------------------------------------------------------------------------------


def k_schedule(masks: int, steps: int) -> list[int]:
    """LLaDA's split of `masks` commits over `steps` steps (the remainder goes first)."""
    base, rem = divmod(masks, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@dataclass
class TopK:
    """Commit the k most confident candidates, k from a per-window schedule over `steps` steps."""

    steps: int | None  # None: one token per step (as many steps as masks in the window)

    def select(self, conf: Tensor, step_in_window: int, masks_at_start: int) -> Tensor:
        steps = self.steps or max(1, masks_at_start)
        k = k_schedule(masks_at_start, steps)[min(step_in_window, steps - 1)]
        if step_in_window >= steps - 1:
            k = len(conf)  # the last step of a window commits what is left
        return conf.topk(min(k, len(conf))).indices


@dataclass
class Threshold:
    """Fast-dLLM threshold rule: the top-1 and every candidate with confidence >= tau."""

    tau: float

    def select(self, conf: Tensor, step_in_window: int, masks_at_start: int) -> Tensor:
        keep = conf >= self.tau
        keep[conf.argmax()] = True
        return keep.nonzero().flatten()


@dataclass
class Factor:
    """Fast-dLLM factor rule: sorted descending, commit the first n with (n + 1)(1 - c_n) < f."""

    f: float

    def select(self, conf: Tensor, step_in_window: int, masks_at_start: int) -> Tensor:
        c, idx = conf.sort(descending=True)
        n = 1
        while n < len(c) and (n + 2) * (1 - float(c[n])) < self.f:
            n += 1
        return idx[:n]


# ---- remask rule (structural revision) ---------------------------------------------------------


def lowest_confidence(
    c: Canvas, gamma: float, how: str, gens: list[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """Per row, the ceil(gamma * n) generated columns with the lowest snapshot confidence
    (EOS and given tokens stay). `how='random'` picks them at random (the ablation)."""
    rows, cols = [], []
    for r in range(c.batch):
        gen_cols = torch.arange(c.G, min(int(c.eos_at[r]), c.T))
        gen_cols = gen_cols[c.valid[r, gen_cols] & (c.commit_step[r, gen_cols] > 0)]
        k = math.ceil(gamma * len(gen_cols))
        if k == 0:
            continue
        key = c.conf[r, gen_cols] if how == "snapshot" else torch.rand(len(gen_cols), generator=gens[r])
        pick = gen_cols[key.topk(k, largest=False).indices]
        rows.append(torch.full((k,), r))
        cols.append(pick)
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(rows), torch.cat(cols)


# ---- a sampler = a composition of the above -------------------------------------------------


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
    spec: object | None = None  # speculative.Speculate: draft with mask blocks, verify with the AR path
