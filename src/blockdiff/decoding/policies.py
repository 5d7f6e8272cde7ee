"""The choices of a decoding step, and the stages around it, as small typed values.

Windows say which masked columns may be committed now (and what the engine needs to know of them:
the block grid the canvas is rounded to, the masks a commit schedule counts); scoring samples a
token and a confidence for each; the commit rule picks which to keep; DCD block expansion grows a
block instead of committing; a structural revision stage sends the least confident committed
tokens back to the mask and decodes them again. A `Plan` composes them; the engine runs it.
Cache refresh policies live with the cache, in `runner.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .canvas import Canvas

if TYPE_CHECKING:
    from .runner import Refresh

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

    def grid_size(self) -> int | None:
        """The block grid of the canvas (None: one block, the whole canvas)."""
        return self.size

    def start_masks(self, c: Canvas, region: Region) -> Tensor:
        """[b] masks a commit schedule spreads over the region's steps: those of the block."""
        return self.candidates(c, region).sum(1)


@dataclass
class GlobalWindow:
    """The whole canvas at once (full-sequence diffusion)."""

    def region(self, c: Canvas, active: Tensor) -> Region | None:
        return (0, 0, c.T) if c.masked[active].any() else None

    def candidates(self, c: Canvas, region: Region) -> Tensor:
        return c.masked.clone()

    def grid_size(self) -> int | None:
        return None

    def start_masks(self, c: Canvas, region: Region) -> Tensor:
        return c.masked.sum(1)


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

    def grid_size(self) -> int | None:
        return (self.within or GlobalWindow()).grid_size()

    def start_masks(self, c: Canvas, region: Region) -> Tensor:
        return c.masked.sum(1)  # the window moves: a schedule counts every mask left


@dataclass
class Expand:
    """DCD block expansion (block-causal): when a row's window is cut by its block's right edge
    and even its best candidate is below `below`, commit nothing, grow the block by `step`
    columns (at most `max_extra` in all) and decode again."""

    step: int = 4
    max_extra: int = 16
    below: float = 0.5

    def grow(
        self, c: Canvas, r: int, k: int, kept_conf: Tensor, extra: Tensor, window_masks: int, B: int
    ) -> bool:
        """Row r's step in block k would commit confidences `kept_conf`: True if the block grew
        instead (nothing is committed then). `extra` [b]: growth so far in the current block."""
        in_block = int((c.masked[r] & (c.blk[r] == k)).sum())
        at_edge = in_block <= window_masks  # the window already reaches the block's right edge
        if not at_edge or float(kept_conf.min()) >= self.below or int(extra[r]) + self.step > self.max_extra:
            return False
        if not c.expand_block(r, k, self.step, B):
            return False
        extra[r] += self.step
        return True


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


# ---- scoring: how confident the model is in a sampled token (what commit rules rank) -------------

Score = Callable[[Tensor, Tensor, torch.Generator], Tensor]  # (float64 logits [n, V], tokens [n], gen) -> [n]


def _prob(logits: Tensor, tok: Tensor, gen: torch.Generator) -> Tensor:  # by a logsumexp: half a softmax
    return (logits.gather(-1, tok[:, None])[:, 0] - logits.logsumexp(-1)).exp()  # the chosen token's


def _margin(logits: Tensor, tok: Tensor, gen: torch.Generator) -> Tensor:
    top2 = logits.softmax(-1).topk(2, -1).values
    return top2[:, 0] - top2[:, 1]


def _entropy(logits: Tensor, tok: Tensor, gen: torch.Generator) -> Tensor:
    probs = logits.softmax(-1)
    return (probs * probs.clamp_min(1e-300).log()).sum(-1)  # negative entropy


def _random(probs: Tensor, tok: Tensor, gen: torch.Generator) -> Tensor:
    return torch.rand(len(tok), generator=gen, dtype=torch.float64)


SCORES: dict[str, Score] = {"prob": _prob, "margin": _margin, "entropy": _entropy, "random": _random}
PROB = SCORES["prob"]


def argmax(x: Tensor) -> Tensor:
    """x.argmax(-1), the same indices (the first of equal maxima): torch's CPU argmax over one
    49152-wide row is ~15× numpy's, ~1 % of a one-token step (`benchmarks/norm_rope.py`)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.asarray(x.detach().numpy().argmax(-1)))
    return x.argmax(-1)


def sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    gen: torch.Generator,
    score: Score,
) -> tuple[Tensor, Tensor]:
    """Tokens and confidences [n] for logits [n, V] of one row.

    Gumbel-max in float64 (as LLaDA does: float32 Gumbel noise visibly lowers quality);
    temperature 0 is argmax. Confidence by `score` (one of `SCORES`).
    """
    if temperature == 0:
        tok = argmax(logits)  # top-k / top-p never remove the argmax
    else:
        u = torch.rand(logits.shape, generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0)
        filtered = filter_logits(logits / temperature, top_k, top_p).double()
        tok = argmax(filtered - torch.log(-torch.log(u)))
    return tok, score(logits.double(), tok, gen)


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

    def for_revision(self) -> Threshold:
        """A revision stage has no step budget per block: it commits by confidence."""
        return Threshold(0.9)


@dataclass
class Threshold:
    """Fast-dLLM threshold rule: the top-1 and every candidate with confidence >= tau."""

    tau: float

    def select(self, conf: Tensor, step_in_window: int, masks_at_start: int) -> Tensor:
        keep = conf >= self.tau
        keep[conf.argmax()] = True
        return keep.nonzero().flatten()

    def for_revision(self) -> Threshold:
        return self


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

    def for_revision(self) -> Factor:
        return self


# ---- remask rule (structural revision) ---------------------------------------------------------


def lowest_confidence(
    c: Canvas, gamma: float, how: str, gens: list[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """Per row, the ceil(gamma * n) generated columns with the lowest snapshot confidence
    (EOS and given tokens stay). `how='random'` picks them at random (the ablation)."""
    rows, cols = [], []
    for r in range(c.batch):
        gen_cols = torch.arange(int(c.start[r]), min(int(c.eos_at[r]), c.T))
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


@dataclass
class Revise:
    """A structural revision stage, run after the draft: remask the `gamma` fraction of each
    row's generated tokens with the lowest snapshot confidence (`by='random'`: at random, the
    ablation), then decode them again as a plan of its own: blocks of `block_size` (None: the
    whole canvas), the draft's commit rule made confidence-based, no cache."""

    block_size: int | None
    gamma: float
    by: str = "snapshot"

    def remask(self, c: Canvas, gens: list[torch.Generator]) -> None:
        rows, cols = lowest_confidence(c, self.gamma, self.by, gens)
        c.remask(rows, cols)
        c.set_grid(self.block_size or c.T)

    def plan(self, draft: Plan) -> Plan:
        return redecode(draft, self.block_size)


