"""The compiled decode step: built and used here, equal to the TorchScript loop to rounding (also
tests/test_runtime.py), every key masked gives torch's 0, bad arguments are refused with a
message, and where it cannot be built the runtime says so and runs TorchScript."""

import pytest
import torch

from blockdiff import native, quant, runtime
from blockdiff.decoding import generate
from blockdiff.model import KVCache, rope_cos_sin
from blockdiff.runtime import prepare
from tests.test_runtime import on_grid_model, q8_0, with_delta


def stack_args(model, q: int, span: int, mask=None, rope_rows: int = 2):
    """Arguments of `decoder_stack` for q random tokens per row over a filled cache of `span`
    (RoPE angles for each row, or one set for both: `rope_rows` 1)."""
    fused = model.fused_layers
    torch.manual_seed(1)
    ids = torch.randint(0, 60, (2, span))
    cache = KVCache(2)
    with torch.no_grad():
        model(ids, cache=cache, write_cache=True)
    x = torch.randn(2, q, model.config.hidden_size).to(fused.narrow[0][0].dtype)
    pos = span + torch.arange(q)[None].expand(rope_rows, q)
    cos, sin = rope_cos_sin(pos, model.config.head_dim, model.config.rope_theta, x.dtype)
    cache.reserve(x.new_empty(2, fused.nkv, 0, fused.hd), q, True)
    weights = fused.narrow if model.width_switch is not None else fused.wide
    return [x, cos, sin, mask, cache.k, cache.v, cache.span, None, *weights]


