"""The inference runtime: fused projections give the unfused logits in float32; int4 holds weights
on a 4-bit (or 255-level) grid exactly, a delta beside them, and refuses weights on no grid;
forwards pick the 4-bit or the bfloat16 copy by width; decoding runs on every path."""

import copy

import pytest
import torch

from blockdiff import delta, runtime
from blockdiff.config import ConfigError
from blockdiff.decoding import generate
from blockdiff.model import BlockDiffLM, KVCache
from blockdiff.models import load_model
from blockdiff.quant import GROUP, ByWidth, Int4Linear, NotOnGrid, PackedLinear, WidthSwitch, can_pack
from blockdiff.runtime import prepare
from tests.conftest import tiny_config


def q4_1(w: torch.Tensor) -> torch.Tensor:
    """w snapped to a Q4_1 grid: per group of 32, min + step * code, code in 0..15."""
    g = w.reshape(w.shape[0], -1, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    return (lo + step * torch.round((g - lo) / step)).reshape(w.shape)


def q8_0(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, GROUP)
    step = g.abs().amax(-1, keepdim=True) / 127
    return (step * torch.round(g / step)).reshape(w.shape)


def on_grid_model(vocab: int = 70, tied: bool = True, **config) -> BlockDiffLM:
    """A small Llama whose projections are Q4_1 and whose embedding is Q8_0, as SmolLM2's GGUF."""
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=vocab, tie_word_embeddings=tied, mask_token_id=vocab - 1, **config)
    m = BlockDiffLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(q4_1(p))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(q8_0(p))
                p[vocab - 1] = torch.randn(p.shape[1])  # a trained mask row: on no grid
    return m.eval()


def with_delta(m: BlockDiffLM, scale: float = 0.05) -> BlockDiffLM:
    """m with a rank-4 delta attached and moved off zero (a trained delta's shape; a large `scale`:
    a delta whose mistakes show in the output)."""
    delta.attach(m, delta.DeltaSpec(rank=4))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return m


def test_fused_float32_logits_equal_the_unfused_model(tiny_ckpt, tok):
    plain, _ = load_model(tiny_ckpt, None)
    fused, _ = load_model(tiny_ckpt, "float32")
    assert fused.model.layers[0].self_attn.q_proj is None  # it is fused: the test can tell
    assert plain.model.layers[0].self_attn.qkv_proj is None
    ids = torch.randint(0, 200, (2, 30))
    with torch.no_grad():
        a, b = plain(ids), fused(ids)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    g1 = generate(plain, tok, ["To be", "Shall I"], sampler="bd3", max_new_tokens=12).tokens
    g2 = generate(fused, tok, ["To be", "Shall I"], sampler="bd3", max_new_tokens=12).tokens
    assert g1 == g2


@pytest.mark.parametrize("snap,planes", [(q4_1, 1), (q8_0, 2)])
def test_int4_holds_grid_weights_exactly(snap, planes):
    torch.manual_seed(1)
    w = snap(torch.randn(40, 96))  # 40 rows: not a multiple of the kernel's 16 (padded)
    lin = Int4Linear(w)
    assert lin.planes == planes
    x = torch.randn(3, 96).bfloat16()
    want = x.float() @ w.T
    got = lin(x).float()
    # only the per-group step and offset are rounded (to bfloat16): far below a 4-bit step
    assert (got - want).abs().max() < 2e-2 * want.abs().max(), (got - want).abs().max()
    with pytest.raises(NotOnGrid):
        Int4Linear(w + 1e-3 * torch.randn_like(w))


def test_int4_low_rank_delta_stays_beside_the_exact_base():
    torch.manual_seed(2)
    w = q4_1(torch.randn(64, 64))
    a, b = torch.randn(4, 64) * 0.1, torch.randn(64, 4) * 0.1
    lin = Int4Linear(w, (a, b))
    x = torch.randn(2, 64).bfloat16()
    want = x.float() @ (w + b @ a).T
    assert (lin(x).float() - want).abs().max() < 2e-2 * want.abs().max()


def test_the_switch_reads_fed_tokens_over_a_cache_never_the_batch():
    calls = []

    class Spy(torch.nn.Linear):
        def forward(self, x, tiled=False):
            calls.append(self.tag + (" on tiles" if tiled else ""))
            return super().forward(x)

    narrow, wide = Spy(8, 8, bias=False), Spy(8, 8, bias=False)
    narrow.tag, wide.tag = "narrow", "wide"
    sw = WidthSwitch(rows=4)
    bw = ByWidth(narrow, wide, sw)
    for fed, cached, batch in ((4, 10, 1), (5, 10, 1), (1, 10, 6), (3, 0, 1)):
        sw.set(fed, cached)
        bw(torch.randn(batch, fed, 8))
    # a prompt (no cache) is always wide; tiles from TILE_TOKENS tokens per sequence, whatever the batch
    assert calls == ["narrow on tiles", "wide", "narrow", "wide"]


