"""The four choices of a decoding step: window, scoring, commit rule, remask rule.

Windows say which masked columns may be committed now; scoring samples a token and a confidence
for each; the commit rule picks which to keep; a remask rule (structural revision) may send
committed tokens back to the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .canvas import Canvas

# ---- windows -----------------------------------------------------------------------------------


@dataclass
class BlockWindow:
    """Fixed blocks of `size` anchored at the generation start, decoded left to right."""

    size: int

    def region(self, c: Canvas, active: Tensor) -> tuple[int, int] | None:
        """The leftmost block that still has masks in an active row."""
        cols = c.masked[active].any(0).nonzero()
        if len(cols) == 0:
            return None
        first = int(cols[0])
        if first < c.G:  # masks inside the prompt (infilling) belong to the first block
            return first, min(c.T, c.G + self.size)
        k = (first - c.G) // self.size
        return c.G + k * self.size, min(c.T, c.G + (k + 1) * self.size)

    def candidates(self, c: Canvas, lo: int, hi: int) -> Tensor:
        m = torch.zeros_like(c.masked)
        m[:, lo:hi] = c.masked[:, lo:hi]
        return m


@dataclass
class GlobalWindow:
    """The whole canvas at once (full-sequence diffusion)."""

    def region(self, c: Canvas, active: Tensor) -> tuple[int, int] | None:
        return (0, c.T) if c.masked[active].any() else None

    def candidates(self, c: Canvas, lo: int, hi: int) -> Tensor:
        return c.masked.clone()


@dataclass
class SlidingWindow:
    """DCD: per row, from the first still-masked column, the next ~`masks` masked columns
    (span at most `max_span`) inside the region. Low-confidence columns stay masked while the
    window grows past them: commitment is deferred, not forced at a block edge."""

    masks: int
    max_span: int = 128
    within: BlockWindow | GlobalWindow | None = None  # region the window lives in

    def region(self, c: Canvas, active: Tensor) -> tuple[int, int] | None:
        return (self.within or GlobalWindow()).region(c, active)

    def candidates(self, c: Canvas, lo: int, hi: int) -> Tensor:
        m = torch.zeros_like(c.masked)
        for r in range(c.batch):
            cols = c.masked[r, lo:hi].nonzero().flatten() + lo
            if len(cols) == 0:
                continue
            cols = cols[cols < cols[0] + self.max_span][: self.masks]
            m[r, cols] = True
        return m


# ---- scoring -----------------------------------------------------------------------------------


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_l, idx = logits.sort(-1, descending=True)
        cum = sorted_l.softmax(-1).cumsum(-1)
        drop = cum - sorted_l.softmax(-1) > top_p  # keep the smallest set reaching top_p
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

    steps: int

    def select(self, conf: Tensor, step_in_window: int, masks_at_start: int) -> Tensor:
        k = k_schedule(masks_at_start, self.steps)[min(step_in_window, self.steps - 1)]
        if step_in_window >= self.steps - 1:
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
