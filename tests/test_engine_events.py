"""The engine's step API: events rebuild the output, a cancelled row leaves the others unchanged,
and the KV cache rolls rows back to their own lengths exactly."""

import pytest
import torch

from blockdiff.decoding import generate, start_decoding
from blockdiff.model import KVCache

PROMPTS = ["Shall I compare", "To be, or not", "The king is"]


@pytest.mark.parametrize("sampler, kw", [("bd3", {"block_size": 4}), ("structural", {}), ("dcd", {})])
def test_events_rebuild_the_output(make_model, tok, sampler, kw):
    m = make_model(tok)
    d = start_decoding(m, tok, PROMPTS, sampler=sampler, max_new_tokens=16, **kw)
    tokens = d.c.tokens.clone()
    events = list(d)
    for e in events:
        for r, col in e.remasked:
            tokens[r, col] = tok.mask_id
        for r, col, t in e.committed:
            tokens[r, col] = t
    out = d.output()
    assert torch.equal(tokens, out.canvas.tokens)
    assert events[-1].nfe == [s.nfe for s in out.rows]
    assert {r for e in events for r in e.finished} == {0, 1, 2}  # structural: again after a remask
    ref = generate(m, tok, PROMPTS, sampler=sampler, max_new_tokens=16, **kw)
    assert out.texts == ref.texts


@pytest.mark.parametrize("sampler, kw", [("bd3", {"block_size": 4}), ("ar", {}), ("dcd", {})])
def test_cancel_one_row_leaves_the_others(make_model, tok, sampler, kw):
    m = make_model(tok)
    ref = generate(m, tok, PROMPTS, sampler=sampler, max_new_tokens=16, **kw)
    d = start_decoding(m, tok, PROMPTS, sampler=sampler, max_new_tokens=16, **kw)
    it = iter(d)
    next(it), next(it)
    d.cancel(1)
    out = d.output()
    assert out.tokens[0] == ref.tokens[0] and out.tokens[2] == ref.tokens[2]
    assert len(out.tokens[1]) < len(ref.tokens[1]) and out.rows[1].nfe < ref.rows[1].nfe


def test_cache_truncate_per_row_equals_recomputation(make_model, tok):
    m = make_model(tok, "shifted", (1,))
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 16))
    cache = KVCache(m.config.num_hidden_layers)
    with torch.no_grad():
        m(x[:, :10], mask=torch.ones(1, 1, 10, 10).tril().bool(), cache=cache, write_cache=True)
        drafts = torch.cat([torch.ones(5, 10, dtype=torch.bool), torch.ones(5, 5).tril().bool()], 1)
        m(
            torch.randint(0, 256, (2, 5)), mask=drafts[None, None], cache=cache, write_cache=True
        )  # rolled back
        keep = torch.tensor([10, 12])
        cache.truncate(torch.tensor([10, 10]))
        causal = torch.cat([torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 2).tril().bool()], 1)
        m(x[:, 10:12], mask=causal[None, None], cache=cache, write_cache=torch.tensor([[10, 11], [10, 11]]))
        cache.truncate(keep)  # row 0 drops the last two again
        assert cache.visible().tolist() == [[True] * 10 + [False] * 2, [True] * 12]
        for r in range(2):
            n = int(keep[r])
            new = x[r : r + 1, n : n + 3]
            vis = cache.visible()[r : r + 1]
            span = vis.shape[1]
            mask = torch.cat([vis[:, None].expand(1, 3, span), torch.ones(1, 3, 3).tril().bool()], 2)
            one = KVCache(m.config.num_hidden_layers)
            one.k = [k[r : r + 1] for k in cache.k]
            one.v = [v[r : r + 1] for v in cache.v]
            one.span, one.lengths = span, torch.tensor([span])
            pos = torch.arange(n, n + 3)[None]
            got = m(new, positions=pos, mask=mask[:, None], cache=one)
            want = m(x[r : r + 1, : n + 3], mask=torch.ones(1, 1, n + 3, n + 3).tril().bool())[:, -3:]
            assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="cannot lengthen"):
        cache.truncate(torch.tensor([13, 13]))
