"""Masking noise: one masking level t per block, antithetic draws, clipped intervals.

Linear schedule: alpha_t = 1 - t, so a token is masked with probability t and the ELBO weight
of a masked token is -alpha'_t / (1 - alpha_t) = 1/t. With block size L this is MDLM; with
block size 1 every token is its own block and the expected loss is the AR loss.

Noise is drawn for the whole global batch from one generator and sliced afterwards, so that a
run on N processes sees exactly the noise a run on one process sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIN_T = 1e-3  # the epsilon of the schedule: t never goes below it (the 1/t weight stays finite)


@dataclass
class Noise:
    t: Tensor  # [b, L] masking level of each token's block
    masked: Tensor  # [b, L] bool
    offsets: Tensor | None = None  # [b] origin of each row's block grid (None: position 0)

    def rows(self, sl: slice) -> Noise:
        return Noise(self.t[sl], self.masked[sl], None if self.offsets is None else self.offsets[sl])


def sample_levels(n: int, gen: torch.Generator, interval: tuple[float, float], antithetic: bool) -> Tensor:
    """n masking levels in [lo, hi]; antithetic = stratified over n (low-variance, same mean)."""
    lo, hi = max(interval[0], MIN_T), interval[1]
    if antithetic:
        u = (torch.rand((), generator=gen) + torch.arange(n) / n) % 1.0
        u = u[torch.randperm(n, generator=gen)]
    else:
        u = torch.rand(n, generator=gen)
    return lo + (hi - lo) * u


def draw(
    shape: tuple[int, int],
    block_sizes: Tensor,
    gen: torch.Generator,
    interval: tuple[float, float] = (1e-3, 1.0),
    antithetic: bool = True,
    offsets: Tensor | None = None,
) -> Noise:
    """One t per (row, block), every token of a block masked independently with probability t.
    `offsets`: per-row origin of the block grid (blocks cut at offset + k*B)."""
    from .masks import block_ids

    b, L = shape
    local = block_ids(torch.arange(L).expand(b, L), block_sizes, offsets)
    local = local - local[:, :1]  # 0-based block index inside each row
    nblocks = local[:, -1] + 1  # [b]
    first = torch.cumsum(nblocks, 0) - nblocks
    levels = sample_levels(int(nblocks.sum()), gen, interval, antithetic)
    t = levels[local + first[:, None]]  # by global block index
    masked = torch.rand((b, L), generator=gen) < t
    return Noise(t, masked, offsets)


def grid_offsets(loss_mask: Tensor | None, block_sizes: Tensor) -> Tensor | None:
    """Block-grid origins for supervised rows: the first loss (answer) token, where the decoding
    canvas starts its blocks; rows whose block is the whole sequence keep one block."""
    if loss_mask is None:
        return None
    L = loss_mask.shape[1]
    first = loss_mask.float().argmax(1).cpu()
    return torch.where(block_sizes.cpu() < L, first, torch.zeros_like(first))


def apply(x0: Tensor, noise: Noise, mask_id: int) -> Tensor:
    return torch.where(noise.masked.to(x0.device), torch.full_like(x0, mask_id), x0)


def interval_candidates(widths=(0.5, 0.6, 0.7, 0.8, 0.9), step: float = 0.05) -> list[tuple[float, float]]:
    """The published search space for the clipped interval [beta, omega]."""
    out = []
    for w in widths:
        start = 0.0
        while start + w <= 1.0 + 1e-9:
            out.append((round(start, 2), round(start + w, 2)))
            start += step
    return out
