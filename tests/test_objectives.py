"""Loss values against hand-computed cases, and the identities that tie the family together."""

import math

import pytest
import torch

from blockdiff import noise
from blockdiff.config import ModelConfig
from blockdiff.model import BlockDiffLM
from blockdiff.objectives import block_diffusion_loss
from tests.conftest import tiny_config

V, MASK = 6, 5


class TableModel(torch.nn.Module):
    """Output row j of the fed sequence = table[j]: which row the loss reads is then visible."""

    def __init__(self, table: torch.Tensor, logits="aligned", layout="block_causal"):
        super().__init__()
        self.table = table
        self.config = ModelConfig(
            vocab_size=V,
            hidden_size=8,
            num_attention_heads=1,
            num_key_value_heads=1,
            mask_token_id=MASK,
            logits=logits,
            layout=layout,
        )
        self.fed = None

    def forward(self, ids, positions=None, mask=None, logits_slice=None, **kw):
        self.fed = (ids, mask)
        out = self.table[: ids.shape[1]][None].expand(ids.shape[0], -1, -1)
        if logits_slice is not None:  # as the model: only these outputs
            out = out.gather(1, logits_slice[..., None].expand(-1, -1, out.shape[-1]))
        return out


def ce(row: torch.Tensor, target: int) -> float:
    row = row.clone()
    row[MASK] = float("-inf")  # SUBS: the mask token is never predicted
    return -float(torch.log_softmax(row.double(), -1)[target])


def test_bd3_aligned_hand_computed():
    torch.manual_seed(0)
    table = torch.randn(8, V)
    m = TableModel(table)
    x0 = torch.tensor([[0, 1, 2, 3]])
    nz = noise.Noise(
        t=torch.tensor([[0.5, 0.5, 0.25, 0.25]]), masked=torch.tensor([[True, False, False, True]])
    )
    out = block_diffusion_loss(m, x0, torch.tensor([2]), nz)
    expected = (ce(table[0], 0) / 0.5 + ce(table[3], 3) / 0.25) / 4
    assert out.diff.item() == pytest.approx(expected, rel=1e-6)
    fed, mask = m.fed
    assert fed.tolist() == [[MASK, 1, 2, MASK, 0, 1, 2, 3]]  # [xt ⊕ x0]
    assert mask.noisy.shape == (1, 1, 4, 8) and mask.clean.shape == (1, 1, 4, 4)  # split attention


def test_bd3_shifted_reads_previous_output():
    """Shifted: token i from output i-1; at a block start, from the clean half's output i-1."""
    torch.manual_seed(1)
    table = torch.randn(8, V)
    m = TableModel(table, logits="shifted")
    x0 = torch.tensor([[0, 1, 2, 3]])
    nz = noise.Noise(t=torch.full((1, 4), 0.5), masked=torch.tensor([[True, True, True, True]]))
    out = block_diffusion_loss(m, x0, torch.tensor([2]), nz)
    # token 0: nothing before it (excluded); token 1: noisy row 0; token 2 (block start): clean row
    # 4 + 1 = 5; token 3: noisy row 2.
    expected = (ce(table[0], 1) + ce(table[5], 2) + ce(table[2], 3)) / 0.5 / 3
    assert out.diff.item() == pytest.approx(expected, rel=1e-6)


def test_mdlm_hand_computed_uses_xt_alone():
    torch.manual_seed(2)
    table = torch.randn(4, V)
    m = TableModel(table)
    x0 = torch.tensor([[4, 3, 2, 1]])
    nz = noise.Noise(t=torch.full((1, 4), 0.8), masked=torch.tensor([[False, True, True, False]]))
    out = block_diffusion_loss(m, x0, torch.tensor([4]), nz)
    assert out.diff.item() == pytest.approx((ce(table[1], 3) + ce(table[2], 2)) / 0.8 / 4, rel=1e-6)
    assert m.fed[0].shape == (1, 4) and m.fed[1] is None  # one global block: no clean half, full attention


