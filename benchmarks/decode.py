"""Decoding speed of every sampler and cache mode on one model, as ratios measured in one run.

Every configuration decodes the same prompts to the same length (EOS does not stop rows, so the
work is equal); configurations are interleaved round-robin over repeats and the median wall
time is kept, because the machine is shared and noisy.

    python benchmarks/decode.py [--model PATH] [--max-new-tokens 128] [--repeats 3] [--only dcd global]

`--only TEXT` re-measures the rows whose label contains TEXT (with the two rows the ratios are
taken to, measured in the same run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from blockdiff.decoding import generate
from blockdiff.model import BlockDiffLM
from blockdiff.models import bundled_path, load_model

PROMPTS = ["ROMEO.\nBut soft, what light", "KING.\nWhat news", "HAMLET.\nTo be, or not to be"]


def configs(n: int) -> list[tuple[str, str, dict]]:
    """(label, sampler, kwargs). B=16 is the equal block size for the llada comparison."""
    return [
        ("ar, exact KV cache", "ar", dict(cache="exact")),
        ("ar, no cache", "ar", dict(cache="none")),
        ("llada B=16, 1 tok/step, no cache", "llada", dict(block_size=16, steps=n)),
        ("llada B=16, 2 tok/step, no cache", "llada", dict(block_size=16, steps=n // 2)),
        ("mdlm, 2 tok/step, no cache", "mdlm", dict(steps=n // 2, temperature=0.0)),
        ("fastdllm B=16 tau=0.9, no cache", "fastdllm", dict(block_size=16, cache="none")),
        ("fastdllm B=16 tau=0.9, prefix cache", "fastdllm", dict(block_size=16, cache="prefix")),
        ("fastdllm B=16 tau=0.9, dual cache", "fastdllm", dict(block_size=16, cache="dual")),
        ("bd3 B=16, 2 tok/step, no cache", "bd3", dict(block_size=16, steps=8, cache="none")),
        ("bd3 B=16, 2 tok/step, exact cache", "bd3", dict(block_size=16, steps=8, cache="exact")),
        ("bd3 B=4, 2 tok/step, exact cache", "bd3", dict(block_size=4, steps=2, cache="exact")),
        ("bd3 B=16 tau=0.9, exact cache", "bd3", dict(block_size=16, threshold=0.9, cache="exact")),
        ("dcd block-causal B=16 W=8, no cache", "dcd", dict(block_size=16, cache="none")),
        ("dcd block-causal B=16 W=8, exact cache", "dcd", dict(block_size=16, cache="exact")),
        ("dcd global W=16, prefix cache", "dcd", dict()),
        ("structural bd3 B=4 + global 25%", "structural", dict(block_size=4, steps=2)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    ap.add_argument("--quality", type=int, default=0, help="also Gen PPL under SmolLM2 with N samples each")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--only", default=None, help="rows whose label contains this (plus the ratio rows)")
    a = ap.parse_args()
    model, tok = load_model(a.model or bundled_path("shakespeare-5m"), a.dtype)
    prompts = (PROMPTS * a.batch)[: a.batch]
    cfgs = configs(a.max_new_tokens)
    if a.only:
        refs = ("ar, exact KV cache", "llada B=16, 2 tok/step, no cache")
        cfgs = [c for c in cfgs if a.only in c[0] or c[0] in refs]
    times: dict[str, list[float]] = {c[0]: [] for c in cfgs}
    stats: dict[str, dict] = {}
    generate(model, tok, prompts, sampler="bd3", max_new_tokens=16)  # warm-up
    for _ in range(a.repeats):
        for label, sampler, kw in cfgs:
            t = time.perf_counter()
            out = generate(
                model,
                tok,
                prompts,
                sampler=sampler,
                max_new_tokens=a.max_new_tokens,
                stop_at_eos=False,
                seed=0,
                **{"temperature": 0.0, **kw},  # greedy everywhere: equal work per step
            )
            times[label].append(time.perf_counter() - t)
            stats[label] = dict(
                nfe=sum(r.nfe for r in out.rows) / len(out.rows), tokens=sum(r.tokens for r in out.rows)
            )
    wall = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: stats[k]["tokens"] / wall[k] for k in wall}
    ar, llada = tps["ar, exact KV cache"], tps["llada B=16, 2 tok/step, no cache"]
    with torch.device("meta"):  # a prepared model holds some weights as buffers: count the modules'
        params = BlockDiffLM(model.config).num_parameters()
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"model: {a.model or 'bundled demo'}, {params / 1e6:.2f}M params, {a.dtype} weights, "
        f"batch {a.batch}, {a.max_new_tokens} new tokens, greedy, median of {a.repeats}, torch threads "
        f"{torch.get_num_threads()}\n"
    )
    print("| sampler | NFEs | tokens/NFE | wall s | tokens/s | × ar (KV cache) | × llada B=16 no cache |")
    print("|---|---|---|---|---|---|---|")
    for label, _, _ in cfgs:
        s = stats[label]
        tpn = s["tokens"] / len(prompts) / s["nfe"]
        print(
            f"| {label} | {s['nfe']:.0f} | {tpn:.2f} | {wall[label]:.3f} | {tps[label]:.1f} | "
            f"{tps[label] / ar:.2f} | {tps[label] / llada:.2f} |"
        )
    if a.quality:
        quality(model, tok, [c for c in cfgs if not a.only or a.only in c[0]], a.quality, a.max_new_tokens)


def quality(model, tok, cfgs, n: int, new_tokens: int) -> None:
    """Gen PPL (SmolLM2-135M-Instruct as evaluator), entropy and NFEs on the same prompts: the
    first 16 tokens of n evenly spaced validation passages; each sampler with its own defaults
    (bd3/mdlm sample at temperature 1 with nucleus 0.9, the others are greedy)."""
    from blockdiff.eval.genppl import corpus_prompts, evaluate, reference_row
    from blockdiff.hub import load_reference

    ref, ref_tok = load_reference("smollm2-135m-instruct")
    prompts, real = corpus_prompts(tok, "shakespeare", n, 16, new_tokens)
    real_ppl = reference_row(ref, ref_tok, prompts, real)
    print(
        f"\nGen PPL under SmolLM2-135M-Instruct, {n} samples of up to {new_tokens} tokens after 16-token "
        f"validation prompts (stop at EOS); the real continuations score {real_ppl:.1f}\n"
    )
    print("| sampler | Gen PPL | entropy (nats) | degenerate | NFEs | tokens/NFE |")
    print("|---|---|---|---|---|---|")
    for label, sampler, kw in cfgs:
        r = evaluate(model, tok, ref, ref_tok, prompts, sampler, new_tokens, **kw)
        print(
            f"| {label} | {r.gen_ppl:.1f} | {r.entropy:.2f} | {r.degenerate}/{r.samples} | {r.nfe:.0f} | "
            f"{r.tokens_per_nfe:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    with torch.no_grad():
        main()
