"""Accepted drafts per position for `spec` (fixed draft length, greedy), per model, on held-out
chat prompts: how often draft i is accepted once drafts 1..i-1 were, and tokens per forward.

    python benchmarks/spec_acceptance.py --models smollm2-nbdiff runs/spec-drafter [--prompts 16]
        [--max-new-tokens 64] [--draft-len 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from blockdiff.data.prompts import chat_prompts
from blockdiff.decoding import generate, speculative
from blockdiff.models import load_model


def counted(model, tok, prompts: list[str], n: int, k: int) -> tuple[list[int], list[int], int, int]:
    """(accepted, tried) per draft position, tokens and forwards, one prompt at a time."""
    seen: dict[str, list[int]] = {}
    orig = speculative.SpecStep._choose

    def spy(self, first):  # the step's counters, read after every forward
        seen["hits"], seen["tried"] = list(self.hits), list(self.tried)
        return orig(self, first)

    speculative.SpecStep._choose = spy
    hits, tried, toks, nfe = [0] * k, [0] * k, 0, 0
    try:
        for p in prompts:
            out = generate(model, tok, [tok.chat(p)], sampler="spec", max_new_tokens=n, draft_len=k)
            hits = [a + b for a, b in zip(hits, seen["hits"], strict=True)]
            tried = [a + b for a, b in zip(tried, seen["tried"], strict=True)]
            toks, nfe = toks + out.rows[0].tokens, nfe + out.rows[0].nfe
    finally:
        speculative.SpecStep._choose = orig
    return hits, tried, toks, nfe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-nbdiff"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-len", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--split", default="heldout", help="chat prompts: heldout, or train (for a prior)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    prompts = chat_prompts(a.split)[: a.prompts]
    k = a.draft_len
    print(f"torch {torch.__version__}; {len(prompts)} {a.split} chat prompts, {a.max_new_tokens} new tokens, "
          f"greedy spec k={k}, --dtype {a.dtype}\n")  # fmt: skip
    head = " | ".join(f"draft {i + 1} accepted" for i in range(k))
    print(f"| model | {head} | tokens/forward | seconds |")
    print("|---|" + "---|" * (k + 2))
    for name in a.models:
        model, tok = load_model(name, a.dtype)
        t = time.perf_counter()
        hits, tried, toks, nfe = counted(model, tok, prompts, a.max_new_tokens, k)
        cells = " | ".join(f"{h}/{n} = {h / max(n, 1):.2f}" for h, n in zip(hits, tried, strict=True))
        print(f"| {name} | {cells} | {toks / max(nfe, 1):.2f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
