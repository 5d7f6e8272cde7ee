"""Weight-only int8 inference: close to float32 (logits, greedy tokens), every sampler runs, the
tied embedding is left intact, and the CLI accepts it."""

import torch

from blockdiff.checkpoint import load_model
from blockdiff.decoding import SAMPLERS, generate
from blockdiff.masks import block_causal


def test_int8_logits_track_float32_and_every_sampler_runs():
    fp, tok = load_model("shakespeare-5m")
    q, _ = load_model("shakespeare-5m", dtype=torch.int8)
    assert type(q.lm_head).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert torch.equal(q.model.embed_tokens.weight, fp.model.embed_tokens.weight)  # untouched
    ids = torch.tensor([tok.encode("ROMEO:\nBut soft, what light through yonder window breaks?")])
    L = ids.shape[1]
    with torch.no_grad():
        a = fp(ids, mask=block_causal(L, 4, 1)).float()
        b = q(ids, mask=block_causal(L, 4, 1)).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.995, cos.min()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert not torch.equal(a, b)  # it is quantised: a test that could not tell would be worthless
    prompts = ["ROMEO:", "JULIET:\nO"]
    g_fp = generate(fp, tok, prompts, sampler="ar", max_new_tokens=16).tokens
    g_q = generate(q, tok, prompts, sampler="ar", max_new_tokens=16).tokens
    same = sum(x == y for r, s in zip(g_fp, g_q, strict=True) for x, y in zip(r, s, strict=False))
    assert same >= 0.75 * sum(len(r) for r in g_fp)
    for sampler in set(SAMPLERS) - {"spec"}:  # spec needs an NBDiff model; the demo model is not one
        out = generate(q, tok, "ROMEO:", sampler=sampler, max_new_tokens=8)
        assert out.rows[0].nfe >= 1, sampler
