"""The AMX tile kernel for 4-/8-bit codes (csrc/tiles.cpp): its products equal the float64 product
of the very weights it was given to one bfloat16 rounding of each output, for every shape of N
(column tiles of 16, padded) and of the rows (chunks of 16), and a row's numbers never depend on
the rows beside it. Skipped where the CPU has no AMX (the runtime then keeps csrc/lowbit.cpp)."""

import os
import subprocess
import sys

import pytest
import torch

from blockdiff import native, quant, runtime
from blockdiff.decoding import generate
from blockdiff.quant import Int4Linear
from blockdiff.runtime import prepare, tiles_from
from tests.test_native import stack_args
from tests.test_runtime import on_grid_model, q4_1, q8_0, with_delta

m = native.module()
needs_tiles = pytest.mark.skipif(m is None or not m.tiles_usable(), reason="no AMX tiles on this CPU")


def packed(bits: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    step = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3
    offset = torch.randn(n, k // 32, generator=g) * 0.01
    w = offset.double().repeat_interleave(32, 1) + step.double().repeat_interleave(32, 1) * codes.double()
    return w, m.tiles_pack(codes, step, offset, bits)


def close(y: torch.Tensor, want: torch.Tensor) -> bool:
    """Within one bfloat16 rounding of each output (2^-8 relative), plus float32 sums' error."""
    return bool(((y.double() - want).abs() <= want.abs() * 2**-8 + 1e-5 * want.abs().max()).all())


@needs_tiles
@pytest.mark.parametrize("bits", [4, 8])
def test_products_equal_the_weights_product_and_rows_are_batch_independent(bits):
    for n, k in ((40, 96), (16, 32), (48, 576)):  # a padded column tile; one group; the model's K
        w, (codes, scales) = packed(bits, n, k)
        for rows in (1, 2, 3, 5, 16, 17, 35):  # every chunk size, and more than one chunk
            x = torch.randn(rows, k).bfloat16()
            y = m.tiles_mm(x, codes, scales, bits, n)
            assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
            assert close(y, x.double() @ w.T), (bits, n, k, rows)
            for r in {0, rows - 1, min(16, rows - 1)}:  # alone as in the batch, bit for bit
                assert torch.equal(m.tiles_mm(x[r : r + 1], codes, scales, bits, n)[0], y[r])


@needs_tiles
def test_a_wrong_step_is_seen():
    """The check above has the power to see a scale read for the wrong group."""
    w, (codes, scales) = packed(4, 16, 64)
    x = torch.randn(4, 64).bfloat16()
    assert close(m.tiles_mm(x, codes, scales, 4, 16), x.double() @ w.T)
    swapped = scales.flip(1).contiguous()  # the two groups' steps and offsets exchanged
    assert not close(m.tiles_mm(x, codes, swapped, 4, 16), x.double() @ w.T)


@needs_tiles
@pytest.mark.parametrize("snap", [q4_1, q8_0])
def test_int4_linear_on_tiles_holds_the_same_weights(snap):
    torch.manual_seed(3)
    w = snap(torch.randn(40, 96))
    a, b = torch.randn(4, 96) * 0.1, torch.randn(40, 4) * 0.1
    lin = Int4Linear(w, (a, b))
    x = torch.randn(5, 96).bfloat16()
    want = x.double() @ (w.double() + b.double() @ a.double()).T
    on_tiles, not_tiled = lin(x, tiled=True).double(), lin(x).double()
    assert (on_tiles - want).abs().max() < 1e-2 * want.abs().max()
    assert (on_tiles - not_tiled).abs().max() < 1e-2 * want.abs().max()


@pytest.mark.skipif(m is None, reason="no native extension here")
def test_the_native_step_and_python_agree_on_when_tiles_run():
    assert m.TILE_TOKENS == quant.TILE_TOKENS


def test_without_tiles_the_runtime_keeps_lowbit_and_switches_at_four():
    """BLOCKDIFF_TILES=0 (or a CPU without AMX): no tile codes, the bfloat16 copy from 5 tokens,
    and the native step's 8-token forward (lowbit) equals the loop to rounding."""
    code = (
        "import torch; from blockdiff import quant, runtime; from blockdiff.runtime import prepare\n"
        "from tests.test_runtime import on_grid_model\n"
        "from tests.test_native import stack_args\n"
        "assert not quant.tiles() and quant.narrow_rows() == quant.NARROW_ROWS == 4\n"
        "q = prepare(on_grid_model(), 'int4')\n"
        "lin = q.model.layers[0].mlp.gate_up_proj.narrow\n"
        "assert lin.tile_codes.numel() == 0 and q.width_switch.rows == 4\n"
        "q.width_switch.wide = False\n"
        "args = stack_args(q, 8, 6)\n"
        "want, got = runtime.decoder_stack(*args).float(), q.fused_layers.native(*args).float()\n"
        "assert (want - got).abs().max() < 1e-2 * want.abs().max()\n"
    )
    env = {**os.environ, "BLOCKDIFF_TILES": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@needs_tiles
def test_bad_arguments_are_refused():
    _, (codes, scales) = packed(4, 16, 64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        m.tiles_mm(torch.randn(2, 64), codes, scales, 4, 16)
    with pytest.raises(RuntimeError, match="packed weights"):
        m.tiles_mm(torch.randn(2, 96).bfloat16(), codes, scales, 4, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        m.tiles_pack(torch.full((2, 32), 16), torch.ones(2, 1), torch.zeros(2, 1), 4)


@needs_tiles
def test_tiles_from_one_token_keeps_batched_equal_to_alone_and_runs_tiles(tok):
    """`tiles_from(model, 1)` (what a server with batches does): every forward's codes on tiles,
    and a row's tokens still never depend on its batch."""
    q = prepare(on_grid_model(vocab=tok.vocab_size + 1), "int4")
    tiles_from(q, 1)
    assert all(
        k in (quant.LOWBIT4 + quant.TILED, quant.LOWBIT8 + quant.TILED)
        for k in q.fused_layers.narrow_tiled[1]
    )
    prompts = ["To be", "Shall I compare thee to a summer's day?", "O"]
    together = generate(q, tok, prompts, sampler="ar", max_new_tokens=10, stop_at_eos=False)
    for p, t in zip(prompts, together.tokens, strict=True):
        assert generate(q, tok, [p], sampler="ar", max_new_tokens=10, stop_at_eos=False).tokens[0] == t
    x = torch.randn(1, 1, q.config.hidden_size).bfloat16()  # the head: tiles from one row too
    q.width_switch.set(1, 10)
    head = q.lm_head.narrow
    assert torch.equal(q.lm_head(x)[0], head(x[0], tiled=True))


def test_tiles_from_takes_one_or_the_default():
    with pytest.raises(ValueError, match="tiles from 1 or 2"):
        tiles_from(torch.nn.Module(), 3)


@needs_tiles
def test_the_delta_on_tiles_equals_the_loop_to_rounding():
    """8 tokens: codes and low-rank delta on tiles (x A rounded to bfloat16 before B) against the
    Python loop (float32 delta); with the tiles' copy of B zeroed the output moves by ~1x."""
    m = with_delta(on_grid_model(intermediate_size=256), scale=0.2)
    qm = prepare(m, "int4")
    qm.width_switch.wide = False
    args = stack_args(qm, 8, 10)
    want, got = runtime.decoder_stack(*args).float(), qm.fused_layers.native(*args).float()
    assert (want - got).abs().max() < 5e-2 * want.abs().max()
    for layer in qm.model.layers:
        layer.mlp.gate_up_proj.narrow.lr_b_tiles.zero_()
    cut = qm.fused_layers.native(*stack_args(qm, 8, 10)).float()
    assert (want - cut).abs().max() > 3e-1 * want.abs().max()


def test_a_server_with_batches_runs_every_forward_on_tiles(tok):
    """`blockdiff serve --max-batch` > 1 sets `tiles_from(model, 1)`; a server of one row keeps the
    default (where the CPU has no tiles the setting changes nothing)."""
    pytest.importorskip("fastapi")
    from blockdiff.serve.app import Server

    batched, alone = (prepare(on_grid_model(vocab=tok.vocab_size + 1), "int4") for _ in range(2))
    Server(batched, tok, "m", max_batch=8)
    Server(alone, tok, "m", max_batch=1)
    assert batched.width_switch.tile_tokens == 1 and alone.width_switch.tile_tokens == quant.TILE_TOKENS
