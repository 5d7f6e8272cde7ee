"""Milliseconds per greedy `ar` token and per one-token forward over a cache (batch 1), with an
optional torch-profiler summary: run it under two checkouts, alternated, to compare runtimes.

    PYTHONPATH=src python benchmarks/ar_step.py [--model smollm2-nbdiff] [--precision int4]
        [--tokens 64] [--repeats 3] [--profile]

The forward is timed in short segments (8 forwards each) and reported as the lower quartile and
the median over segments: the machines are shared, and a slow neighbour inflates whole segments.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from blockdiff.decoding import generate
from blockdiff.model import KVCache
from blockdiff.models import load_model

PROMPTS = [
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive me three tips to sleep better.<|im_end|>\n<|im_start|>assistant\n",
]


def forward_ms(model, prompt_ids: torch.Tensor, segments: int, per: int = 8) -> list[float]:
    """ms per one-token forward over the prompt's cache, one number per segment of `per`."""
    out = []
    x = prompt_ids[:, -1:]
    for _ in range(segments):
        cache = KVCache(len(model.model.layers))
        model(prompt_ids, cache=cache, write_cache=True, logits_slice=slice(-1, None))
        model(x, cache=cache, write_cache=True, logits_slice=slice(-1, None))
        t = time.perf_counter()
        for _ in range(per):
            model(x, cache=cache, write_cache=True, logits_slice=slice(-1, None))
        out.append((time.perf_counter() - t) * 1e3 / per)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--segments", type=int, default=24)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    model, tok = load_model(a.model, a.precision)
    generate(model, tok, PROMPTS[:1], sampler="ar", max_new_tokens=8)
    ms = []
    for _ in range(a.repeats):
        for p in PROMPTS:
            t = time.perf_counter()
            out = generate(model, tok, [p], sampler="ar", max_new_tokens=a.tokens, stop_at_eos=False)
            ms.append((time.perf_counter() - t) * 1e3 / out.rows[0].tokens)
    fw = sorted(forward_ms(model, torch.tensor([tok.encode(PROMPTS[0])]), a.segments))
    print(
        f"{a.model} {a.precision}: ar {statistics.median(ms):.1f} ms/token (median of {len(ms)}); "
        f"forward {fw[len(fw) // 4]:.2f} ms (lower quartile), {statistics.median(fw):.2f} ms (median)"
    )
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, tok, PROMPTS[:1], sampler="ar", max_new_tokens=32, stop_at_eos=False)
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=36)
        )


if __name__ == "__main__":
    with torch.no_grad():
        main()
