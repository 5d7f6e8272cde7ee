"""The compiled 4-/8-bit kernel (csrc/lowbit.cpp): products equal the float64 product of the very
weights it was given (offset + step * code, per group of 32) for every tail shape of K, in
float32 and bfloat16; a row's numbers never depend on the rows beside it; bad arguments are
refused; the portable build (no AVX-512) computes the same."""

import os
import subprocess
import sys

import pytest
import torch

from blockdiff import native
from blockdiff.quant import LOWBIT4, LOWBIT8, Int4Linear
from tests.test_runtime import q4_1, q8_0


def packed(bits: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16 if bits == 4 else 255, (n, k), generator=g)
    step = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3
    offset = torch.randn(n, k // 32, generator=g) * 0.01
    w = offset.repeat_interleave(32, 1) + step.repeat_interleave(32, 1) * codes.double()
    return w, native.module().lowbit_pack(codes, step, offset, bits)


def check_products(m) -> None:
    for bits in (4, 8):
        for k in (32, 64, 96, 128, 160, 576):  # K % 128: 32, 64, 96, 0 (padded to 64: zeros)
            w, (codes, steps, offsets) = packed(bits, 40, k)  # 40 rows: blocks of 4 and the rest
            for rows in (1, 3, 5, 9):
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(rows, k).to(dtype)
                    y = m.lowbit_mm(x, codes, steps, offsets, bits, k)
                    want = x.double() @ w.T
                    err = ((y.double() - want).abs().max() / want.abs().max()).item()
                    assert y.dtype == dtype and y.shape == (rows, 40)
                    assert err < (1e-5 if dtype == torch.float32 else 8e-3), (bits, k, rows, dtype, err)
                    for r in (0, rows - 1):  # alone as in the batch, bit for bit
                        assert torch.equal(m.lowbit_mm(x[r : r + 1], codes, steps, offsets, bits, k)[0], y[r])


def test_products_equal_the_weights_product_and_rows_are_batch_independent():
    check_products(native.module())


@pytest.mark.parametrize("snap,kind", [(q4_1, LOWBIT4), (q8_0, LOWBIT8)])
def test_int4_linear_holds_the_kernels_layout_where_it_is_built(snap, kind):
    """The same weights torch's kernel would hold (step and offset in bfloat16), with a delta."""
    torch.manual_seed(3)
    w = snap(torch.randn(40, 96))
    a, b = torch.randn(4, 96) * 0.1, torch.randn(40, 4) * 0.1
    lin = Int4Linear(w, (a, b))
    assert lin.kind == kind
    x = torch.randn(3, 96)
    want = x @ (w + b @ a).T
    for dtype in (torch.float32, torch.bfloat16):
        got = lin(x.to(dtype)).float()
        assert (got - want).abs().max() < 1e-2 * want.abs().max()


def test_bad_arguments_are_refused():
    m = native.module()
    _, (codes, steps, offsets) = packed(4, 8, 64)
    with pytest.raises(RuntimeError, match="x \\[M, 64\\]"):
        m.lowbit_mm(torch.randn(2, 32), codes, steps, offsets, 4, 64)
    with pytest.raises(RuntimeError, match="packed weights"):
        m.lowbit_mm(torch.randn(2, 64), codes[:, :-1].contiguous(), steps, offsets, 4, 64)
    with pytest.raises(RuntimeError, match="4 or 8 bits"):
        m.lowbit_mm(torch.randn(2, 64), codes, steps, offsets, 5, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        m.lowbit_pack(torch.full((2, 32), 16), torch.ones(2, 1), torch.zeros(2, 1), 4)


def test_the_portable_kernels_compute_the_same(tmp_path):
    """Built without AVX-512 (as on a CPU that has none), in a process of its own (an extension
    module loads once per process): the same products to rounding."""
    if "avx512f" not in native._cpu():
        pytest.skip("this CPU builds the portable kernels already (tested above)")
    env = {**os.environ, "BLOCKDIFF_CACHE": str(tmp_path), "BLOCKDIFF_NATIVE_FLAGS": "-mno-avx512f"}
    code = (
        "from blockdiff import native; from tests.test_lowbit import check_products; "
        f"m = native.module(); assert {str(tmp_path)!r} in m.__file__; check_products(m)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
