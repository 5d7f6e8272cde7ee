"""Greedy `spec` (draft length chosen by itself) against `ar` on the same runtime, one held-out
chat prompt alone and a batch: tokens/s of each, alternated, and the median ms of each kind of forward.

    python benchmarks/spec_batch.py [--model smollm2-nbdiff] [--dtype auto] [--batch 2]
        [--max-new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from blockdiff.data.prompts import chat_prompts
from blockdiff.decoding import generate
from blockdiff.model import BlockDiffLM
from blockdiff.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-nbdiff")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64, dest="n")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    model, tok = load_model(a.model, a.dtype)
    prompts = [tok.chat(q) for q in chat_prompts("heldout")[: a.batch]]
    forwards: dict = collections.defaultdict(list)
    inner = BlockDiffLM.forward

    def timed(self, ids, *args, **kw):  # ms of each forward, by sampler and fed width
        t = time.perf_counter()
        out = inner(self, ids, *args, **kw)
        forwards[(timed.sampler, len(ids), ids.shape[1])].append((time.perf_counter() - t) * 1e3)
        return out

    BlockDiffLM.forward = timed
    for s in ("ar", "spec"):
        timed.sampler = s
        generate(model, tok, prompts, sampler=s, max_new_tokens=8)  # warm-up
    forwards.clear()
    rates: dict = collections.defaultdict(list)
    for _ in range(a.repeats):
        for s in ("ar", "spec"):
            for batch in (prompts[:1], prompts):
                timed.sampler = s
                t = time.perf_counter()
                out = generate(model, tok, batch, sampler=s, max_new_tokens=a.n, stop_at_eos=False)
                rates[(s, len(batch))].append(sum(r.tokens for r in out.rows) / (time.perf_counter() - t))
    print(f"{a.model} ({model.precision}), {a.n} new tokens, {a.repeats} repeats\n")
    print("| sampler | rows | tokens/s (median) | vs ar |\n|---|---|---|---|")
    for (s, b), v in sorted(rates.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ratio = statistics.median(v) / statistics.median(rates[("ar", b)])
        print(f"| {s} | {b} | {statistics.median(v):.1f} | {ratio:.2f}x |")
    print("\n| sampler | rows x fed tokens | forwards | ms (median) |\n|---|---|---|---|")
    for (s, b, q), v in sorted(forwards.items()):
        print(f"| {s} | {b} x {q} | {len(v)} | {statistics.median(v):.2f} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
