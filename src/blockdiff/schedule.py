"""What a training step uses, as functions of (recipe, step) alone: its learning rate, its block
sizes (block growth) and its rows of the corpus, so a resumed or resharded run repeats them."""

from __future__ import annotations

import math

import torch

from . import recipe as recipe_mod


def lr_at(step: int, t: recipe_mod.TrainSpec) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    p = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def block_size_now(r: recipe_mod.Recipe, step: int) -> list[int]:
    """The block-size set at this step: block growth replaces the first (small) entry."""
    sizes = r.block_sizes()
    if r.objective.growth:
        p = step / r.train.steps
        cur = [int(B) for q, B in sorted(r.objective.growth, key=lambda g: g[0]) if q <= p]
        if cur:
            sizes = [cur[-1], *sizes[1:]]
    return sizes


def global_rows(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the sequences in this step's global batch: epochs of seeded permutations."""
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = perm[off : off + batch - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return torch.tensor(out)
