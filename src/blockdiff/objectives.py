"""The one training objective: block diffusion with per-sequence block sizes.

AR, MDLM, BD3-LM, mix-scale and NBDiff are settings of `block_diffusion_loss`:

* AR       = block size 1 with shifted logits (every token is a block start, predicted from the
             clean causal prefix: exactly next-token prediction; computed on x0 alone).
* MDLM     = block size L (one block, no clean context; computed on xt alone).
* BD3-LM   = 1 < B < L, vectorised over [xt ⊕ x0] with the block-causal layout.
* mix-scale= a block size per row, drawn from a set that includes L.
* NBDiff   = context_causal layout, shifted logits, plus lambda * the AR loss of the clean half.
* SFT      = any of the above with a `loss_mask` (e.g. the answer of a prompt/answer pair): only
             those tokens are ever masked and predicted; the rest is always clean context.

The diffusion term is sum over masked tokens of CE / t, divided by the number of predicted
tokens: an upper bound on the NLL per token (exp of it bounds the perplexity) when t ranges over
the full interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import masks
from .model import BlockDiffLM
from .noise import Noise, apply


@dataclass
class LossOut:
    loss: Tensor  # what is optimised: diff + ar_weight * ar
    diff: Tensor  # ELBO term per predicted token (the NLL bound)
    ar: Tensor  # AR next-token loss on the clean half (0 when not computed)
    tokens: int  # predicted tokens in the denominator
    rows: Tensor  # per-sequence diffusion term (for variance-based interval choice)


def _ce(logits: Tensor, target: Tensor, mask_id: int) -> Tensor:
    """Cross-entropy with the mask token excluded from the prediction (SUBS). A target that is
    the mask token itself (padding of `data.pad: mask`, never scored) costs 0, not inf * 0 = nan."""
    logits = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    target = target.masked_fill(target == mask_id, -100)  # cross_entropy's ignore_index
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)


def _soft_ce(student: Tensor, ar: Tensor, tgt: Tensor, tgt_ar: Tensor, mask_id: int) -> Tensor:
    """Cross-entropy of the diffusion logits [b, m, V] for columns `tgt` against the AR path's
    distribution for the same columns (rows of `ar` [b, m', V] predict columns `tgt_ar`, which
    hold every column `tgt` scores), the teacher detached; the mask token is neither side's."""
    b, L = tgt.shape[0], int(max(tgt.max(), tgt_ar.max())) + 1
    where = torch.zeros(b, L, dtype=torch.long, device=tgt.device)
    where.scatter_(1, tgt_ar, torch.arange(tgt_ar.shape[1], device=tgt.device).expand_as(tgt_ar))
    j = where.gather(1, tgt)[..., None].expand(-1, -1, ar.shape[-1])
    drop = torch.tensor([mask_id], device=ar.device)
    p = ar.detach().gather(1, j).float().index_fill(-1, drop, float("-inf")).softmax(-1)
    lq = student.float().index_fill(-1, drop, float("-inf")).log_softmax(-1).index_fill(-1, drop, 0.0)
    return -(p * lq).sum(-1)


def _scored(sel: Tensor, src: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the selected columns first, padded to the longest row: (fed output that predicts
    each, the column, real or padding), [b, m] each. The LM head and the cross-entropy then run
    where a token is scored only: for SFT rows a few dozen columns, not the whole row twice."""
    m = max(int(sel.sum(1).max()), 1)
    tgt = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :m]
    return src.gather(1, tgt).clamp(min=0), tgt, sel.gather(1, tgt)


def token_weights(ce: Tensor, alpha: float, gamma: float) -> Tensor:
    """MGDM's token-level reweighting (Ye et al. 2025, eq. 8; the focal loss): hard tokens
    (large CE) weigh more, as alpha * (1 - e^-CE)^gamma. Gradients flow through it, as theirs."""
    return alpha * (1 - torch.exp(-ce)) ** gamma


def time_weights(t: Tensor, kind: str) -> Tensor:
    """The sequence-level weight of a row noised at mask ratio t: 1/t (the ELBO) or MGDM's
    linear weight T - k for t = (k + 1) / T with T = 20, i.e. 1 + 20 (1 - t)."""
    if kind == "elbo":
        return 1 / t
    if kind == "linear":
        return 1 + 20 * (1 - t)
    raise ValueError(f"time_weight must be elbo or linear, got '{kind}'")


def scored_span(
    keep: Tensor, masked: Tensor, block_sizes: Tensor, offsets: Tensor | None
) -> tuple[Tensor, int, int]:
    """(starts [b], n, hi): what of a supervised batch the loss must feed. Columns from hi on
    (padding after every row's last scored block) are cut from both halves; row r's noisy half
    is the n columns from starts[r], which hold every block of that row with a masked token
    (a noisy block sees only itself and the clean half, so the others predict nothing). Whole
    blocks only: the loss is exactly the uncut one, and a long prompt costs its clean half only."""
    b, L = keep.shape
    cols = torch.arange(L + 1, device=keep.device).expand(b, L + 1)
    off = 0 if offsets is None else offsets[:, None].to(keep.device)
    bound = ((cols - off) % block_sizes[:, None].to(keep.device)) == 0
    bound[:, 0] = bound[:, L] = True  # the uncut layout's own ends

    def edge(x: Tensor, last: bool) -> Tensor:  # first/last True column per row; -1 if none
        i = torch.arange(L, device=x.device).expand_as(x)
        return torch.where(x, i, -1).amax(1) if last else torch.where(x, i, L).amin(1).where(x.any(1), -1)

    def up(c: Tensor) -> Tensor:  # the first boundary of each row at or after column c
        return torch.where(bound & (cols >= c[:, None]), cols, L).amin(1)

    def down(c: Tensor) -> Tensor:  # the last boundary of each row at or before column c
        return torch.where(bound & (cols <= c[:, None]), cols, 0).amax(1)

    hi = max(int(up(edge(keep, True) + 1).max()), 1)
    has = masked.any(1)
    first, last = edge(masked, False), edge(masked, True)
    s, e = down(first), up(last + 1)
    n = max(int(torch.where(has, e - s, 0).max()), 1)
    starts = torch.where(has, s.clamp(max=hi - n), hi - n)
    return starts, n, hi


def block_diffusion_loss(
    model: BlockDiffLM,
    x0: Tensor,
    block_sizes: Tensor,
    noise: Noise,
    ar_weight: float = 0.0,
    loss_mask: Tensor | None = None,
    token_weight: tuple[float, float] | None = None,
    time_weight: str = "elbo",
    distill: float = 0.0,
) -> LossOut:
    """`diff` is always the ELBO term (1/t, unweighted tokens): the NLL bound that evaluation
    reports. `loss` optimises the diffusion term with `time_weight` and `token_weight` instead
    when they are set (MGDM), plus ar_weight * the AR loss. With `distill` = β each masked
    token's cross-entropy is (1 - β) CE(data token) + β CE(the AR path's distribution for that
    column, detached): the drafter learns what the verifier will accept, not only the data."""
    cfg = getattr(model, "module", model).config  # DDP wraps the model
    b, L = x0.shape
    keep = torch.ones_like(x0, dtype=torch.bool) if loss_mask is None else loss_mask.to(x0.device)
    block_sizes = block_sizes.to(torch.long)
    for B in set(block_sizes.tolist()):
        masks.check_block_size(L, B)
    one_block = bool((block_sizes == L).all())
    starts, n = torch.zeros(b, dtype=torch.long, device=x0.device), L  # the noisy half fed per row
    if loss_mask is not None:
        noise = Noise(noise.t, noise.masked.to(x0.device) & keep, noise.offsets)
    if loss_mask is not None and not (one_block and ar_weight == 0):  # one block: all see all
        starts, n, hi = scored_span(keep, noise.masked, block_sizes, noise.offsets)
        x0, keep = x0[:, :hi], keep[:, :hi]
        noise = Noise(noise.t[:, :hi], noise.masked[:, :hi], noise.offsets)
        L = hi
    shifted, mask_id = cfg.shifted, cfg.mask_token_id
    col = torch.arange(L, device=x0.device).expand(b, L)
    after_first = keep & (col >= 1)  # targets of next-token prediction (token 0 has no context)

    if shifted and bool((block_sizes == 1).all()):
        # Every token starts its own block: it is predicted from the clean causal prefix alone.
        idx, tgt, ok = _scored(after_first, col - 1)
        logits = model(x0, mask=masks.block_causal(L, 1, b).to(x0.device), logits_slice=idx)
        ce = _ce(logits, x0.gather(1, tgt), mask_id) * ok
        ar = ce.sum() / ok.sum().clamp(min=1)
        return LossOut(ar, ar, ar, int(ok.sum()), ce.sum(1) / ok.sum(1).clamp(min=1))

    xt = apply(x0, noise, mask_id)
    t = noise.t.to(x0.device)
    weight = noise.masked.to(x0.device) / t  # 1/t on masked tokens, 0 elsewhere
    if shifted:
        weight[:, 0] = 0.0  # nothing precedes token 0
    # src[i]: which fed output predicts token i (logits are computed there only)
    src_ar = None
    if one_block and ar_weight == 0:
        # One global block: the clean half would be seen by nobody.
        fed, positions, mask = xt, None, None
        src = col - 1 if shifted else col
    else:
        if ar_weight and (cfg.layout != "context_causal" or not shifted):
            raise ValueError("the auxiliary AR loss needs layout 'context_causal' and shifted logits")
        cols = starts[:, None] + torch.arange(n, device=x0.device)  # [b, n] noisy columns fed
        order = torch.cat([cols, col + L], 1)  # and the whole clean half
        vec = masks.vectorised(L, block_sizes, layout=cfg.layout, offsets=noise.offsets).to(x0.device)
        if n < L:  # n == L means starts == 0: the whole noisy half, the mask as built
            vec = vec.gather(2, order[:, None, :, None].expand(-1, 1, -1, 2 * L))
            vec = vec.gather(3, order[:, None, None, :].expand(-1, 1, n + L, -1))
        mask = masks.split(vec, L)
        fed, positions = torch.cat([xt.gather(1, cols), x0], 1), torch.cat([cols, col], 1)
        noisy = col - starts[:, None]  # fed index of column i's noisy copy
        if shifted:
            # Token i comes from output i-1: inside the block from the noisy half, at a block
            # start from the clean half (the last clean token before the block).
            off = 0 if noise.offsets is None else noise.offsets[:, None].to(x0.device)
            block_start = ((col - off) % block_sizes[:, None].to(x0.device)) == 0
            src = torch.where(block_start, n + col - 1, noisy - 1)
        else:
            src = noisy
        if ar_weight:
            src_ar = n + col - 1
    idx, tgt, ok = _scored(weight > 0, src)
    m = idx.shape[1]
    if src_ar is not None:
        idx_ar, tgt_ar, ok_ar = _scored(after_first, src_ar)
        idx = torch.cat([idx, idx_ar], 1)
    logits = model(fed, positions=positions, mask=mask, logits_slice=idx)
    ce = _ce(logits[:, :m], x0.gather(1, tgt), mask_id)
    w = weight.gather(1, tgt) * ok
    ar = x0.new_zeros((), dtype=torch.float32)
    ce_obj = ce
    if src_ar is not None:
        ce_ar = _ce(logits[:, m:], x0.gather(1, tgt_ar), mask_id) * ok_ar
        ar = ce_ar.sum() / ok_ar.sum().clamp(min=1)
        if distill:
            soft = _soft_ce(logits[:, :m], logits[:, m:], tgt, tgt_ar, mask_id)
            ce_obj = (1 - distill) * ce + distill * soft
    elif distill:
        raise ValueError("distill reads the AR path's predictions: it needs ar_weight > 0")
    counted = after_first if shifted else keep  # token 0 of a shifted model is never predicted
    per_token = ce * w
    rows = per_token.sum(1) / counted.sum(1).clamp(min=1)
    total = counted.sum().clamp(min=1)
    diff = per_token.sum() / total  # = rows.mean() when rows count alike
    obj = diff if ce_obj is ce else (ce_obj * w).sum() / total
    if token_weight is not None or time_weight != "elbo":
        tt = t.gather(1, tgt)
        tok_w = token_weights(ce, *token_weight) if token_weight is not None else 1.0
        obj = (ce_obj * tok_w * w * time_weights(tt, time_weight) * tt).sum() / total
    return LossOut(obj + ar_weight * ar, diff, ar, int(counted.sum()), rows)


@torch.no_grad()
def ar_logprobs(
    model: BlockDiffLM, rows: list[list[int]], starts: list[int], pad_id: int, max_rows: int = 64,
    max_fed: int = 8192,
) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
    """Per row, the AR path's log p(row[t] | row[:t]) for t = starts[i] .. len(row) - 1 [float32],
    and whether each token is the greedy one: what scores a continuation (lm-eval's
    log-likelihoods) or a reasoning step. Causal forwards over groups of at most `max_rows` rows
    and `max_fed` fed positions, right-padded (a causal position never reads its padding); the
    last token is predicted, never fed, and the LM head runs only from the earliest scored
    position on. Shifted-logits models only: raw output j predicts token j + 1, and the mask
    token is never a prediction (as in `token_logits`)."""
    if not model.config.shifted:
        raise ValueError(
            "this score reads next-token probabilities: it needs a model with an AR path "
            "(logits: shifted, trained with block size 1 or an AR loss)"
        )
    out: list[tuple[Tensor, Tensor]] = [(torch.zeros(0), torch.zeros(0, dtype=torch.bool))] * len(rows)
    live = [i for i in range(len(rows)) if starts[i] < len(rows[i])]
    groups: list[list[int]] = [[]]
    for i in live:
        widest = max(len(rows[j]) for j in [*groups[-1], i])
        if groups[-1] and (len(groups[-1]) == max_rows or (len(groups[-1]) + 1) * widest > max_fed):
            groups.append([])
        groups[-1].append(i)
    dev = next(model.parameters()).device
    mid = model.config.mask_token_id
    for group in filter(None, groups):
        n = max(len(rows[i]) for i in group) - 1
        first = min(starts[i] for i in group) - 1
        ids = torch.tensor([rows[i][:-1] + [pad_id] * (n + 1 - len(rows[i])) for i in group], device=dev)
        logits = model(ids, mask=masks.block_causal(n, 1).to(dev), logits_slice=slice(first, None)).float()
        for i, row in zip(group, logits.cpu(), strict=True):
            lp = row[starts[i] - 1 - first : len(rows[i]) - 1 - first]
            if mid is not None and mid < lp.shape[-1]:
                lp[:, mid] = float("-inf")
            lp, tgt = lp.log_softmax(-1), torch.tensor(rows[i][starts[i] :], dtype=torch.long)
            out[i] = (lp.gather(-1, tgt[:, None])[:, 0], lp.argmax(-1) == tgt)
    return out
