"""The one mask family. Every attention pattern in blockdiff is built here from a block size.

True means "may attend". Masks are boolean tensors of shape [batch, 1, q, k] (or [q, k]) and are
fed to PyTorch SDPA as they are.

* `block_causal(L, B)`: token i sees token j iff block(i) >= block(j). B=1 is causal (AR),
  B=L is bidirectional (full-sequence diffusion), anything between is block diffusion.
* `vectorised(L, B)`: the BD3-LM training layout over [xt ⊕ x0] (length 2L): noisy blocks see
  themselves and earlier clean blocks; the clean half is block-causal (or plain causal in the
  NBDiff `context_causal` layout).
* Per-sequence block sizes (mix-scale) are a batch of these, one block size per row.
* Per-sequence grid origins (`offsets`): blocks start at `offset + k*B` (SFT rows: at the
  answer, as decoding anchors its blocks at the generation start); positions before the origin
  fall into negative block ids, exactly as the decoding canvas numbers its prompt blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_sizes(block_size: int | Tensor | list[int], batch: int | None) -> Tensor:
    sizes = torch.as_tensor(block_size, dtype=torch.long)
    if sizes.ndim == 0:
        sizes = sizes.expand(batch or 1)
    return sizes


def check_block_size(seq_len: int, block_size: int) -> None:
    if block_size < 1 or seq_len % block_size:
        raise ValueError(
            f"block_size {block_size} does not divide seq_len {seq_len}; "
            f"choose a divisor of {seq_len} (e.g. {', '.join(str(d) for d in _divisors(seq_len)[:8])})"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def block_ids(positions: Tensor, block_size: int | Tensor, offsets: Tensor | None = None) -> Tensor:
    """Block index of each absolute position; `block_size` and `offsets` (grid origins)
    broadcast over leading dims."""
    bs = torch.as_tensor(block_size, device=positions.device)
    off = torch.as_tensor(0 if offsets is None else offsets, device=positions.device)
    while bs.ndim < positions.ndim:
        bs = bs.unsqueeze(-1)
    while off.ndim < positions.ndim:
        off = off.unsqueeze(-1)
    return torch.div(positions - off, bs, rounding_mode="floor")


def block_causal(
    seq_len: int,
    block_size: int | Tensor | list[int],
    batch: int | None = None,
    offsets: Tensor | None = None,
) -> Tensor:
    """[b, 1, L, L] mask: token i sees j iff block(i) >= block(j)."""
    sizes = _as_sizes(block_size, batch)
    pos = torch.arange(seq_len)
    blk = block_ids(pos.expand(len(sizes), seq_len), sizes, offsets)  # [b, L]
    return (blk[:, :, None] >= blk[:, None, :]).unsqueeze(1)


def vectorised(
    seq_len: int,
    block_size: int | Tensor | list[int],
    batch: int | None = None,
    layout: str = "block_causal",
    offsets: Tensor | None = None,
) -> Tensor:
    """[b, 1, 2L, 2L] mask for the input [xt ⊕ x0]; both halves carry positions 0..L-1.

    M_BD  = same block and same half                 (bidirectional inside a block)
    M_OBC = noisy query, clean key, earlier block    (noisy blocks see the clean prefix)
    M_BC  = clean query, clean key, block(q) >= block(k)   (or q >= k for context_causal)
    """
    sizes = _as_sizes(block_size, batch)
    idx = torch.arange(2 * seq_len)
    clean = idx >= seq_len
    pos = idx % seq_len
    blk = block_ids(pos.expand(len(sizes), 2 * seq_len), sizes, offsets)  # [b, 2L]
    bq, bk = blk[:, :, None], blk[:, None, :]
    fq, fk = clean[None, :, None], clean[None, None, :]
    m_bd = (bq == bk) & (fq == fk)
    m_obc = (bq > bk) & fk & ~fq
    if layout == "block_causal":
        m_bc = (bq >= bk) & fk & fq
    elif layout == "context_causal":
        m_bc = (pos[:, None] >= pos[None, :])[None] & fk & fq
        m_bd = m_bd & ~(fq & fk)  # the clean half is plain causal, not bidirectional per block
    else:
        raise ValueError(f"unknown layout '{layout}' (known: block_causal, context_causal)")
    return (m_bd | m_obc | m_bc).unsqueeze(1)


def split(mask: Tensor, seq_len: int):
    """The vectorised mask as a SplitMask, for attention that skips clean-to-noisy work; the
    clean half is the last `seq_len` rows and keys (the noisy half may be shorter)."""
    from .model import SplitMask

    n = mask.shape[-2] - seq_len
    if mask[..., n:, :n].any():
        raise ValueError("clean queries attend noisy keys: this mask cannot be split")
    return SplitMask(noisy=mask[..., :n, :], clean=mask[..., n:, n:])
