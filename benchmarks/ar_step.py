"""Milliseconds per greedy `ar` token and per one-token forward over a cache (batch 1), for the
native C++ step and the TorchScript loop in the same process, alternated (the machines are
shared: a ratio within one run is the number to read), with an optional torch-profiler summary.

    PYTHONPATH=src python benchmarks/ar_step.py [--model smollm2-nbdiff] [--precision int4]
        [--tokens 64] [--repeats 3] [--profile]

The forward is timed in short segments (8 forwards each) and reported as the lower quartile and
the median over segments: a slow neighbour inflates whole segments.
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


def teacher_forced(model, ref, ids: torch.Tensor, n0: int) -> tuple[float, float]:
    """(mean KL from float32 `ref` to `model`, argmax agreement) over the answer `ids[n0:]`, the
    model fed as in decoding: the prompt causally, then one token at a time over the cache."""
    L = ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
    want = ref(ids, mask=causal).float()[0, n0 - 1 : -1].log_softmax(-1)
    cache = KVCache(len(model.model.layers))
    outs = [model(ids[:, :n0], mask=causal[..., :n0, :n0], cache=cache, write_cache=True)[:, -1:]]
    outs += [model(ids[:, t : t + 1], cache=cache, write_cache=True) for t in range(n0, L - 1)]
    got = torch.cat(outs, 1).float()[0, :, : want.shape[-1]].log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1).mean().item()
    return kl, (got.argmax(-1) == want.argmax(-1)).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--segments", type=int, default=12)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    model, tok = load_model(a.model, a.precision)
    fused = model.fused_layers
    native = fused.native
    paths = {"native C++": native, "TorchScript": None} if native is not None else {"TorchScript": None}
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    ms = {p: [] for p in paths}
    fw = {p: [] for p in paths}
    texts = {}
    for step in paths.values():  # warm both
        fused.native = step
        generate(model, tok, PROMPTS[:1], sampler="ar", max_new_tokens=8)
    for _ in range(a.repeats):
        for p, step in paths.items():
            fused.native = step
            for prompt in PROMPTS:
                t = time.perf_counter()
                out = generate(model, tok, [prompt], sampler="ar", max_new_tokens=a.tokens, stop_at_eos=False)
                ms[p].append((time.perf_counter() - t) * 1e3 / out.rows[0].tokens)
                texts.setdefault(p, []).append(out.tokens[0])
            fw[p] += forward_ms(model, ids, a.segments // a.repeats or 1)
    print(f"{a.model} {a.precision}, {a.tokens} tokens, batch 1:")
    base = statistics.median(ms["TorchScript"])
    for p in paths:
        f = sorted(fw[p])
        print(
            f"  {p:12s} ar {statistics.median(ms[p]):5.2f} ms/token (median of {len(ms[p])}; "
            f"{base / statistics.median(ms[p]):.2f}x TorchScript's speed); forward {f[len(f) // 4]:.2f} ms "
            f"(lower quartile), {statistics.median(f):.2f} ms (median)"
        )
    if len(paths) == 2:
        same = sum(x == y for x, y in zip(*texts.values(), strict=True))
        print(f"  greedy tokens identical in {same} of {len(texts['TorchScript'])} answers")
    ref, _ = load_model(a.model, "float32")
    ref.fused_layers.native = None
    for p, step in paths.items():  # both on the same answers (the native path's)
        fused.native = step
        kls = []
        for prompt, answer in zip(PROMPTS, texts[next(iter(paths))], strict=False):
            ids = tok.encode(prompt)
            kls.append(teacher_forced(model, ref, torch.tensor([ids + answer]), len(ids)))
        kl, agree = statistics.mean(k for k, _ in kls), statistics.mean(g for _, g in kls)
        print(f"  {p:12s} teacher-forced against float32: mean KL {kl:.5f}, argmax agreement {agree:.3f}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        fused.native = native
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, tok, PROMPTS[:1], sampler="ar", max_new_tokens=32, stop_at_eos=False)
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=36)
        )


if __name__ == "__main__":
    with torch.no_grad():
        main()