def test_nbdiff_ar_term_hand_computed():
    torch.manual_seed(3)
    table = torch.randn(8, V)
    m = TableModel(table, logits="shifted", layout="context_causal")
    x0 = torch.tensor([[0, 1, 2, 3]])
    nz = noise.Noise(t=torch.full((1, 4), 0.5), masked=torch.zeros(1, 4, dtype=torch.bool))
    out = block_diffusion_loss(m, x0, torch.tensor([2]), nz, ar_weight=0.5)
    ar = (ce(table[4], 1) + ce(table[5], 2) + ce(table[6], 3)) / 3
    assert out.diff.item() == 0.0
    assert out.ar.item() == pytest.approx(ar, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * ar, rel=1e-6)


def soft_ce(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """-sum_v p(v) log q(v), both without the mask token."""
    s, t = student.clone().double(), teacher.clone().double()
    s[MASK] = t[MASK] = float("-inf")
    p, lq = torch.softmax(t, -1), torch.log_softmax(s, -1)
    return -float(sum(p[v] * lq[v] for v in range(V) if v != MASK))


def test_distilled_drafter_term_hand_computed():
    """distill = β: each masked token's CE is (1 - β) CE(data) + β CE(the AR path's distribution
    for that column). Blocks of 2 over [0 1 2 3], columns 1 and 3 masked: column 1 is predicted by
    noisy row 0 and taught by clean row 4 (the AR output before it), column 3 by rows 2 and 6."""
    torch.manual_seed(4)
    table = torch.randn(8, V, requires_grad=True)
    m = TableModel(table, logits="shifted", layout="context_causal")
    x0 = torch.tensor([[0, 1, 2, 3]])
    nz = noise.Noise(t=torch.full((1, 4), 0.5), masked=torch.tensor([[False, True, False, True]]))
    beta, T = 0.25, table.detach()
    out = block_diffusion_loss(m, x0, torch.tensor([2]), nz, ar_weight=0.5, distill=beta)
    data = 2 * ce(T[0], 1) + 2 * ce(T[2], 3)
    taught = 2 * soft_ce(T[0], T[4]) + 2 * soft_ce(T[2], T[6])
    ar = (ce(T[4], 1) + ce(T[5], 2) + ce(T[6], 3)) / 3
    assert out.diff.item() == pytest.approx(data / 3, rel=1e-6)  # the NLL bound: data tokens only
    assert out.loss.item() == pytest.approx(((1 - beta) * data + beta * taught) / 3 + 0.5 * ar, rel=1e-5)
    out.loss.backward()  # the teacher is detached: its rows get the AR loss's gradient only
    only_ar = table.grad.clone()
    table.grad = None
    block_diffusion_loss(m, x0, torch.tensor([2]), nz, ar_weight=0.5).loss.backward()
    assert torch.allclose(only_ar[4:], table.grad[4:])
    with pytest.raises(ValueError, match="ar_weight"):
        block_diffusion_loss(m, x0, torch.tensor([2]), nz, distill=0.5)


def _real_model(logits):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=V, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=1, mask_token_id=MASK, logits=logits)  # fmt: skip
    return BlockDiffLM(cfg).eval()


def test_shifted_b1_is_exactly_the_ar_loss():
    """AR = block size 1 with shifted logits, whatever the noise: the vectorised computation
    (forced by mixing in a B=2 row) gives the AR loss on the B=1 rows."""
    m = _real_model("shifted")
    x0 = torch.randint(0, 5, (2, 8))
    g = torch.Generator().manual_seed(0)
    ar = block_diffusion_loss(m, x0, torch.tensor([1, 1]), noise.draw((2, 8), torch.tensor([1, 1]), g))
    nz = noise.Noise(t=torch.full((2, 8), 0.3), masked=torch.rand(2, 8, generator=g) < 0.5)
    nz.masked[0] = True  # every token of the B=1 row masked (weight 1/t, so set t=1 there)
    nz.t[0] = 1.0
    mixed = block_diffusion_loss(m, x0, torch.tensor([1, 2]), nz)
    assert mixed.rows[0].item() == pytest.approx(ar.rows[0].item(), rel=1e-5)


