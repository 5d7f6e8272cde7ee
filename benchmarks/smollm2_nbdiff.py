"""SmolLM2-135M-Instruct against its NBDiff adaptation(s), in one run, on held-out chat prompts.

For each (model, sampler) row: Gen PPL of the answers under the base model (given the chat
prompt), mean unigram entropy, NFEs, tokens/NFE, tokens/s (batch 1, so tokens/s is a latency
figure), and accuracy on the 32 held-out short questions (keyword match). Greedy, except the rows
of a sampler's own defaults.

    python benchmarks/smollm2_nbdiff.py --adapted smollm2-nbdiff [--num-prompts 24] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys

import torch

from blockdiff.data.prompts import chat_prompts
from blockdiff.eval.genppl import evaluate
from blockdiff.eval.questions import accuracy
from blockdiff.hub import load_reference
from blockdiff.models import load_model


def rows_for(adapted: bool) -> list[tuple[str, str, dict]]:
    """(label, sampler, options); options None: the sampler's own defaults, sampling included
    (what `blockdiff generate --sampler NAME` gives), else greedy with these options."""
    if not adapted:
        return [("ar", "ar", {})]
    return [
        ("ar", "ar", {}),
        ("spec k=3 (greedy)", "spec", {"draft_len": 3}),
        ("bd3 B=4, 2 tok/NFE", "bd3", {"block_size": 4, "steps": 2, "order": "confidence"}),
        ("fastdllm B=4 tau=0.9", "fastdllm", {"block_size": 4, "threshold": 0.9}),
        ("dcd B=4 W=4", "dcd", {"block_size": 4, "window": 4}),
        ("bd3, its defaults", "bd3", None),
        ("fastdllm, its defaults", "fastdllm", None),
        ("dcd, its defaults", "dcd", None),
        ("structural, its defaults", "structural", None),
        ("mdlm, its defaults", "mdlm", None),
        ("llada B=64, its defaults otherwise", "llada", {"block_size": 64, "temperature": None}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapted", nargs="+", required=True, help="names, checkpoints or run dirs")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", help="the runtime's precision (auto: what users get)")
    ap.add_argument("--samplers", default="all", help="'all' or comma-separated sampler names")
    a = ap.parse_args()
    dtype = a.dtype
    ref, ref_tok = load_reference(a.base)
    models = [("base", *load_model(a.base, dtype), False)]
    for p in a.adapted:
        models.append((f"adapted {p}", *load_model(p, dtype), True))
    tok = models[0][2]
    prompts = [tok.chat(q) for q in chat_prompts("heldout")[: a.num_prompts]]
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"{len(prompts)} held-out chat prompts, {a.max_new_tokens} new tokens at most, batch 1, "
        f"{a.dtype} weights; Gen PPL under {a.base}; accuracy on 32 held-out short questions\n"
    )
    print("| model | sampler | Gen PPL | entropy | NFEs | tokens/NFE | tokens/s | QA accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, tk, adapted in models:
        for label, sampler, kw in rows_for(adapted):
            if a.samplers != "all" and sampler not in a.samplers.split(","):
                continue
            kw = {} if kw is None else {"temperature": 0.0, **kw}
            kw = {k: v for k, v in kw.items() if v is not None}
            r = evaluate(model, tk, ref, ref_tok, prompts, sampler, a.max_new_tokens, batch_size=1, **kw)
            qa = accuracy(model, tk, sampler, batch_size=8, **kw)
            print(
                f"| {name} | {label} | {r.gen_ppl:.2f} | {r.entropy:.2f} | {r.nfe:.1f} | "
                f"{r.tokens_per_nfe:.2f} | {r.tokens_per_second:.1f} | {qa.accuracy:.2%} |",
                flush=True,
            )


if __name__ == "__main__":
    with torch.no_grad():
        main()
