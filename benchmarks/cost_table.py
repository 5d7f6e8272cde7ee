"""The per-forward cost table that chooses the runtime's precision by forward width, and each
precision's quality.

One forward of n new tokens over a cached 64-token prefix (SmolLM2-135M, batch 1), for the
4-bit kernel alone, the bfloat16 copy alone, bfloat16, int8 and float32; one model (one side of
int4's switch) at a time, medians of repeats interleaved over the widths, each the fastest of 3
forwards back to back after three more (the 4-bit side reads two layouts: lowbit's for one token,
the tiles' for more), as decoding runs them (with all four models loaded and interleaved, as
this script did before, the bfloat16 one-token forward read 11.6 ms against 7.9 alone: this
machine's large shared cache keeps one model's weights between its forwards, not four models').
`quant.narrow_rows()` is the widest forward for which the 4-bit kernel is the faster (it runs in
the native step only: forwards of at most `runtime.NATIVE_ROWS` tokens; NARROW_ROWS_TILES where
the CPU has AMX tiles, as this run's, NARROW_ROWS without). Quality:
teacher-forced, one token per forward over the cache (the decoding path), on held-out chat
prompts and float32's greedy answers: KL(float32 || precision) per token and argmax agreement.

    python benchmarks/cost_table.py [--model smollm2-135m-instruct] [--repeats 7]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from blockdiff.data.prompts import chat_prompts
from blockdiff.decoding import generate
from blockdiff.model import KVCache
from blockdiff.models import load_model
from blockdiff.runtime import NATIVE_ROWS

ROWS = (1, 2, 4, 8, 16, 32)


def forced(model, rows: int):
    """The int4 model with its width switch forced to one side (rows = its switch point)."""
    model.width_switch.rows = rows
    return model


def timer(model, n: int, prefix: int = 64):
    ids = torch.randint(0, 1000, (1, prefix))
    cache = KVCache(model.config.num_hidden_layers)
    model(ids, cache=cache, write_cache=True)
    x = torch.randint(0, 1000, (1, n))

    def run() -> float:
        t = time.perf_counter()
        model(x, cache=cache, write_cache=False, logits_slice=slice(-1, None))
        return time.perf_counter() - t

    return run


def quality(model, seqs, per: int = 1) -> list[torch.Tensor]:
    """Log-probs of every answer token, fed `per` tokens per forward over the cache (causal within
    them: 1 is the AR step's path; more, the 4-bit side's tiles)."""
    out = []
    for ids, n in seqs:
        cache = KVCache(model.config.num_hidden_layers)
        causal = torch.ones(n - 1, n - 1, dtype=torch.bool).tril()[None, None]  # as decoding feeds it
        model(ids[None, : n - 1], mask=causal, cache=cache, write_cache=True)
        steps = []
        for t in range(n - 1, len(ids) - 1, per):
            w = min(per, len(ids) - 1 - t)
            mask = torch.ones(w, len(cache) + w, dtype=torch.bool).tril(len(cache))[None, None]
            steps.append(model(ids[None, t : t + w], mask=mask, cache=cache, write_cache=True))
        out.append(torch.cat(steps, 1)[0].float().log_softmax(-1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quality-prompts", type=int, default=8, dest="quality_prompts")
    a = ap.parse_args()
    torch.manual_seed(0)
    # One model (one side of int4's switch) at a time, the others released: this machine's large
    # shared cache holds a model's weights between forwards when only it runs, as in decoding.
    variants = {p: (lambda p=p: load_model(a.model, p)[0]) for p in ("int4", "bfloat16", "int8", "float32")}
    sides = {"int4": {"int4 (4-bit kernel)": 10**9, "int4 (its bfloat16 copy)": 0}}  # its switch forced
    times: dict = {}
    for name, make in variants.items():
        model = make()
        runs = {n: timer(model, n) for n in ROWS}
        for label, rows in sides.get(name, {name: None}).items():  # each side warm, as decoding runs it
            if rows is not None:
                forced(model, rows)
            # the 4-bit codes run in the native step only: wider forwards would time the
            # bfloat16 copy between the codes' forwards and push the codes out of the cache
            widths = [n for n in ROWS if label != "int4 (4-bit kernel)" or n <= NATIVE_ROWS]
            times[label] = {n: [] for n in widths}
            for _ in range(a.repeats):
                for n in widths:  # warmed first: the 4-bit side reads two layouts (lowbit, tiles)
                    for _ in range(3):
                        runs[n]()
                    times[label][n].append(min(runs[n]() for _ in range(3)))  # back to back
        del model, runs
        gc.collect()
    med = {label: {n: statistics.median(t[1:]) for n, t in ts.items()} for label, ts in times.items()}
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.model}, 64-token cached prefix\n"
    )
    print("| ms per forward, n new tokens | " + " | ".join(map(str, ROWS)) + " |")
    print("|---|" + "---|" * len(ROWS))
    for label, m in med.items():
        print(f"| {label} | " + " | ".join(f"{m[n] * 1e3:.1f}" if n in m else "–" for n in ROWS) + " |")
    narrow, wide = med["int4 (4-bit kernel)"], med["int4 (its bfloat16 copy)"]
    cross = max((n for n in ROWS if n <= NATIVE_ROWS and narrow[n] <= wide[n]), default=0)
    print(f"\nwidest forward where the 4-bit kernel is faster than bfloat16: {cross} rows")
    mem = {
        label: sum(t.numel() * t.element_size() for t in [*mdl.parameters(), *mdl.buffers()]) / 1e6
        for label, mdl in (("int4 runtime (4-bit + bf16 copy)", load_model(a.model, "int4")[0]),
                           ("int8", load_model(a.model, "int8")[0]),
                           ("bfloat16", load_model(a.model, "bfloat16")[0]))
    }  # fmt: skip
    print("memory of weights: " + ", ".join(f"{k} {v:.0f} MB" for k, v in mem.items()))

    ref, tok = load_model(a.model, "float32")
    seqs = []
    for q in chat_prompts("heldout")[: a.quality_prompts]:
        p = tok.chat(q)
        ids = tok.encode(p)
        answer = generate(ref, tok, [p], sampler="ar", max_new_tokens=48).tokens[0]  # up to its EOS
        seqs.append((torch.tensor(ids + answer), len(ids)))
    got = {"float32": quality(ref, seqs)}
    for prec in ("bfloat16", "int4", "int8"):
        got[prec] = quality(load_model(a.model, prec)[0], seqs)
    got["int4, 4 tokens a forward"] = quality(load_model(a.model, "int4")[0], seqs, per=4)
    total = sum(len(x) for x in got["float32"])
    head = "| vs | KL mean | KL median | KL max | argmax agreement |"
    print(f"\n| teacher-forced ({total} answer tokens) {head}\n|---|---|---|---|---|---|")
    pairs = [("bfloat16", "float32"), ("int4", "float32"), ("int4, 4 tokens a forward", "float32")]
    for label, against in [*pairs, ("int8", "float32"), ("int4", "bfloat16"), ("int8", "bfloat16")]:
        ps, qs = got[against], got[label]
        kl = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(ps, qs, strict=True)])
        agree = sum(int((p.argmax(-1) == q.argmax(-1)).sum()) for p, q in zip(ps, qs, strict=True))
        stats = f"{kl.mean():.4f} | {kl.median():.4f} | {kl.max():.2f}"
        print(f"| {label} | {against} | {stats} | {agree}/{total} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