def test_bd3_b1_equals_ar_in_expectation():
    """Aligned B=1: E_t[1[masked] CE / t] = CE with every token masked (the AR loss of this
    parameterisation), estimated by Monte Carlo over many noise draws."""
    m = _real_model("aligned")
    x0 = torch.randint(0, 5, (1, 8))
    exact = block_diffusion_loss(
        m, x0, torch.tensor([1]), noise.Noise(torch.ones(1, 8), torch.ones(1, 8).bool())
    )
    g = torch.Generator().manual_seed(0)
    reps = 4000
    x = x0.expand(reps, 8)
    with torch.no_grad():
        est = block_diffusion_loss(
            m, x, torch.full((reps,), 1), noise.draw((reps, 8), torch.full((reps,), 1), g)
        )
    se = est.rows.std().item() / math.sqrt(reps)
    assert abs(est.diff.item() - exact.diff.item()) < 4 * se
    assert se < 0.05 * exact.diff.item()


def test_antithetic_levels_are_stratified():
    g = torch.Generator().manual_seed(0)
    t = noise.sample_levels(10, g, (0.0, 1.0), antithetic=True)
    assert sorted((t * 10).floor().long().tolist()) == list(range(10))
    t = noise.sample_levels(1000, g, (0.3, 0.8), antithetic=False)
    assert t.min() >= 0.3 and t.max() <= 0.8


def test_noise_is_per_block():
    g = torch.Generator().manual_seed(0)
    nz = noise.draw((3, 8), torch.tensor([2, 4, 8]), g)
    for r, B in enumerate([2, 4, 8]):
        blocks = nz.t[r].view(-1, B)
        assert torch.equal(blocks, blocks[:, :1].expand_as(blocks))


def test_global_block_vectorised_equals_mdlm_path():
    """B = L seen through the vectorised layout (forced by a B=2 row beside it) gives the same
    loss as the xt-only MDLM computation: the clean half is invisible to a single block."""
    m = _real_model("aligned")
    x0 = torch.randint(0, 5, (2, 8))
    g = torch.Generator().manual_seed(3)
    nz = noise.draw((2, 8), torch.tensor([8, 2]), g)
    mixed = block_diffusion_loss(m, x0, torch.tensor([8, 2]), nz)
    alone = block_diffusion_loss(m, x0[:1], torch.tensor([8]), nz.rows(slice(0, 1)))
    assert mixed.rows[0].item() == pytest.approx(alone.rows[0].item(), rel=1e-5)


@pytest.mark.parametrize("origin,with_mask", [(0, False), (3, False), (3, True)])
def test_vectorised_bd3_equals_block_by_block(origin, with_mask):
    """The [xt ⊕ x0] layout is an implementation of the definition: for each block, the model
    reads the clean prefix and the noisy block (block-causal), and scores the block's masked
    tokens with weight 1/t. Also with a shifted grid origin (supervised rows)."""
    import torch.nn.functional as F

    from blockdiff import masks
    from blockdiff.noise import apply

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, mask_token_id=15,
    )  # fmt: skip
    m = BlockDiffLM(cfg).eval()
    b, L, B = 3, 12, 4
    x0 = torch.randint(0, 15, (b, L))
    bs, off = torch.full((b,), B), torch.full((b,), origin)
    nz = noise.draw((b, L), bs, torch.Generator().manual_seed(1), offsets=off if origin else None)
    keep = torch.ones(b, L, dtype=torch.bool) if with_mask else None  # a loss mask keeps the grid
    got = block_diffusion_loss(m, x0, bs, nz, loss_mask=keep).loss
    xt = apply(x0, nz, 15)
    cuts = sorted({0, L, *range(origin % B, L, B)})
    total = torch.zeros(())
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        inp = torch.cat([x0[:, :lo], xt[:, lo:hi]], 1)
        with torch.no_grad():
            lg = m(inp, mask=masks.block_causal(hi, B, b, offsets=off))[:, lo:].float()
        lg[..., 15] = float("-inf")
        ce = F.cross_entropy(lg.flatten(0, 1), x0[:, lo:hi].flatten(), reduction="none").view(b, -1)
        total = total + (ce * nz.masked[:, lo:hi] / nz.t[:, lo:hi]).sum()
    assert torch.allclose(got, total / (b * L), atol=1e-5)


