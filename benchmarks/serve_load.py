"""A bounded load test of `blockdiff serve` on 127.0.0.1: the same requests one at a time, then
with C clients at once (dynamic batching), in one run on one server; mixed lengths; greedy, so
the two passes must give the same texts.

    python benchmarks/serve_load.py [--model smollm2-nbdiff] [--sampler fastdllm] [--n 200]
        [--concurrency 16] [--lengths 16,32,64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockdiff.data.prompts import chat_prompts  # noqa: E402
from tests.serving import request, running_server  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run(url: str, model: str, prompts: list[str], lengths: list[int], concurrency: int, n: int):
    chat = request(url, "/v1/samplers")[1]["chat"]  # a model without a chat template: completions

    def one(i: int):
        p = prompts[i % len(prompts)]
        body = {"model": model, "max_tokens": lengths[i % len(lengths)], "seed": 0}
        body.update({"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p})
        t0 = time.perf_counter()
        code, r = request(url, "/v1/chat/completions" if chat else "/v1/completions", body, timeout=3600)
        dt = time.perf_counter() - t0
        if code != 200:
            return code, dt, None, 0
        c = r["choices"][0]
        return code, dt, c["message"]["content"] if chat else c["text"], r["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        out = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    return out, wall


def row(name: str, out, wall: float, base_wall: float | None) -> str:
    codes = [c for c, *_ in out]
    lat = [dt for _, dt, *_ in out]
    toks = sum(t for *_, t in out)
    gain = f"{base_wall / wall:.2f}×" if base_wall else "1.00×"
    return (
        f"| {name} | {len(out)} | {sum(c >= 500 for c in codes)} | {sum(400 <= c < 500 for c in codes)} | "
        f"{pct(lat, 0.5):.2f} | {pct(lat, 0.95):.2f} | {len(out) / wall:.2f} | {toks / wall:.1f} | {gain} |"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-nbdiff")
    ap.add_argument("--sampler", default="fastdllm")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--lengths", default="16,32,64")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    prompts = chat_prompts("heldout")
    server_args = [
        "--model",
        args.model,
        "--sampler",
        args.sampler,
        "--dtype",
        args.dtype,
        "--max-batch",
        str(args.concurrency),
        "--max-queue",
        str(4 * args.concurrency),
    ]
    with running_server(*server_args) as url:
        seq, seq_wall = run(url, args.model, prompts, lengths, 1, args.n)
        con, con_wall = run(url, args.model, prompts, lengths, args.concurrency, args.n)
    same = sum(a[2] == b[2] for a, b in zip(seq, con, strict=True))
    print(
        f"model {args.model}, sampler {args.sampler}, {args.dtype}, {args.n} requests, "
        f"max_tokens cycling {lengths}, greedy; {len(prompts)} distinct held-out prompts\n"
    )
    print("| mode | requests | 5xx | 4xx | p50 s | p95 s | requests/s | tokens/s | vs one at a time |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(row("one at a time", seq, seq_wall, None))
    print(row(f"{args.concurrency} concurrent", con, con_wall, seq_wall))
    print(f"\nsame text in both passes: {same}/{args.n}")
