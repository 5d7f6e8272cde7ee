"""Microseconds per call of the inference runtime's RMSNorm and RoPE against the formulas they
replace, on one SmolLM2 token (bfloat16, 576 wide; 9 + 3 heads of 64), and their largest
difference: `FastRMSNorm` (a LayerNorm over [x, -x]) vs torch's RMSNorm in float32, RoPE by one
roll vs rotate-half; greedy argmax over SmolLM2's 49152 logits, torch's against numpy's
(`policies.argmax`); the chosen token's probability (`sample`'s confidence) from a float64
softmax against a float64 logsumexp (`policies` `prob` score); RoPE's angles with the frequencies
computed per call against cached.

    python benchmarks/norm_rope.py
"""

from __future__ import annotations

import statistics
import time

import torch

from blockdiff.decoding.policies import PROB, argmax
from blockdiff.model import RMSNorm, apply_rope, rope_cos_sin
from blockdiff.runtime import FastRMSNorm


def us(f, n: int = 3000, repeats: int = 5) -> float:
    for _ in range(200):
        f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


def rotate_half_rope(x, cos, sin):  # the formula `apply_rope` replaces (unsigned sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 576).bfloat16()
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm = norm.bfloat16()
        fast = FastRMSNorm(norm).bfloat16()
        h = torch.randn(1, 12, 1, 64).bfloat16()
        cos, signed = rope_cos_sin(torch.tensor([[37]]), 64, 10000.0, torch.bfloat16)
        sin = torch.cat([-signed[..., :32], signed[..., 32:]], -1)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        print("| op | before (µs) | after (µs) | max difference |\n|---|---|---|---|")
        d = (norm(x).float() - fast(x).float()).abs().max()
        print(f"| RMSNorm | {us(lambda: norm(x)):.1f} | {us(lambda: fast(x)):.1f} | {d:.3g} |")
        d = (rotate_half_rope(h, cos, sin).float() - apply_rope(h, cos, signed).float()).abs().max()
        old, new = us(lambda: rotate_half_rope(h, cos, sin)), us(lambda: apply_rope(h, cos, signed))
        print(f"| RoPE (q and k of one layer) | {old:.1f} | {new:.1f} | {d:.3g} |")
        logits = torch.randn(1, 49152)
        same = torch.equal(logits.argmax(-1), argmax(logits))
        old, new = us(lambda: logits.argmax(-1), n=500), us(lambda: argmax(logits), n=500)
        d = "same index" if same else "DIFFERS"
        print(f"| greedy argmax (49152 logits) | {old:.1f} | {new:.1f} | {d} |")
        tok, wide, gen = argmax(logits), logits.double(), torch.Generator()

        def by_softmax():
            return logits.double().softmax(-1).gather(-1, tok[:, None])[:, 0]

        d = (by_softmax() - PROB(wide, tok, gen)).abs().max()
        old, new = us(by_softmax, n=300), us(lambda: PROB(logits.double(), tok, gen), n=300)
        print(f"| confidence of the chosen token (49152 logits, float64) | {old:.1f} | {new:.1f} | {d:.3g} |")
        pos = torch.tensor([[37]])

        def per_call():
            inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
            freqs = pos.float()[..., None] * inv
            emb = torch.cat([freqs, freqs], -1)[:, None]
            sin = emb.sin()
            sin[..., :32].neg_()
            return emb.cos().bfloat16(), sin.bfloat16()

        d = max(
            (a.float() - b.float()).abs().max()
            for a, b in zip(per_call(), rope_cos_sin(pos, 64, 10000.0, torch.bfloat16), strict=True)
        )
        old, new = us(per_call), us(lambda: rope_cos_sin(pos, 64, 10000.0, torch.bfloat16))
        print(f"| RoPE angles of one token | {old:.1f} | {new:.1f} | {d:.3g} |")


if __name__ == "__main__":
    main()
