"""Accepted drafts per position for `spec` (fixed draft length and width, greedy), per model, on
held-out chat prompts: how often draft i is accepted once drafts 1..i-1 were, how often the first
token was the drafter's 1st..w-th choice for its column (what a token tree of width w can accept
there), and tokens per forward.

    python benchmarks/spec_acceptance.py --models smollm2-nbdiff runs/spec-drafter [--prompts 16]
        [--max-new-tokens 64] [--draft-len 3] [--draft-width 1 2 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from blockdiff.data.prompts import chat_prompts
from blockdiff.decoding import generate, speculative
from blockdiff.models import load_model


def counted(model, tok, prompts: list[str], n: int, k: int, w: int):
    """(accepted, tried) per draft position, first tokens by the drafter's rank (of `seen`),
    tokens and forwards, one prompt at a time."""
    got: dict[str, list[int]] = {}
    orig = speculative.SpecStep._choose

    def spy(self, first):  # the step's counters, read after every forward
        got["hits"], got["tried"], got["ranks"] = list(self.hits), list(self.tried), list(self.ranks)
        got["seen"] = [self.seen]
        return orig(self, first)

    speculative.SpecStep._choose = spy
    hits, tried, ranks, seen, toks, nfe = [0] * k, [0] * k, [0] * w, 0, 0, 0
    try:
        for p in prompts:
            out = generate(
                model, tok, [tok.chat(p)], sampler="spec", max_new_tokens=n, draft_len=k, draft_width=w
            )
            hits = [a + b for a, b in zip(hits, got["hits"], strict=True)]
            tried = [a + b for a, b in zip(tried, got["tried"], strict=True)]
            ranks = [a + b for a, b in zip(ranks, got["ranks"], strict=True)]
            seen, toks, nfe = seen + got["seen"][0], toks + out.rows[0].tokens, nfe + out.rows[0].nfe
    finally:
        speculative.SpecStep._choose = orig
    return hits, tried, ranks, seen, toks, nfe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-nbdiff"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-len", type=int, default=3)
    ap.add_argument("--draft-width", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--split", default="heldout", help="chat prompts: heldout, or train (for a prior)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    prompts = chat_prompts(a.split)[: a.prompts]
    k = a.draft_len
    print(f"torch {torch.__version__}; {len(prompts)} {a.split} chat prompts, {a.max_new_tokens} new tokens, "
          f"greedy spec k={k}, --dtype {a.dtype}\n")  # fmt: skip
    W = max(a.draft_width)
    head = " | ".join(f"draft {i + 1} accepted" for i in range(k))
    ranks = " | ".join(f"first token in top {r + 1}" for r in range(W))
    print(f"| model | width | {head} | {ranks} | tokens/forward | seconds |")
    print("|---|---|" + "---|" * (k + W + 2))
    for name in a.models:
        model, tok = load_model(name, a.dtype)
        for w in a.draft_width:
            t = time.perf_counter()
            hits, tried, rk, seen, toks, nfe = counted(model, tok, prompts, a.max_new_tokens, k, w)
            cells = " | ".join(f"{h}/{n} = {h / max(n, 1):.2f}" for h, n in zip(hits, tried, strict=True))
            tops = [f"{sum(rk[: r + 1]) / max(seen, 1):.2f}" if r < w else "-" for r in range(W)]
            print(f"| {name} | {w} | {cells} | {' | '.join(tops)} | {toks / max(nfe, 1):.2f} "
                  f"| {time.perf_counter() - t:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
