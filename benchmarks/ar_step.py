"""Milliseconds per greedy `ar` token on the imported SmolLM2 base (bf16, batch 1), with a
torch-profiler summary: run it under two checkouts to compare runtimes (before/after).

    PYTHONPATH=src python benchmarks/ar_step.py [--tokens 128] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from blockdiff.decoding import generate
from blockdiff.models import load_model

BASE = Path.home() / ".cache" / "blockdiff" / "models" / "smollm2-135m-instruct"
PROMPTS = [
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive me three tips to sleep better.<|im_end|>\n<|im_start|>assistant\n",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    model, tok = load_model(BASE, torch.bfloat16)
    generate(model, tok, PROMPTS[:1], sampler="ar", max_new_tokens=8)
    ms = []
    for _ in range(a.repeats):
        for p in PROMPTS:
            t = time.perf_counter()
            out = generate(model, tok, [p], sampler="ar", max_new_tokens=a.tokens, stop_at_eos=False)
            ms.append((time.perf_counter() - t) * 1e3 / out.rows[0].tokens)
    med = statistics.median(ms)
    print(f"ar bf16: {med:.1f} ms/token (median of {len(ms)}), {1e3 / med:.1f} tok/s")
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