def test_mgdm_token_weight_values():
    from blockdiff.objectives import token_weights

    ln2 = torch.tensor([math.log(2)])
    # p = 1/2: alpha (1 - p)^gamma
    assert token_weights(ln2, 0.25, 2).item() == pytest.approx(0.0625)
    assert token_weights(ln2, 0.25, 1).item() == pytest.approx(0.125)
    assert token_weights(torch.tensor([0.0]), 0.25, 1).item() == 0.0  # a sure token weighs nothing


def test_mgdm_weighted_loss_hand_computed():
    """loss = sum over masked of alpha (1 - e^-ce)^gamma * ce * w(t), over the scored tokens; the
    reported diff stays the ELBO term."""
    torch.manual_seed(2)
    table = torch.randn(4, V)
    m = TableModel(table)
    x0 = torch.tensor([[4, 3, 2, 1]])
    t = torch.tensor([[0.8, 0.8, 0.3, 0.3]])
    nz = noise.Noise(t=t, masked=torch.tensor([[False, True, True, False]]))
    c1, c2 = ce(table[1], 3), ce(table[2], 2)
    focal = lambda c, g: 0.25 * (1 - math.exp(-c)) ** g * c  # noqa: E731
    for tw, w1, w2 in [("elbo", 1 / 0.8, 1 / 0.3), ("linear", 1 + 20 * 0.2, 1 + 20 * 0.7)]:
        out = block_diffusion_loss(m, x0, torch.tensor([4]), nz, token_weight=(0.25, 2), time_weight=tw)
        assert out.loss.item() == pytest.approx((focal(c1, 2) * w1 + focal(c2, 2) * w2) / 4, rel=1e-5)
        assert out.diff.item() == pytest.approx((c1 / 0.8 + c2 / 0.3) / 4, rel=1e-6)
    out = block_diffusion_loss(m, x0, torch.tensor([4]), nz, time_weight="linear")
    assert out.loss.item() == pytest.approx((c1 * (1 + 20 * 0.2) + c2 * (1 + 20 * 0.7)) / 4, rel=1e-5)
    plain = block_diffusion_loss(m, x0, torch.tensor([4]), nz)
    assert plain.loss.item() == plain.diff.item()  # defaults: the ELBO itself
    with pytest.raises(ValueError, match="time_weight"):
        block_diffusion_loss(m, x0, torch.tensor([4]), nz, time_weight="cosine")


@pytest.mark.parametrize(
    "block_sizes, logits", [([8], "aligned"), ([2], "aligned"), ([1], "shifted"), ([2], "shifted")]
)
def test_mask_padding_is_never_scored(block_sizes, logits):
    """Rows padded with mask tokens (data.pad: mask): the padding is never scored, so the loss is
    finite (a mask target used to cost inf * 0 = nan); for AR it equals any other padding's."""
    model = _real_model(logits)
    keep = torch.tensor([[False, False, True, True, True, False, False, False]])
    padded = torch.tensor([[0, 1, 2, 3, 4, MASK, MASK, MASK]])
    nz = noise.Noise(t=torch.full((1, 8), 0.5), masked=torch.tensor([[True] * 8]))
    out = block_diffusion_loss(model, padded, torch.tensor(block_sizes), nz, loss_mask=keep)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    if block_sizes == [1]:  # causal (AR): padding after every scored token cannot matter
        other = padded.masked_fill(padded == MASK, 4)
        ref = block_diffusion_loss(model, other, torch.tensor(block_sizes), nz, loss_mask=keep)
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


