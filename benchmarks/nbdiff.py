"""The original AR model against its NBDiff adaptation, in one run: Gen PPL under the original
model, entropy, NFEs, tokens per NFE and tokens/s for each sampler, on the same prompts.

    python benchmarks/nbdiff.py --adapted runs/nbdiff-smollm2 [--num-samples 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys

import torch

from blockdiff.eval.genppl import corpus_prompts, evaluate, reference_row
from blockdiff.hub import import_causal_lm, load_reference
from blockdiff.models import load_model


def sampler_rows(block_size: int) -> list[tuple[str, str, dict]]:
    """(label, sampler, kwargs) for each adapted model."""
    B = block_size
    return [
        ("ar, KV cache", "ar", {}),
        (f"bd3 B={B}, 2 tok/step", "bd3", dict(block_size=B, steps=B // 2, order="confidence")),
        (f"fastdllm B={B} tau=0.9", "fastdllm", dict(block_size=B)),
        (f"dcd B=16 W={B}", "dcd", dict(block_size=16, window=B)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapted", required=True, nargs="+", help="adapted checkpoints or run dirs")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--samplers", default="all", help="'all' or comma-separated sampler names")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    base, tok, _ = import_causal_lm(a.base)
    base = base.to(a.device)
    ref, ref_tok = load_reference(a.base)
    ref = ref.to(a.device)
    prompts, real = corpus_prompts(tok, "shakespeare", a.num_samples, a.prompt_tokens, a.max_new_tokens)
    t = a.temperature
    chosen = sampler_rows(a.block_size)
    if a.samplers != "all":
        chosen = [r for r in chosen if r[1] in a.samplers.split(",")]
    rows = [("original AR", "ar, KV cache", base, tok, "ar", {})]
    for path in a.adapted:
        adapted, atok = load_model(path, device=a.device)
        name = "adapted" if len(a.adapted) == 1 else f"adapted {path}"
        rows += [(name, label, adapted, atok, sampler, kw) for label, sampler, kw in chosen]
    print(f"command: python {' '.join(sys.argv)}  (device: {a.device})")
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