SHAPES = {
    "gqa": {},  # 4 query heads over 2 key/value heads, head size 16
    "mha": {"num_key_value_heads": 4},
    "padded": {"hidden_size": 32, "num_attention_heads": 8, "num_key_value_heads": 1},  # q|k|v 40 wide:
    # the 4-bit kernel pads its rows to 48, the delta is added after the cut; head size 4: attention's
    # per-key loops for several tokens (its query blocks take head sizes 16, 32, 64, 128)
    "hd64": {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1},  # SmolLM2's head size
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8", "int4"])
def test_every_storage_and_shape_equals_the_loop(precision, shape):
    """8 tokens per row over a cache, one mask and one set of RoPE angles for both rows (the
    broadcast forms); int4 with a delta, one projection in two 4-bit planes (a Q8_0 matrix)."""
    m = with_delta(on_grid_model(**SHAPES[shape]))
    with torch.no_grad():
        o = m.model.layers[0].self_attn.o_proj.base.weight
        o.copy_(q8_0(o))
    q = prepare(m, precision)
    if q.width_switch is not None:
        q.width_switch.wide = False
    mask = torch.ones(1, 1, 8, 6 + 8, dtype=torch.bool).tril(6)
    args = stack_args(q, 8, 6, mask, rope_rows=1)
    want = runtime.decoder_stack(*args)
    got = q.fused_layers.native(*args).float()
    tol = 1e-5 if precision == "float32" else 0.05
    assert torch.allclose(want.float(), got, atol=tol, rtol=tol), (want.float() - got).abs().max()


def test_past_the_thread_thresholds_the_native_step_equals_the_loop():
    """Attention over 300 cached keys and a delta's 4096 wide second product run on torch's threads
    (past 2^15 multiply-adds; split by heads and by columns): the loop's numbers to rounding."""
    q = prepare(with_delta(on_grid_model(intermediate_size=2048)), "int4")
    q.width_switch.wide = False
    args = stack_args(q, 1, 300)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # (on one thread both are the serial loops)
    try:
        want, got = runtime.decoder_stack(*args).float(), q.fused_layers.native(*args).float()
    finally:
        torch.set_num_threads(threads)
    # bfloat16 rounding: ~1e-3 of the largest output; a column block read at the wrong offset: ~2e-2
    assert (want - got).abs().max() < 1e-2 * want.abs().max(), (want - got).abs().max()


@pytest.mark.parametrize("precision", ["float32", "int4"])
def test_a_row_with_every_key_masked_gives_zero_as_torch(precision):
    q = prepare(with_delta(on_grid_model()), precision)
    if q.width_switch is not None:
        q.width_switch.wide = False
    mask = torch.ones(2, 1, 3, 8 + 3, dtype=torch.bool).tril(8)
    mask[1, 0, 1] = False  # row 1's second token sees nothing
    args = stack_args(q, 3, 8, mask)
    want = runtime.decoder_stack(*args)  # (both read the cache's 8 slots, write after them)
    got = q.fused_layers.native(*args)
    tol = 1e-5 if precision == "float32" else 0.05
    assert torch.allclose(want.float(), got.float(), atol=tol, rtol=tol)


def test_bad_arguments_are_refused_with_a_message():
    q = prepare(on_grid_model(), "float32")
    step = q.fused_layers.native
    args = stack_args(q, 2, 6)
    args[3] = torch.ones(2, 1, 2, 5, dtype=torch.bool)  # the mask must cover span + q keys
    with pytest.raises(RuntimeError, match="mask"):
        step(*args)
    args = stack_args(q, 2, 6)
    args[1] = args[1].double()
    with pytest.raises(RuntimeError, match="cos/sin"):
        step(*args)
    args = stack_args(q, 2, 6)
    args[7] = torch.tensor([[0, 1000], [1, 2]])  # a slot past the cache's capacity
    with pytest.raises(RuntimeError, match="slot out of the cache"):
        step(*args)
    args = stack_args(q, 2, 6)
    args[4] = [k[:, :, :7].contiguous() for k in args[4]]  # no room for the 2 fed after 6
    with pytest.raises(RuntimeError, match="cache buffers"):
        step(*args)


def test_without_a_compiler_the_runtime_warns_and_runs_torchscript(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("BLOCKDIFF_CACHE", str(tmp_path))  # no build to find
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    native.module.cache_clear()
    try:
        with pytest.warns(UserWarning, match="native decode step is unavailable"):
            q = prepare(on_grid_model(vocab=tok.vocab_size + 1), "int4")
        assert q.fused_layers.native is None
        out = generate(q, tok, ["To be"], sampler="ar", max_new_tokens=4, stop_at_eos=False)
        assert len(out.tokens[0]) == 4
        monkeypatch.delenv("CXX")
        monkeypatch.setenv("BLOCKDIFF_NATIVE", "0")  # asked for: no build, no warning
        native.module.cache_clear()
        assert native.layers() is None and not list(tmp_path.rglob("*.so"))
    finally:
        native.module.cache_clear()


def test_what_the_native_step_does_not_take_runs_torchscript():
    """Masks it is not written for (2-D, an additive float mask), other activation dtypes and a
    gradient to record go to the TorchScript loop: a float mask's forward equals the boolean one's,
    which the native step ran."""
    q = prepare(on_grid_model(), "float32")
    fused = q.fused_layers
    x = torch.zeros(2, 3, 8)
    takes = fused._native_takes
    assert takes(x, None) and takes(x, torch.ones(1, 1, 3, 9, dtype=torch.bool))
    assert not takes(x, torch.ones(3, 9, dtype=torch.bool)) and not takes(x, torch.zeros(2, 1, 3, 9))
    assert not takes(x.half(), None) and not takes(x.requires_grad_(), None)
    ids = torch.randint(0, 60, (2, 9))
    allowed = torch.ones(3, 9, dtype=torch.bool).tril(6)[None, None]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    calls = []
    native_step = fused.native
    fused.native = lambda *a: calls.append(1) or native_step(*a)
    got = []
    with torch.no_grad():
        for mask in (allowed, additive):
            cache = KVCache(2)
            q(ids[:, :6], cache=cache, write_cache=True)
            got.append(q(ids[:, 6:], mask=mask, cache=cache, write_cache=True))
    assert len(calls) == 3  # both prompts and the boolean step; not the float-mask step
    assert torch.allclose(got[0], got[1], atol=1e-5)


def test_a_narrow_forward_the_native_step_does_not_take_runs_the_bfloat16_copy():
    """The 4-bit codes are the native step's: TorchScript (here for an additive float mask) gets
    the bfloat16 copy's weights, and its output is that copy's (as a wide forward computes it)."""
    q = prepare(with_delta(on_grid_model()), "int4")
    fused = q.fused_layers
    assert fused.native_codes
    seen = []
    stack = fused.stack
    fused.stack = lambda *a: seen.append(a[9]) or stack(*a)  # a[9]: the projections' kinds
    ids = torch.randint(0, 60, (2, 9))
    allowed = torch.ones(2, 9, dtype=torch.bool).tril(7)[None, None]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        cache = KVCache(2)
        q(ids[:, :7], cache=cache, write_cache=True)
        q(ids[:, 7:], mask=additive, cache=cache, write_cache=True)
    assert not q.width_switch.wide  # a narrow forward (2 tokens over the cache)
    assert seen[-1] == fused.wide[1] and seen[-1] != fused.narrow[1]


@pytest.mark.parametrize("q", [1, 8])
def test_the_delta_reads_each_ranks_nonzero_columns_only_and_all_of_them(q, monkeypatch):
    """A fused projection's delta is block-diagonal; the native step's loops skip B's zeros by each
    rank's column range (`Int4Linear.lr_cols`; 8 tokens: the loops as where the CPU has no tiles).
    With a large delta, a range cut in half moves the output by ~1x its largest value; the kept
    ranges equal the loop to bfloat16 rounding (~1e-2)."""
    m = with_delta(on_grid_model(intermediate_size=256), scale=0.2)
    monkeypatch.setattr(quant, "tiles", lambda: False)  # no tile codes: the loops at every width
    qm = prepare(m, "int4")
    qm.width_switch.wide = False
    lin = qm.model.layers[0].self_attn.qkv_proj.narrow
    assert lin.tile_codes.numel() == 0
    assert lin.lr_cols[:, 1].sub(lin.lr_cols[:, 0]).lt(lin.out_features).all()  # q, k, v: their own columns
    args = stack_args(qm, q, 10)
    want, got = runtime.decoder_stack(*args).float(), qm.fused_layers.native(*args).float()
    assert (want - got).abs().max() < 5e-2 * want.abs().max()
    cols = lin.lr_cols
    cols[:, 1] = cols[:, 0] + (cols[:, 1] - cols[:, 0]) // 2
    cut = qm.fused_layers.native(*stack_args(qm, q, 10)).float()
    assert (want - cut).abs().max() > 3e-1 * want.abs().max()
