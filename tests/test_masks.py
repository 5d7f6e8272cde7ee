"""Mask semantics by perturbation: changing a token the mask forbids must not change the logits."""

import pytest
import torch

from blockdiff import masks
from blockdiff.config import ModelConfig
from blockdiff.model import BlockDiffLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mask_token_id=49,
    )
    return BlockDiffLM(cfg).eval()


def _dependence(model, ids, positions, mask):
    """dep[q, k] = True iff perturbing input k changes output q."""
    with torch.no_grad():
        base = model(ids, positions=positions, mask=mask)
        n = ids.shape[1]
        dep = torch.zeros(n, n, dtype=torch.bool)
        for k in range(n):
            pert = ids.clone()
            pert[0, k] = (pert[0, k] + 7) % 48
            out = model(pert, positions=positions, mask=mask)
            dep[:, k] = (out - base)[0].abs().amax(-1) > 1e-6
    return dep


def _reachable(m: torch.Tensor, layers: int) -> torch.Tensor:
    """Which inputs can reach which outputs through `layers` rounds of attention."""
    m = m.float()
    r = torch.eye(len(m))
    for _ in range(layers):
        r = ((m @ r) > 0).float()
    return r.bool()


@pytest.mark.parametrize("B", [1, 2, 4, 8])
def test_block_causal_perturbation(model, B):
    L = 8
    ids = torch.randint(0, 48, (1, L))
    mask = masks.block_causal(L, B)
    dep = _dependence(model, ids, None, mask)
    expected = _reachable(mask[0, 0], 2)
    assert torch.equal(dep, expected)
    blk = torch.arange(L) // B
    assert torch.equal(expected, blk[:, None] >= blk[None, :])  # block-causal closure is itself


@pytest.mark.parametrize("layout", ["block_causal", "context_causal"])
@pytest.mark.parametrize("B", [1, 2, 4])
def test_vectorised_perturbation(model, B, layout):
    L = 8
    ids = torch.randint(0, 48, (1, 2 * L))
    pos = torch.cat([torch.arange(L), torch.arange(L)])[None]
    mask = masks.vectorised(L, B, layout=layout)
    dep = _dependence(model, ids, pos, mask)
    assert torch.equal(dep, _reachable(mask[0, 0], 2))
    # Semantics, independent of the builder: noisy i depends on noisy j iff same block, and on
    # clean j iff j's block is earlier; clean i depends on noisy nothing.
    blk = torch.arange(L) // B
    noisy_noisy = dep[:L, :L]
    assert torch.equal(noisy_noisy, blk[:, None] == blk[None, :])
    assert torch.equal(dep[:L, L:], blk[:, None] > blk[None, :])
    assert not dep[L:, :L].any()
    pos_ = torch.arange(L)
    clean = (pos_[:, None] >= pos_[None, :]) if layout == "context_causal" else (blk[:, None] >= blk[None, :])
    assert torch.equal(dep[L:, L:], clean)


def test_mix_scale_rows_get_their_own_block_size():
    L = 8
    m = masks.vectorised(L, torch.tensor([1, 4, 8]))
    for row, B in enumerate([1, 4, 8]):
        assert torch.equal(m[row], masks.vectorised(L, B)[0])
    assert torch.equal(masks.block_causal(L, 8)[0, 0], torch.ones(L, L, dtype=torch.bool))
    assert torch.equal(masks.block_causal(L, 1)[0, 0], torch.ones(L, L, dtype=torch.bool).tril())


def test_block_size_must_divide():
    with pytest.raises(ValueError, match="block_size 3 does not divide seq_len 8"):
        masks.check_block_size(8, 3)


@pytest.mark.parametrize("layout", ["block_causal", "context_causal"])
def test_split_attention_equals_full_mask(model, layout):
    """Skipping the clean-to-noisy attention work changes nothing (it is all masked)."""
    L = 8
    ids = torch.randint(0, 48, (3, 2 * L))
    pos = torch.cat([torch.arange(L), torch.arange(L)]).expand(3, 2 * L)
    full = masks.vectorised(L, torch.tensor([2, 4, 8]), layout=layout)
    with torch.no_grad():
        a = model(ids, positions=pos, mask=full)
        b = model(ids, positions=pos, mask=masks.split(full, L))
    assert (a - b).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="cannot be split"):
        masks.split(torch.ones(1, 1, 2 * L, 2 * L, dtype=torch.bool), L)


def test_grid_offsets_move_block_boundaries():
    """Blocks cut at offset + k*B (SFT rows: at the answer start, where decoding starts its
    blocks); positions before the origin form earlier (negative) blocks, the first one partial."""
    import torch

    from blockdiff.masks import block_causal, vectorised
    from blockdiff.noise import draw, grid_offsets

    L, B, off = 12, 4, torch.tensor([0, 3])
    m = block_causal(L, B, offsets=off)[:, 0]
    for r, o in enumerate(off.tolist()):
        blk = [(i - o) // B for i in range(L)]
        want = torch.tensor([[blk[i] >= blk[j] for j in range(L)] for i in range(L)])
        assert torch.equal(m[r], want)
    v = vectorised(L, B, offsets=off)[:, 0]
    assert torch.equal(v[1, L:, L:], m[1]) and torch.equal(v[0], vectorised(L, B, batch=1)[0, 0])
    nz = draw((2, L), torch.tensor([B, B]), torch.Generator().manual_seed(0), offsets=off)
    t = nz.t[1].tolist()  # row 1: blocks [0,3), [3,7), [7,11), [11,12)
    assert len({t[0], t[1], t[2]}) == 1 and len(set(t[3:7])) == 1 and len(set(t[7:11])) == 1
    assert len({t[0], t[3], t[7], t[11]}) == 4
    same = draw((2, L), torch.tensor([B, B]), torch.Generator().manual_seed(0))
    assert torch.equal(
        same.t, draw((2, L), torch.tensor([B, B]), torch.Generator().manual_seed(0), offsets=None).t
    )
    keep = torch.zeros(3, L, dtype=torch.bool)
    keep[0, 5:], keep[1, 2:], keep[2, 7:] = True, True, True
    assert grid_offsets(keep, torch.tensor([4, 1, L])).tolist() == [5, 2, 0]  # B=L: one block
