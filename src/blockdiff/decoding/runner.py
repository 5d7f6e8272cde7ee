"""Forward passes over the canvas, with the KV cache handled here and nowhere else.

Attention over the canvas is either block-causal by each row's block grid `canvas.blk` (exact
caching: a completed block never changes its keys), or full
(bidirectional models; caches are then approximations refreshed by extra, counted forwards):

* none   — every step feeds the whole visible canvas;
* exact  — block-causal only: the keys of completed blocks are stored once, steps feed only the
           current block (plus the block just completed, whose keys are written in the same pass);
* prefix — full attention, Fast-dLLM prefix cache: a refresh forward stores the keys before the
           active region; steps feed the active region and everything after it;
* dual   — full attention, Fast-dLLM dual cache: the refresh stores prefix and suffix keys;
           steps feed only the active block.

When the approximate caches (prefix, dual) are refreshed is a typed policy the runner owns and
consults before each step (`before_step`): `RefreshPerBlock` (Fast-dLLM: at the start of each
block) or `RefreshEvery(n)` (DCD over the whole canvas: after n committed tokens). The step
policy only tells the runner where the current region is and how many tokens it committed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import BlockDiffLM, KVCache, token_logits
from .canvas import Canvas

CACHE_MODES = ("none", "exact", "prefix", "dual")


def tree(parent: list[int] | None, C: int) -> tuple[Tensor, Tensor]:
    """Depth [C] of each of C tokens of a tree (parent[i] < i, the root's -1; None: a chain), and
    [C, C] whether token i follows token j (j is i or one of its ancestors): what i may attend to.
    A chain (a prompt: hundreds of tokens) directly; a tree (a few) token by token."""
    if parent is None:
        return torch.arange(C), torch.ones(C, C, dtype=torch.bool).tril()
    if len(parent) != C:
        raise ValueError(f"{len(parent)} parents for {C} tokens")
    depth, follows = [0] * C, torch.eye(C, dtype=torch.bool)
    for i, p in enumerate(parent):
        if not -1 <= p < i or (p == -1) != (i == 0):
            raise ValueError(f"not a tree in feed order: token {i}'s parent is {p}")
        if p >= 0:
            depth[i] = depth[p] + 1
            follows[i] |= follows[p]
    return torch.tensor(depth), follows


# ---- refresh policies (prefix / dual caches) ---------------------------------------------------


@dataclass(frozen=True)
class RefreshPerBlock:
    """Refresh when a new region (block) starts; store the keys before the region's first column
    (and, for the dual cache, after its end)."""

    def due(self, new_region: bool, committed: int, empty: bool) -> bool:
        return new_region

    def prefix_end(self, c: Canvas, active: Tensor, lo: int) -> int:
        return lo


@dataclass(frozen=True)
class RefreshEvery:
    """Refresh when the cache is empty and then after every `n` committed tokens; store the prefix
    up to the window's left edge: the first column still masked in any active row (a global
    window's region starts at column 0, so its `lo` alone would store nothing)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.n}")

    def due(self, new_region: bool, committed: int, empty: bool) -> bool:
        return empty or committed >= self.n

    def prefix_end(self, c: Canvas, active: Tensor, lo: int) -> int:
        still = (c.masked & active[:, None]).any(0).nonzero()
        return max(lo, int(still[0])) if len(still) else lo


Refresh = RefreshPerBlock | RefreshEvery


class Runner:
    def __init__(
        self,
        model: BlockDiffLM,
        canvas: Canvas,
        block_causal: bool,
        cache: str,
        refresh: Refresh | None = None,
    ):
        if cache not in CACHE_MODES:
            raise ValueError(f"unknown cache mode '{cache}' (known: {', '.join(CACHE_MODES)})")
        if cache == "exact" and not block_causal:
            raise ValueError(
                "cache 'exact' needs block-causal attention; use 'prefix' or 'dual' (approximate)"
            )
        if cache in ("prefix", "dual") and block_causal:
            raise ValueError(f"cache '{cache}' is for full attention; block-causal decoding uses 'exact'")
        self.model, self.c, self.mode = model, canvas, cache
        self.cfg = model.config
        self.block_causal = block_causal
        self.device = next(model.parameters()).device
        # only the approximate caches are refreshed; the others are exact or absent
        self.policy = refresh if cache in ("prefix", "dual") else None
        self.committed_since_refresh = 0
        self.reset()

    def reset(self) -> None:
        self.cache = KVCache(self.cfg.num_hidden_layers)
        self.cache_idx = torch.zeros(0, dtype=torch.long)
        self.boundary: dict[int, Tensor] = {}  # column -> raw output there (shifted models)
        self.region: tuple[int, int] | None = None  # dual cache: the block its keys exclude
        self.fresh: Tensor | None = None  # output of a refresh, not yet used

    def lag(self, frontier: int) -> int | None:
        """Columns between the cache's end and `frontier` (exact cache; None: nothing cached
        across steps). Two decodes at block boundaries with equal lags hold the same columns
        relative to their frontiers: their caches can be joined (`regrid`)."""
        return frontier - len(self.cache_idx) if self.mode == "exact" else None

    def regrid(self, parts: list[tuple[Runner, list[int], int]]) -> None:
        """Become, in place, the rows of each part's runner with columns moved right by `shift`
        (the canvas is regridded alike). Exact or no cache only: the caller checks the lags."""
        if self.mode == "none":
            return self.reset()
        ends = {len(r.cache_idx) + s for r, _, s in parts}
        if len(ends) != 1 or self.mode != "exact" or self.fresh is not None:
            raise ValueError(f"cannot regrid a {self.mode} cache ending at columns {sorted(ends)}")
        n = ends.pop()
        self.cache.regrid([(r.cache, rows, s) for r, rows, s in parts], n)
        self.cache_idx = torch.arange(n)
        keys = [{col + s for col in r.boundary} for r, _, s in parts]
        if any(k != keys[0] for k in keys):
            raise ValueError("cannot regrid: the parts' last outputs are at different columns")
        self.boundary = {
            col: torch.cat([r.boundary[col - s][rows] for r, rows, s in parts]) for col in keys[0]
        }

    def _mask(self, q: Tensor, k: Tensor, clean_before: int = 0) -> Tensor:
        """Each row by its own block grid `canvas.blk`: a query sees keys of its block and earlier.

        Context-causal models (NBDiff) were trained with a plain causal clean context: columns
        before `clean_before` (final, in completed blocks) then attend causally, as in training."""
        c = self.c
        allowed = c.valid[:, k][:, None, :].expand(c.batch, len(q), len(k))
        if self.block_causal:
            seen = c.blk[:, k][:, None, :] <= c.blk[:, q][:, :, None]
            if self.cfg.layout == "context_causal":
                clean_q = (q < clean_before)[None, :, None]
                seen = torch.where(clean_q, (k[None, :] <= q[:, None])[None], seen)
            allowed = allowed & seen
        allowed = allowed | (q[:, None] == k[None, :])[None]  # padding queries see themselves
        return allowed[:, None].to(self.device)

    def _forward(
        self, lo: int, hi: int, write: int, out_from: int | None = None, clean_before: int = 0
    ) -> Tensor:
        """Feed canvas columns [lo, hi), write the first `write` of them into the cache; output
        logits for columns [out_from, hi) only (the LM head is costly with large vocabularies)."""
        c = self.c
        q = torch.arange(lo, hi)
        k = torch.cat([self.cache_idx, q])
        out = (
            self.model(
                c.tokens[:, lo:hi].to(self.device),
                positions=c.pos[:, lo:hi].to(self.device),
                mask=self._mask(q, k, clean_before),
                cache=self.cache,
                write_cache=write,
                logits_slice=None if out_from is None else slice(out_from - lo, None),
            )
            .float()
            .cpu()
        )  # policies work on the canvas, which lives on the CPU
        if write:
            self.cache_idx = torch.cat([self.cache_idx, q[:write]])
        return out

    def before_step(self, lo: int, hi: int, active: Tensor, new_region: bool) -> None:
        """Called by the step policy before the step's `logits` for region [lo, hi): refresh the
        cache if the refresh policy says it is due (and no refresh output is still unused)."""
        p = self.policy
        if p is None or self.fresh is not None:
            return
        if p.due(new_region, self.committed_since_refresh, len(self.cache_idx) == 0):
            self.refresh(p.prefix_end(self.c, active, lo), hi)

    def committed(self, n: int) -> None:
        """The step policy committed n tokens (what `RefreshEvery` counts)."""
        self.committed_since_refresh += n

    def refresh(self, lo: int, hi: int) -> None:
        """prefix/dual: a full forward storing the keys outside the active region [lo, hi).

        Its output serves the next `logits` call, so a refresh is the NFE of that step.
        """
        self.reset()
        self.committed_since_refresh = 0
        c = self.c
        out = self._forward(0, c.T, c.T if self.mode == "dual" else lo)
        if self.mode == "dual":
            keep = torch.cat([torch.arange(0, lo), torch.arange(hi, c.T)])
            self.cache.keep(keep.to(self.device))
            self.cache_idx = keep
            self.region = (lo, hi)
        if lo > 0:
            self.boundary = {lo - 1: out[:, lo - 1]}
        self.fresh = out

    def logits(self, lo: int, hi: int, frontier: int = 0, end: int | None = None) -> Tensor:
        """Predictive logits [b, hi-lo, V] for canvas columns [lo, hi): one NFE.

        `frontier`: columns before it are final and their attention blocks complete (the exact
        cache writes them during this forward). `end`: block-causal attention feeds up to here
        (the end of the current blocks: columns after it are invisible to the queries).
        """
        c = self.c
        fresh, self.fresh = getattr(self, "fresh", None), None
        if fresh is not None:
            f_lo, out = 0, fresh
        else:
            if self.mode == "none":
                self.reset()
                f_lo, f_hi, write = 0, end if self.block_causal and end else c.T, 0
            elif self.mode == "exact":
                f_lo, f_hi = len(self.cache_idx), end
                write = max(0, frontier - f_lo)
                if self.cfg.shifted and hi - lo == 1 and lo == frontier and write:
                    f_hi = lo  # AR step: the masked column feeds nothing its own prediction reads
            elif self.mode == "prefix":
                f_lo, f_hi, write = len(self.cache_idx), c.T, 0
            else:
                (f_lo, f_hi), write = self.region, 0
            shifted = self.cfg.shifted
            o_lo = max(f_lo, min(lo - 1, f_lo + write - 1 if write else lo) if shifted else lo)
            out = self._forward(f_lo, f_hi, write, o_lo, frontier)
            if write and shifted:
                self.boundary = {f_lo + write - 1: out[:, f_lo + write - 1 - o_lo]}
            f_lo = o_lo  # `out` starts at column o_lo
        prev = None
        if self.cfg.shifted and lo > 0:
            if lo - 1 >= f_lo:
                prev = out[:, lo - 1 - f_lo]
            elif lo - 1 in self.boundary:
                prev = self.boundary[lo - 1]
            else:
                raise RuntimeError(f"no output for column {lo - 1} (shifted logits): cache bookkeeping bug")
        return token_logits(out[:, lo - f_lo : hi - f_lo], self.cfg, prev)

    def speculate(
        self, n: Tensor, clean: Tensor, attach: list[int], B: int, parent: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """One forward for self-speculative decoding (context-causal, shifted models).

        Feeds, per row r, `clean` [b, C] as causal tokens from column n[r] (their keys go into
        the cache at slots n[r]..n[r]+C-1), and after each clean index j in `attach` a block of
        B mask tokens at the next B positions, which sees the cache, clean token j and what it
        follows, and its own block (the training layout of a noisy block over a clean prefix).
        `parent` (default: a chain) makes the clean tokens a tree: token i follows parent[i] < i,
        sits at column n + its depth and sees only the tokens it follows (whoever keeps a branch
        moves its keys to consecutive slots: `KVCache.move`). Rows see only their own cache slots
        below n[r]. Returns (AR logits [b, C, V]: index i predicts the column after token i;
        draft logits [b, len(attach), B-1, V]: block t's position i predicts the column
        2 + i after clean token attach[t]).
        """
        c, dev = self.c, self.device
        b, C = clean.shape
        nb = len(attach)
        if self.cache.lengths is not None and len(self.cache):
            self.cache.truncate(torch.minimum(self.cache.lengths, n.to(self.cache.lengths.device)))
        span = len(self.cache)
        depth, follows = tree(parent, C)
        # fed layout: clean 0..C-1, then block t (after clean attach[t]) at C + t*B + i
        j = torch.tensor(attach, dtype=torch.long)
        owner = torch.cat([torch.arange(C), C + torch.arange(nb).repeat_interleave(B)])  # block id
        host = torch.cat([torch.arange(C), j.repeat_interleave(B)])  # the clean token it is behind
        fed_mask = torch.cat([follows[host], torch.zeros(C + nb * B, nb * B, dtype=torch.bool)], 1)
        fed_mask |= owner[None, :] == owner[:, None]
        base = n[:, None] + c.pos[:, :1]  # each row's position of column n (pos = column - padding)
        offs = torch.cat([depth, (depth[j][:, None] + 1 + torch.arange(B)[None]).flatten()])
        pos = base + offs[None]
        cols = n[:, None] + torch.arange(C)[None]  # cache slots
        at = n[:, None] + depth[None]  # canvas columns
        clean_valid = c.valid.gather(1, at.clamp(max=c.T - 1)) | (at >= c.T)
        key_valid = torch.cat([clean_valid, torch.ones(b, nb * B, dtype=torch.bool)], 1)
        m = fed_mask[None] & key_valid[:, None, :]
        m = m | torch.eye(C + nb * B, dtype=torch.bool)[None]  # padding queries see themselves
        if span:
            slot = torch.arange(span)
            valid = torch.ones(b, span, dtype=torch.bool)
            valid[:, : min(span, c.T)] = c.valid[:, : min(span, c.T)]
            old = (slot[None] < n[:, None]) & valid
            m = torch.cat([old[:, None, :].expand(b, C + nb * B, span), m], 2)
        tokens = torch.cat([clean, torch.full((b, nb * B), c.mask_id, dtype=torch.long)], 1)
        want = torch.cat(
            [torch.arange(C), (C + torch.arange(nb)[:, None] * B + torch.arange(B - 1)).flatten()]
        )
        out = (
            self.model(
                tokens.to(dev),
                positions=pos.to(dev),
                mask=m[:, None].to(dev),
                cache=self.cache,
                write_cache=cols.to(dev),
                logits_slice=want.expand(b, -1).to(dev),
            )
            .float()
            .cpu()
        )
        out[..., c.mask_id] = float("-inf")
        return out[:, :C], out[:, C:].view(b, nb, B - 1, out.shape[-1])