def redecode(draft: Plan, B: int | None, again: list | None = None) -> Plan:
    """What a revision stage decodes its masks with: blocks of B (None: the whole canvas), the
    draft's commit rule made confidence-based, its sampling and constraint, no cache."""
    return Plan(
        GlobalWindow() if B is None else BlockWindow(B),
        draft.commit.for_revision(),
        B,
        "none",
        score=PROB,
        temperature=draft.temperature,
        top_k=draft.top_k,
        top_p=draft.top_p,
        revise=again or [],
        stop_at_eos=draft.stop_at_eos,
        constraint=draft.constraint,
    )


@dataclass
class Recheck:
    """Adaptive refinement: after the decode, `check` reads each row's text and returns the
    character offset of what it rejects (None: accepted); the token there and the `span` least
    confident tokens around it (EOS included: a text may end too early) go back to the mask and
    are decoded again, as `Revise` does — at most `rounds` times, every forward counted as NFEs.
    For what a constraint cannot express (a schema's ranges, a tool call that fails)."""

    check: Callable[[str], int | None]
    rounds: int = 2
    span: int = 4
    decode: Callable[[list[int]], str] | None = None  # the tokenizer's, bound where the decode starts

    def remask(self, c: Canvas, gens: list[torch.Generator]) -> None:
        for r in range(c.batch):
            g, eos = int(c.start[r]), int(c.eos_at[r])
            cols = torch.arange(g, min(eos, c.T))
            cols = cols[c.valid[r, cols]]
            ids = c.tokens[r, cols].tolist()
            at = self.check(self.decode(ids))
            if at is None:
                continue
            cand = torch.cat([cols, torch.tensor([eos])]) if eos < c.T else cols
            if len(cand) == 0:  # nothing generated and no end to reopen
                continue
            ends = [len(self.decode(ids[: i + 1])) for i in range(len(ids))]
            k = next((i for i, e in enumerate(ends) if e > at), len(cand) - 1)  # past the text: its end
            lo, hi = max(0, k - 2 * self.span), min(len(cand), k + self.span + 1)
            near = torch.cat([torch.arange(lo, k), torch.arange(k + 1, hi)])
            low = near[c.conf[r, cand[near]].argsort()[: self.span]]
            pick = cand[torch.cat([torch.tensor([k]), low])]
            if eos < c.T and bool((pick == eos).any()):  # the end reopens: the EOS fill after it too
                tail = torch.arange(eos, c.T)
                pick = torch.unique(torch.cat([pick, tail[c.valid[r, tail]]]))
                c.eos_at[r] = c.T
            c.remask(torch.full((len(pick),), r), pick)

    def plan(self, draft: Plan) -> Plan:
        return redecode(
            draft, draft.attn_block, [replace(self, rounds=self.rounds - 1)] if self.rounds > 1 else []
        )


# ---- a sampler = a composition of the above -------------------------------------------------


@dataclass
class Plan:
    window: BlockWindow | GlobalWindow | SlidingWindow
    commit: TopK | Threshold | Factor
    attn_block: int | None  # block-causal attention block; None = full attention
    cache: str = "none"
    refresh: Refresh | None = None  # prefix/dual: when the runner refreshes (runner.py)
    score: Score = PROB  # one of SCORES
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    revise: list[Revise | Recheck] = field(default_factory=list)  # stages after the draft
    stop_at_eos: bool = True
    expand: Expand | None = None  # DCD block expansion (block-causal only)
    spec: object | None = None  # speculative.Speculate: draft with mask blocks, verify with the AR path
    constraint: object | None = None  # constraint.Constrain: commit only what can still be completed

    @property
    def joins(self) -> bool:
        """Rows of decodes with this plan can join and leave between blocks (continuous
        batching, `decoding/continuous.py`): blocks decoded in lockstep by every row, an exact
        cache or none, nothing that revisits the canvas (revision, expansion, speculation)."""
        return (
            isinstance(self.window, BlockWindow)
            and self.cache in ("exact", "none")
            and not self.revise
            and self.expand is None
            and self.spec is None
        )
