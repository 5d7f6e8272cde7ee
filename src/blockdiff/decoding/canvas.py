"""The canvas: what every sampler reads and writes.

Rows are left-padded so that every row's generation starts at the same column G; each row keeps
its own positions (column - padding), so a row decodes exactly as it would alone. Block grids
are anchored at G: block k of the generation is columns [G + kB, G + (k+1)B). Rows joined from
another decode (`regrid`, continuous batching) start at their own column `start[r]`, shifted
so that every row's current block lies in the same columns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RowStats:
    nfe: int
    tokens: int
    seconds: float
    stopped_at_eos: bool

    @property
    def tokens_per_nfe(self) -> float:
        return self.tokens / max(1, self.nfe)

    def as_dict(self) -> dict:
        return {
            "nfe": self.nfe,
            "tokens": self.tokens,
            "tokens_per_nfe": round(self.tokens_per_nfe, 4),
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens / max(self.seconds, 1e-9), 2),
            "stopped_at_eos": self.stopped_at_eos,
        }


@dataclass
class Canvas:
    tokens: Tensor  # [b, T]
    masked: Tensor  # [b, T] still to be decided
    valid: Tensor  # [b, T] not padding
    pos: Tensor  # [b, T] each row's own positions
    start: Tensor  # [b] first generation column of each row
    mask_id: int
    eos_id: int
    pad_id: int
    commit_step: Tensor = None  # [b, T] step at which each token was committed (-1: never; 0: given)
    conf: Tensor = None  # [b, T] snapshot confidence: probability when committed (1 for given tokens)
    nfe: Tensor = None  # [b] forwards in which the row had work
    eos_at: Tensor = None  # [b] column of the committed EOS (T if none)
    step: int = 0
    trace: list | None = None
    started: float = field(default_factory=time.perf_counter)
    finished_at: Tensor = None  # [b] wall time when the row finished
    stop_at_eos: bool = True  # False: EOS is an ordinary token (fixed-length decoding)
    blk: Tensor = None  # [b, T] block id of each column (negative in the prompt); see set_grid
    born: Tensor = None  # [b] seconds after `started` at which the row began (0 unless joined)
    steered: Tensor = None  # [b, T] committed where a constraint forbade the model's own top token

    @classmethod
    def build(
        cls,
        prompts: list[list[int]],
        max_new_tokens: int,
        mask_id: int,
        eos_id: int,
        pad_id: int,
        round_to: int = 1,
    ) -> Canvas:
        prompts = [p if len(p) else [eos_id] for p in prompts]  # nothing before: start as after a document
        G = max(len(p) for p in prompts)
        gen = -(-max_new_tokens // round_to) * round_to if max_new_tokens else 0
        b, T = len(prompts), G + gen
        tokens = torch.full((b, T), mask_id, dtype=torch.long)
        valid = torch.zeros((b, T), dtype=torch.bool)
        pos = torch.zeros((b, T), dtype=torch.long)
        for r, p in enumerate(prompts):
            pad = G - len(p)
            tokens[r, :pad] = pad_id
            tokens[r, pad:G] = torch.tensor(p)
            valid[r, pad:] = True
            pos[r] = torch.arange(T) - pad
        masked = (tokens == mask_id) & valid
        masked[:, G + max_new_tokens :] = False  # rounding slack is not generated
        valid[:, G + max_new_tokens :] = False
        commit_step = torch.where(valid & ~masked, 0, -1)
        return cls(
            tokens=tokens,
            masked=masked,
            valid=valid,
            pos=pos,
            start=torch.full((b,), G, dtype=torch.long),
            mask_id=mask_id,
            eos_id=eos_id,
            pad_id=pad_id,
            commit_step=commit_step,
            conf=torch.where(valid & ~masked, 1.0, 0.0),
            nfe=torch.zeros(b, dtype=torch.long),
            eos_at=torch.full((b,), T, dtype=torch.long),
            finished_at=torch.full((b,), float("nan"), dtype=torch.float64),
            born=torch.zeros(b, dtype=torch.float64),
            steered=torch.zeros((b, T), dtype=torch.bool),
        )

    @property
    def G(self) -> int:
        """The generation start every row shares (a canvas built at once)."""
        if self.batch and bool((self.start != self.start[0]).any()):
            raise ValueError("rows of a regridded canvas start at their own columns: read start[r]")
        return int(self.start[0]) if self.batch else 0

    def regrid(self, parts: list[tuple[Canvas, list[int], int, int]]) -> None:
        """Become, in place, the rows `rows` of each part's canvas, its columns moved right by
        `shift` (left if negative: only columns no kept row uses may fall off) and its block ids
        by `blk_by` (so that a column's block is the same in every row). Columns no part covers
        are padding. In place: the step policy and the runner that hold this canvas go on."""
        T = max(c.T + shift for c, _, shift, _ in parts)
        fills = {"tokens": self.pad_id, "masked": False, "valid": False, "pos": 0, "commit_step": -1}
        fills |= {"conf": 0.0, "blk": -(10**9), "steered": False}
        new = {k: [] for k in (*fills, "start", "nfe", "eos_at", "finished_at", "born")}
        for c, rows, shift, blk_by in parts:
            idx = torch.tensor(rows, dtype=torch.long)
            lo = max(0, -shift)
            if bool(c.valid[idx, :lo].any()):
                raise ValueError(f"regrid would drop {lo} columns that rows still use")
            for k, fill in fills.items():
                src = getattr(c, k)[idx, lo:]
                out = torch.full((len(rows), T), fill, dtype=src.dtype)
                out[:, lo + shift : c.T + shift] = src + blk_by if k == "blk" else src
                new[k].append(out)
            eos = c.eos_at[idx]
            new["eos_at"].append(torch.where(eos >= c.T, T, eos + shift))
            new["start"].append(c.start[idx] + shift)
            new["nfe"].append(c.nfe[idx])
            late = c.started - self.started  # the part's clock, read on this canvas's
            new["finished_at"].append(c.finished_at[idx] + late)
            new["born"].append(c.born[idx] + late)
        for k, v in new.items():
            setattr(self, k, torch.cat(v))

    def set_grid(self, B: int) -> None:
        """Blocks of B anchored at the generation start; the prompt splits backwards from it."""
        cols = torch.arange(self.T) - self.G
        self.blk = torch.div(cols, B, rounding_mode="floor").expand(self.batch, self.T).clone()

    def expand_block(self, r: int, k: int, by: int, B: int) -> bool:
        """Grow row r's block k by `by` columns (DCD block expansion); later blocks shift right."""
        cols = (self.blk[r] == k).nonzero().flatten()
        end = int(cols[-1]) + 1
        valid_end = min(int(self.valid[r].nonzero().flatten()[-1]) + 1, int(self.eos_at[r]) + 1)
        if end >= valid_end:
            return False
        new_end = min(end + by, self.T)
        self.blk[r, end:new_end] = k
        self.blk[r, new_end:] = k + 1 + torch.div(torch.arange(self.T - new_end), B, rounding_mode="floor")
        return True

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def T(self) -> int:
        return self.tokens.shape[1]

    def done(self) -> Tensor:
        """[b] rows with nothing left to decide."""
        return ~self.masked.any(1)

    def commit(
        self, rows: Tensor, cols: Tensor, toks: Tensor, conf: Tensor, steered: Tensor | None = None
    ) -> None:
        """Write decided tokens; an EOS ends its row: masks after it become padding."""
        if len(rows) == 0:
            return
        self.tokens[rows, cols] = toks
        self.steered[rows, cols] = False if steered is None else steered
        self.masked[rows, cols] = False
        self.commit_step[rows, cols] = self.step
        self.conf[rows, cols] = conf.float()
        if self.trace is not None:
            self.trace.append(
                {
                    "step": self.step,
                    "committed": list(zip(rows.tolist(), cols.tolist(), toks.tolist(), strict=True)),
                }
            )
        eos = (toks == self.eos_id) & self.stop_at_eos
        for r, c in zip(rows[eos].tolist(), cols[eos].tolist(), strict=True):
            if c < self.eos_at[r] and c >= self.start[r]:
                self.eos_at[r] = c
                after = (torch.arange(self.T) > c) & self.valid[r]
                # The rest of the canvas becomes EOS and stays visible: the canvas a model trained
                # with EOS padding expects (dropping it from attention shrinks the sequence, which
                # a global-attention model reads as "the text ends here" and answers with EOS).
                self.masked[r, after] = False
                self.tokens[r, after] = self.eos_id
        now = time.perf_counter() - self.started
        newly = self.done() & torch.isnan(self.finished_at)
        self.finished_at[newly] = now

    def remask(self, rows: Tensor, cols: Tensor) -> None:
        self.tokens[rows, cols] = self.mask_id
        self.steered[rows, cols] = False
        self.masked[rows, cols] = True
        self.commit_step[rows, cols] = -1
        self.finished_at[rows] = float("nan")
        if self.trace is not None:
            self.trace.append(
                {"step": self.step, "remasked": list(zip(rows.tolist(), cols.tolist(), strict=True))}
            )

    def generated(self, r: int) -> Tensor:
        """The row's generated tokens, up to and excluding EOS."""
        end = min(int(self.eos_at[r]), self.T)
        cols = torch.arange(int(self.start[r]), end)
        return self.tokens[r, cols[self.valid[r, cols]]]

    def stats(self) -> list[RowStats]:
        total = time.perf_counter() - self.started
        out = []
        for r in range(self.batch):
            n = len(self.generated(r)) + int(self.eos_at[r] < self.T)
            n += int((self.commit_step[r, : self.start[r]] > 0).sum())  # blanks filled in the prompt
            end = float(self.finished_at[r]) if not torch.isnan(self.finished_at[r]) else total
            sec = end - float(self.born[r])
            out.append(RowStats(int(self.nfe[r]), n, sec, bool(self.eos_at[r] < self.T)))
        return out
