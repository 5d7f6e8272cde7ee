"""The Monte-Carlo ELBO that `blockdiff eval lm-eval` scores a diffusion model with, against the
exact ELBO (every masking pattern enumerated) and an exact log-likelihood (the left-to-right one:
log p(x_i | context, x_<i, the rest masked), the probability that decoding one token at a time,
left to right, writes the continuation), on a two-choice task: a line of the bundled model's
validation text, its true 4-token continuation against the same tokens shuffled.

    python benchmarks/elbo_gap.py [--model shakespeare-5m] [--n 40]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from blockdiff.data.corpus import load_corpus  # noqa: E402
from blockdiff.eval.harness import BlockdiffLM  # noqa: E402


def left_to_right(lm: BlockdiffLM, ctx: list[int], cont: list[int]) -> float:
    """Exact log p of the continuation decoded left to right (one forward per token, batched)."""
    m = len(cont)
    later = torch.arange(m)[None, :] >= torch.arange(m)[:, None]  # row i hides tokens i..m-1
    return float(lm._masked_logp(ctx, cont, later).diagonal().sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shakespeare-5m")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=4)
    args = ap.parse_args()
    lm = BlockdiffLM(pretrained=args.model, batch_size=64)
    text = "\n".join(load_corpus("shakespeare").val)
    rng = random.Random(0)
    items = []
    while len(items) < args.n:
        ids = lm.tok.encode(text[(at := rng.randrange(len(text) - 400)) : at + 400])[:40]
        ctx, cont = ids[: -args.tokens], ids[-args.tokens :]
        wrong = cont[:]
        rng.shuffle(wrong)
        if wrong != cont:
            items.append((ctx, cont, wrong))
    exact = [(lm.exact_elbo(c, t), lm.exact_elbo(c, w)) for c, t, w in items]
    print(f"model {args.model}, {args.n} two-choice items, {args.tokens}-token continuations\n")
    print("| ELBO | samples | mean abs error vs exact (nats) | accuracy (true > shuffled) |")
    print("|---|---|---|---|")
    acc = statistics.fmean(a > b for a, b in exact)
    print(f"| exact (2^{args.tokens} - 1 patterns) | - | 0 | {acc:.3f} |")
    for n in (16, 64, 256):
        mc = [(lm.elbo(c, t, n), lm.elbo(c, w, n)) for c, t, w in items]
        err = statistics.fmean(abs(m[0] - e[0]) for m, e in zip(mc, exact, strict=True))
        print(f"| Monte-Carlo | {n} | {err:.4f} | {statistics.fmean(a > b for a, b in mc):.3f} |", flush=True)
    l2r = [(left_to_right(lm, c, t), left_to_right(lm, c, w)) for c, t, w in items]
    gap = [lr[0] - e[0] for lr, e in zip(l2r, exact, strict=True)]
    print("\n| log-likelihood of the true continuation | mean (nats) | accuracy (true > shuffled) |")
    print("|---|---|---|")
    print(f"| exact ELBO | {statistics.fmean(e[0] for e in exact):.3f} | {acc:.3f} |")
    print(f"| exact left-to-right log-likelihood | {statistics.fmean(x[0] for x in l2r):.3f} | "
          f"{statistics.fmean(a > b for a, b in l2r):.3f} |")  # fmt: skip
    print(f"\nleft-to-right minus ELBO: mean {statistics.fmean(gap):.3f} nats, "
          f"min {min(gap):.3f}, max {max(gap):.3f} (per item)")  # fmt: skip


if __name__ == "__main__":
    main()