def test_int4_rows_decode_batched_as_alone(tok):
    q = prepare(on_grid_model(vocab=tok.vocab_size + 1), "int4")
    prompts = ["To be", "Shall I compare thee to a summer's day?", "O"]
    together = generate(q, tok, prompts, sampler="ar", max_new_tokens=10, stop_at_eos=False)
    for p, t in zip(prompts, together.tokens, strict=True):
        assert generate(q, tok, [p], sampler="ar", max_new_tokens=10, stop_at_eos=False).tokens[0] == t


def test_int4_model_tracks_bfloat16_and_decodes(tok):
    m = on_grid_model(vocab=tok.vocab_size + 1)
    ref = prepare(on_grid_model(vocab=tok.vocab_size + 1), "bfloat16")
    q = prepare(m, "int4")
    attn = q.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, ByWidth) and isinstance(attn.qkv_proj.narrow, Int4Linear)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():  # one token at a time over a cache: the 4-bit path
        ca, cb = KVCache(2), KVCache(2)
        outs = []
        for t in range(12):
            a = ref(ids[:, t : t + 1], cache=ca, write_cache=True).float()
            b = q(ids[:, t : t + 1], cache=cb, write_cache=True).float()
            outs.append((a, b))
    for a, b in outs:
        a, b = a[..., : tok.vocab_size], b[..., : tok.vocab_size]
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    out = generate(q, tok, ["To be"], sampler="ar", max_new_tokens=6)
    assert out.rows[0].nfe >= 1


def test_int4_with_a_delta_equals_the_merged_model():
    m = with_delta(on_grid_model())
    merged = BlockDiffLM(m.config)
    twin = on_grid_model()
    delta.attach(twin, delta.DeltaSpec(rank=4))
    twin.load_state_dict(m.state_dict())
    delta.merge(twin)
    merged.load_state_dict(twin.state_dict())
    q = prepare(m, "int4")
    assert q.model.layers[0].mlp.down_proj.narrow.low_rank
    ids = torch.randint(0, 60, (1, 5))
    cache = KVCache(2)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():  # a first token (no cache: bfloat16), then 4 over the cache: 4-bit + delta
        first = q(ids[:, :1], cache=cache, write_cache=True)
        rest = q(ids[:, 1:], mask=causal[:, :, 1:], cache=cache, write_cache=True)
        assert not q.width_switch.wide  # the test can tell which path it read
        want = merged(ids, mask=causal).float()[..., :69]
        got = torch.cat([first, rest], 1).float()[..., :69]
    cos = torch.nn.functional.cosine_similarity(want, got, dim=-1)
    assert cos.min() > 0.999, cos
    assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_int4_refuses_weights_on_no_grid_and_auto_falls_back():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=40, num_hidden_layers=1)
    with pytest.raises(ConfigError, match="grid"):
        prepare(BlockDiffLM(cfg), "int4")
    assert prepare(BlockDiffLM(cfg), "auto").precision == "float32"
    assert prepare(on_grid_model(), "auto").precision == "int4"
    partly = on_grid_model()
    with torch.no_grad():  # the first layer and the head on the grid, the last layer not
        partly.model.layers[-1].mlp.down_proj.weight[0, 1] += 1e-3
    with pytest.raises(ConfigError, match="on no 4-bit grid"):
        prepare(partly, "auto")
    with pytest.raises(ConfigError, match="unknown precision"):
        prepare(BlockDiffLM(cfg), "int3")