@pytest.mark.parametrize(
    "logits, layout, sizes, origin, ar_weight",
    [
        ("aligned", "block_causal", [2, 2, 2], False, 0.0),
        ("shifted", "block_causal", [4, 4, 4], True, 0.0),
        ("shifted", "context_causal", [4, 4, 4], True, 0.5),
        ("shifted", "context_causal", [2, 4, 1], False, 0.5),
        ("shifted", "context_causal", [1, 1, 1], False, 0.0),
        ("shifted", "context_causal", [16, 4, 4], False, 0.5),
    ],
)
def test_supervised_rows_feed_only_the_scored_span(monkeypatch, logits, layout, sizes, origin, ar_weight):
    """SFT rows (long prompt, short answer, mask padding): the loss feeds the noisy half from the
    first masked block on and drops the padding after the last scored block. Oracle: the uncut
    computation (scored_span forced to the whole row) gives the same loss, terms and gradients."""
    from blockdiff import objectives

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, mask_token_id=MASK, logits=logits, layout=layout,
    )  # fmt: skip
    m = BlockDiffLM(cfg)
    b, L = 3, 16
    starts, ends = torch.tensor([8, 9, 12]), torch.tensor([11, 12, 13])  # answers [start, end)
    col = torch.arange(L)
    keep = (col >= starts[:, None]) & (col < ends[:, None])
    x0 = torch.randint(0, MASK, (b, L)).masked_fill(col >= ends[:, None], MASK)  # data.pad: mask
    bs = torch.tensor(sizes)
    off = starts if origin else None
    nz = noise.draw((b, L), bs, torch.Generator().manual_seed(1), offsets=off)
    nz = noise.Noise(nz.t, nz.masked | keep, nz.offsets)  # every answer token masked: nothing trivial
    fed = []
    m.register_forward_pre_hook(lambda mod, args, kw: fed.append(args[0].shape[1]), with_kwargs=True)

    def run():
        m.zero_grad()
        out = block_diffusion_loss(m, x0, bs, nz, ar_weight=ar_weight, loss_mask=keep)
        out.loss.backward()
        return out, [p.grad.clone() for p in m.parameters() if p.grad is not None]

    cut, g_cut = run()
    uncut = lambda keep, *a: (torch.zeros(len(keep), dtype=torch.long), keep.shape[1], keep.shape[1])  # noqa: E731
    monkeypatch.setattr(objectives, "scored_span", uncut)
    whole, g_whole = run()
    # the cut fed fewer tokens (else the comparison is vacuous), except beside a one-block row
    assert (fed[0] < fed[1]) == (L not in sizes)
    for a, w in [(cut.loss, whole.loss), (cut.diff, whole.diff), (cut.ar, whole.ar), (cut.rows, whole.rows)]:
        assert torch.allclose(a, w, atol=1e-6, rtol=1e-5)
    assert cut.tokens == whole.tokens
    assert all(torch.allclose(a, w, atol=1e-6, rtol=1e-4) for a, w in zip(g_cut, g_whole, strict=True))


def test_scored_span_bounds():
    """Per row: the noisy span holds whole blocks around its masked tokens, in the row's own grid;
    hi ends the last block with a scored token."""
    from blockdiff.objectives import scored_span

    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[0, 9:11], keep[1, 6:8] = True, True
    masked = keep.clone()
    masked[0, 9] = False  # row 0: masked col 10 only -> its block [8, 12)

    def span(sizes, offsets=None):
        s, n, hi = scored_span(keep, masked, torch.tensor(sizes), offsets)
        return s.tolist(), n, hi

    assert span([4, 4]) == ([8, 4], 4, 12)
    assert span([4, 2]) == ([8, 6], 4, 12)
    assert span([4, 4], torch.tensor([1, 3])) == ([5, 3], 8, 13)  # row 1: blocks [3, 7) and [7, 11)
    assert span([4, 4], torch.tensor([1, 2])) == ([9, 6], 4, 13)
    assert span([1, 1]) == ([9, 6], 2, 11)  # row 0's window ends at hi
    assert span([16, 4]) == ([0, 0], 16, 16)  # a one-block row needs everything
    none = torch.zeros_like(keep)
    s, n, hi = scored_span(keep, none, torch.tensor([4, 4]), None)
    assert (n, hi) == (1, 12) and s.tolist() == [11, 11]  # nothing masked: one column, still fed
