"""Weight-only int8 inference: close to bfloat16 (logits, greedy tokens), the product equals the
dequantised weights', every sampler runs, the tied embedding is left intact."""

import torch

from blockdiff.decoding import SAMPLERS, generate
from blockdiff.masks import block_causal
from blockdiff.models import load_model
from blockdiff.quant import Int8Linear


def test_int8_logits_track_float32_and_every_sampler_runs():
    fp, tok = load_model("shakespeare-5m", torch.bfloat16)  # int8 keeps bf16 activations
    q, _ = load_model("shakespeare-5m", torch.int8)
    assert isinstance(q.lm_head, Int8Linear) and q.lm_head.weight.dtype == torch.int8
    assert torch.equal(q.model.embed_tokens.weight, fp.model.embed_tokens.weight.bfloat16())  # untouched
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


def test_int8_linear_is_the_dequantised_product():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=False)
    q = Int8Linear(lin)
    w = q.weight.float() * q.scale.float()[:, None]
    assert (w - lin.weight).abs().max() <= q.scale.float().max()  # half a step + the bf16 scale
    x = torch.randn(3, 5, 64)
    want = (x.bfloat16().float() @ w.T).float()
    assert torch.allclose(q(x).float(), want, rtol=2e-2, atol=2e-2)