@pytest.mark.parametrize("precision", ["int4", "float32"])
def test_the_compiled_decoder_loops_equal_its_python(precision):
    """TorchScript runs `decoder_stack` as compiled; the same function run by Python gives the same
    bits; the native C++ step the same numbers to rounding (int4: it reads the 4-bit codes where
    the loop reads their bfloat16 copy; tests/test_native.py compares both on the codes): a
    prompt, one token over the cache (4-bit with a delta), writes at per-row slots of rows of
    different lengths; in float32 all equal the modules' cache rule."""
    m = with_delta(on_grid_model())
    plain = copy.deepcopy(m)  # the modules, the delta beside them
    q = prepare(m, precision)
    fused = q.fused_layers
    assert isinstance(fused.stack, torch.jit.ScriptFunction)  # the test compares the paths
    assert fused.native is not None  # (BLOCKDIFF_NATIVE=0 or no compiler: this test fails)
    compiled, native = fused.stack, fused.native
    ids = torch.randint(0, 60, (2, 10))

    def seen(cache: KVCache, q: int) -> torch.Tensor:  # live cache slots, then the fed causally
        vis = cache.visible()
        vis = torch.ones(2, cache.span, dtype=torch.bool) if vis is None else vis
        causal = torch.ones(q, q, dtype=torch.bool).tril()
        return torch.cat([vis[:, None, None].expand(2, 1, q, -1), causal.expand(2, 1, q, q)], -1)

    got = {}
    with torch.no_grad():
        for name, model, stack, step in (
            ("compiled", q, compiled, None),
            ("python", q, runtime.decoder_stack, None),
            ("native", q, compiled, native),
            ("modules", plain, None, None),
        ):
            fused.stack, fused.native = stack, step
            cache = KVCache(2)
            outs = [
                model(ids[:, :6], cache=cache, write_cache=True),
                model(ids[:, 6:7], cache=cache, write_cache=True),
            ]
            if model is q and precision == "int4":
                assert not q.width_switch.wide
            cache.truncate(torch.tensor([7, 5]))  # rows of different lengths, stale keys behind row 1
            for fed in (ids[:, 7:9], ids[:, 9:]):  # writes at each row's own slots, below the span
                slots = cache.lengths[:, None] + torch.arange(fed.shape[1])
                outs.append(model(fed, mask=seen(cache, fed.shape[1]), cache=cache, write_cache=slots))
            assert cache.lengths.tolist() == [10, 8]
            live = [cache.k[i][r, :, :n] for i in range(2) for r, n in enumerate(cache.lengths.tolist())]
            got[name] = outs + live + [cache.v[1][1, :, :8]]
    tol = 1e-5 if precision == "float32" else 0.05  # bfloat16 activations: a unit in the last place
    close = lambda a, b: torch.allclose(a[..., :69].float(), b[..., :69].float(), atol=tol, rtol=tol)  # noqa: E731
    # (the mask token's logit is never read). 4-bit codes in the compiled kernel's layout are read
    # by the native step only: the loop (compiled or not) runs the bfloat16 copy.
    assert all(torch.equal(a, b) for a, b in zip(got["compiled"], got["python"], strict=True))
    assert all(close(a, b) for a, b in zip(got["python"], got["native"], strict=True))
    if precision == "float32":  # the cache's two ways of storing, as the modules' KVCache.update
        for a, b in zip(got["python"], got["modules"], strict=True):
            assert torch.allclose(a[..., :69], b[..., :69], atol=1e-5)
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        copy.deepcopy(q)


@pytest.mark.skipif(not can_pack(), reason="oneDNN has no bfloat16 on this CPU")
def test_packed_bfloat16_weights_give_the_dense_bits(monkeypatch):
    """bfloat16 weights in oneDNN's blocked layout (reordered once) give F.linear's bits: a prompt,
    one token and a few over the cache, batched."""
    m = on_grid_model()
    packed = prepare(copy.deepcopy(m), "bfloat16")
    monkeypatch.setattr(runtime, "can_pack", lambda device="cpu": False)
    dense = prepare(m, "bfloat16")
    assert isinstance(packed.lm_head, PackedLinear) and not isinstance(dense.lm_head, PackedLinear)
    ids = torch.randint(0, 60, (2, 12))
    got = []
    with torch.no_grad():
        for model in (packed, dense):
            cache = KVCache(2)
            spans = ((0, 8), (8, 9), (9, 12))
            got.append([model(ids[:, a:b], cache=cache, write_cache=True) for a, b in spans])
    assert all(torch.equal(a, b) for a, b in zip(*got, strict=True))


@pytest.mark.parametrize("precision", ["float32", "int4"])
def test_the_prepared_cache_grows_and_equals_recomputation(precision):
    """Fed in chunks past the cache's first capacity (64 slots, then 128), a prepared model's
    last logits are a full causal forward's (float32 to rounding; int4's 4-bit step against its
    own wide path: the same argmax)."""
    torch.manual_seed(3)
    q = prepare(on_grid_model(), precision)
    ids = torch.randint(0, 60, (2, 100))
    cache = KVCache(2)
    with torch.no_grad():
        for a in range(0, 99, 9):  # each chunk causal over the cache and itself
            mask = torch.ones(9, a + 9, dtype=torch.bool).tril(a)[None, None]
            step = q(ids[:, a : a + 9], mask=mask, cache=cache, write_cache=True)
        last = q(ids[:, 99:], cache=cache, write_cache=True)[:, -1]
        full = q(ids, mask=torch.ones(100, 100, dtype=torch.bool).tril()[None, None])[:, -1]
    assert cache.k[0].shape[2] >= 100 and cache.span == 100 and step.shape[1] == 9
    if precision == "float32":
        assert torch.allclose(last, full, atol=1e-4)
    else:
        top = [t[:, :69].float().argmax(-1) for t in (last, full)]  # (the mask token's logit:
        assert torch.equal(*top)  # zeroed in the 4-bit head, never read)
