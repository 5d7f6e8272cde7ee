"""The 4-/8-bit products of a forward, torch's int4 kernel against blockdiff's two
(`csrc/lowbit.cpp`; `csrc/tiles.cpp` on AMX), on SmolLM2-135M's own shapes and random codes, in
one process, interleaved.

Per product (x [rows, K] in bfloat16 times W^T, W [N, K] as codes per group of 32): torch's
`_weight_int4pack_mm_for_cpu` (one 4-bit plane; the Q8_0 head needs two), blockdiff's `lowbit_mm`
(one call, 4 or 8 bits) and `tiles_mm` (where the CPU has AMX). Also the error of each against the
float64 product of the same weights.

    PYTHONPATH=src python benchmarks/lowbit.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from blockdiff import native

SHAPES = {  # SmolLM2-135M: (K, N, bits) per product of a layer, and the tied Q8_0 head
    "q|k|v": (576, 960, 4),
    "o": (576, 576, 4),
    "gate|up": (576, 3072, 4),
    "down": (1536, 576, 4),
    "head (Q8_0)": (576, 49152, 8),
}


def timed(f, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls


def products(m, k: int, n: int, bits: int):
    """(float64 weights, torch's product, blockdiff's product) for random codes of the shape."""
    codes = torch.randint(0, 2**bits - (bits == 8), (n, k))
    step = (torch.rand(n, k // 32) * 0.01 + 1e-3).bfloat16().float()
    offset = (torch.randn(n, k // 32) * 0.01).bfloat16().float()
    w = offset.repeat_interleave(32, 1).double() + step.repeat_interleave(32, 1).double() * codes
    planes = [(codes, step, offset)]
    if bits == 8:  # two 4-bit planes, code = 16 h + l
        planes = [(codes // 16, 16 * step, offset), (codes % 16, step, 0 * step)]
    packed = [  # torch computes (q - 8) * s + z
        (
            torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
            torch.stack([s.t(), (z + 8 * s).t()], -1).bfloat16().contiguous(),
        )
        for q, s, z in planes
    ]
    ours = m.lowbit_pack(codes, step, offset, bits)
    tiled = m.tiles_pack(codes, step, offset, bits) if m.tiles_usable() else None

    def by_torch(x):
        ys = [torch._weight_int4pack_mm_for_cpu(x, q, 32, sz) for q, sz in packed]
        return ys[0] if len(ys) == 1 else ys[0] + ys[1]

    def by_blockdiff(x):
        return m.lowbit_mm(x, *ours, bits, k)

    def on_tiles(x):
        return m.tiles_mm(x, *tiled, bits, n)

    return w, by_torch, by_blockdiff, on_tiles if tiled else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    m = native.module()
    if m is None:
        sys.exit("the native extension is unavailable here")
    torch.manual_seed(0)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    cols = "torch int4 µs | lowbit µs | tiles µs | lowbit vs torch | tiles vs lowbit"
    print(f"| product (K → N) | rows | {cols} | rel. error torch / lowbit / tiles |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (k, n, bits) in SHAPES.items():
        w, *kernels = products(m, k, n, bits)
        kernels = [f for f in kernels if f is not None]
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, k).bfloat16()
            calls = max(3, int(2e-2 / max(timed(lambda: kernels[1](x), 3), 1e-6)))  # noqa: B023
            times = [[] for _ in kernels]
            for _ in range(a.repeats):  # interleaved: the machine is shared
                for f, t in zip(kernels, times, strict=True):
                    t.append(timed(lambda: f(x), calls))  # noqa: B023
            want = x.double() @ w.T
            err = [((f(x).double() - want).abs().max() / want.abs().max()).item() for f in kernels]
            us = [statistics.median(t) * 1e6 for t in times] + [float("nan")] * (3 - len(kernels))
            cells = [f"{name} ({k} → {n})", rows, *(f"{u:.1f}" for u in us)]
            cells += [f"{us[0] / us[1]:.2f}×", f"{us[1] / us[2]:.2f}×" if len(kernels) == 3 else "–"]
            print("| " + " | ".join(map(str, cells)) + " | " + " / ".join(f"{e:.1e}" for e in err) + " |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
