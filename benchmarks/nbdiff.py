"""The original AR model against its NBDiff adaptation, in one run: Gen PPL under the original
model, entropy, NFEs, tokens per NFE and tokens/s for each sampler, on the same prompts.

    python benchmarks/nbdiff.py --adapted runs/nbdiff-smollm2 [--num-samples 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys

import torch

from blockdiff.checkpoint import load_model
from blockdiff.eval.genppl import corpus_prompts, evaluate, reference_row
from blockdiff.hub import import_causal_lm, load_reference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapted", required=True, help="adapted checkpoint or run dir")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    a = ap.parse_args()
    base, tok, _ = import_causal_lm(a.base)
    adapted, atok = load_model(a.adapted)
    ref, ref_tok = load_reference(a.base)
    prompts, real = corpus_prompts(tok, "shakespeare", a.num_samples, a.prompt_tokens, a.max_new_tokens)
    t = a.temperature
    rows = [
        ("original AR", "ar, KV cache", base, tok, "ar", {}),
        ("adapted", "ar, KV cache", adapted, atok, "ar", {}),
        (
            "adapted",
            f"bd3 B={a.block_size}, 2 tok/step",
            adapted,
            atok,
            "bd3",
            dict(block_size=a.block_size, steps=a.block_size // 2, order="confidence"),
        ),
        (
            "adapted",
            f"fastdllm B={a.block_size} tau=0.9",
            adapted,
            atok,
            "fastdllm",
            dict(block_size=a.block_size),
        ),
        (
            "adapted",
            f"dcd B=16 W={a.block_size}",
            adapted,
            atok,
            "dcd",
            dict(block_size=16, window=a.block_size),
        ),
    ]
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"{a.num_samples} Shakespeare validation prompts of {a.prompt_tokens} tokens, {a.max_new_tokens} new "
        f"tokens, temperature {t}, evaluator {a.base}; real continuations score "
        f"{reference_row(ref, ref_tok, prompts, real):.2f}\n"
    )
    print("| model | sampler | Gen PPL | entropy | NFEs | tokens/NFE | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name, label, m, tk, sampler, kw in rows:
        temp = {"temperature": t}
        r = evaluate(m, tk, ref, ref_tok, prompts, sampler, a.max_new_tokens, batch_size=1, **temp, **kw)
        print(
            f"| {name} | {label} | {r.gen_ppl:.2f} | {r.entropy:.2f} | {r.nfe:.1f} | "
            f"{r.tokens_per_nfe:.2f} | {r.tokens_per_second:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    with torch.no_grad():
        main()
