"""The compiled decode step: built and used here, equal to the TorchScript loop to rounding (also
tests/test_runtime.py), every key masked gives torch's 0, bad arguments are refused with a
message, and where it cannot be built the runtime says so and runs TorchScript."""

import pytest
import torch

from blockdiff import native, runtime
from blockdiff.decoding import generate
from blockdiff.model import KVCache, rope_cos_sin
from blockdiff.runtime import prepare
from tests.test_runtime import on_grid_model, with_delta


def stack_args(model, q: int, span: int, mask=None):
    """Arguments of `decoder_stack` for q random tokens per row over a filled cache of `span`."""
    fused = model.fused_layers
    torch.manual_seed(1)
    ids = torch.randint(0, 60, (2, span))
    cache = KVCache(2)
    with torch.no_grad():
        model(ids, cache=cache, write_cache=True)
    x = torch.randn(2, q, model.config.hidden_size).to(fused.narrow[0][0].dtype)
    pos = span + torch.arange(q)[None].expand(2, q)
    cos, sin = rope_cos_sin(pos, model.config.head_dim, model.config.rope_theta, x.dtype)
    cache.reserve(x.new_empty(2, fused.nkv, 0, fused.hd), q, True)
    weights = fused.narrow if model.width_switch is not None else fused.wide
    return [x, cos, sin, mask, cache.k, cache.v, cache.span, None, *weights]


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


def test_without_a_compiler_the_runtime_warns_and_runs_torchscript(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("BLOCKDIFF_CACHE", str(tmp_path))  # no build to find
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    native.layers.cache_clear()
    try:
        with pytest.warns(UserWarning, match="native decode step is unavailable"):
            q = prepare(on_grid_model(vocab=tok.vocab_size + 1), "int4")
        assert q.fused_layers.native is None
        out = generate(q, tok, ["To be"], sampler="ar", max_new_tokens=4, stop_at_eos=False)
        assert len(out.tokens[0]) == 4
        monkeypatch.delenv("CXX")
        monkeypatch.setenv("BLOCKDIFF_NATIVE", "0")  # asked for: no build, no warning
        native.layers.cache_clear()
        assert native.layers() is None and not list(tmp_path.rglob("*.so"))
    finally:
        native.layers.cache_clear()
