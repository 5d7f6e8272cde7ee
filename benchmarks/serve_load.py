"""A bounded load test of `blockdiff serve` on 127.0.0.1: the same requests one at a time, then
with C clients at once (dynamic and continuous batching), in one run on one server; mixed
lengths; greedy, so the two passes must give the same texts. Every request streams: the time to
its first text (TTFT) is measured beside its whole latency. With --hostile, every 4th request
of the concurrent pass is a hostile one (a length beyond any memory, a 64-bit seed, a lone
surrogate, an unknown option, an unsupported format) mixed among the good ones, the server
under an address-space limit: good requests must get no 5xx, hostile ones their 4xx, and the
server's RSS stay flat.

    python benchmarks/serve_load.py [--model smollm2-nbdiff] [--sampler fastdllm] [--n 200]
        [--concurrency 16] [--lengths 16,32,64] [--dtype auto] [--hostile]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockdiff.data.prompts import chat_prompts  # noqa: E402
from tests.serving import request, running_server, stream  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


HOSTILE = [  # (what is wrong, the body's changes); the 64-bit seed is legal: it must succeed
    ("length", {"max_tokens": 10**9}),
    ("seed", {"seed": 2**64 - 1}),
    ("surrogate", {"prompt": "\ud800", "messages": [{"role": "user", "content": "\ud800"}]}),
    ("option", {"blok_size": 4}),
    ("format", {"response_format": {"type": "json_object"}}),
]


def rss_mb(port: int) -> float:
    """The server process's resident memory (it is the one listening on this port)."""
    pids = subprocess.run(["pgrep", "-f", f"serve --port {port}"], capture_output=True, text=True).stdout
    for pid in pids.split():
        status = Path(f"/proc/{pid}/status").read_text()
        if "python" in Path(f"/proc/{pid}/cmdline").read_text():
            return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    return float("nan")


def run(url, model, prompts, lengths, concurrency: int, n: int, hostile: bool = False):
    chat = request(url, "/v1/samplers")[1]["chat"]  # a model without a chat template: completions

    def one(i: int):
        p = prompts[i % len(prompts)]
        body = {"model": model, "max_tokens": lengths[i % len(lengths)], "seed": 0}
        body.update({"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p})
        bad = HOSTILE[(i // 4) % len(HOSTILE)] if hostile and i % 4 == 3 else None
        if bad is not None:
            body.update({k: v for k, v in bad[1].items() if k != ("prompt" if chat else "messages")})
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        kind = bad[0] if bad else "good"
        t0, first, text, used = time.perf_counter(), None, "", 0
        with stream(url, "/v1/chat/completions" if chat else "/v1/completions", body) as (code, lines):
            for line in lines:
                if code != 200 or not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                for c in chunk.get("choices", []):
                    piece = c["delta"].get("content") if chat else c.get("text")
                    if piece:
                        first = first or time.perf_counter() - t0
                        text += piece
                used = (chunk.get("usage") or {}).get("completion_tokens", used)
        dt = time.perf_counter() - t0
        if code != 200:
            return code, dt, None, 0, kind, dt
        return code, dt, text, used, kind, first if first is not None else dt

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        out = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    return out, wall


def row(name: str, out, wall: float, base_wall: float | None) -> str:
    codes = [c for c, *_ in out]
    lat = [r[1] for r in out]
    ttft = [r[5] for r in out if r[0] == 200]
    toks = sum(r[3] for r in out)
    gain = f"{base_wall / wall:.2f}×" if base_wall else "1.00×"
    return (
        f"| {name} | {len(out)} | {sum(c >= 500 for c in codes)} | {sum(400 <= c < 500 for c in codes)} | "
        f"{pct(ttft, 0.5):.2f} | {pct(ttft, 0.95):.2f} | {pct(lat, 0.5):.2f} | {pct(lat, 0.95):.2f} | "
        f"{len(out) / wall:.2f} | {toks / wall:.1f} | {gain} |"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-nbdiff")
    ap.add_argument("--sampler", default="fastdllm")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--lengths", default="16,32,64")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--hostile", action="store_true", help="mix hostile requests into the concurrent pass")
    ap.add_argument("--repeat", type=int, default=1, help="concurrent passes (RSS after each)")
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
    with running_server(*server_args, limit_as=8 * 2**30) as url:
        port = int(url.rsplit(":", 1)[1])
        seq, seq_wall = run(url, args.model, prompts, lengths, 1, args.n)
        rss0 = rss_mb(port)
        rss = []
        for _ in range(args.repeat):  # the last pass is the one reported; RSS after each
            con, con_wall = run(url, args.model, prompts, lengths, args.concurrency, args.n, args.hostile)
            rss.append(rss_mb(port))
        rss1 = rss[-1]
    same = sum(a[2] == b[2] for a, b in zip(seq, con, strict=True) if b[4] == "good")
    good = sum(b[4] == "good" for b in con)  # (a 64-bit seed is another seed: another text)
    print(
        f"model {args.model}, sampler {args.sampler}, {args.dtype}, {args.n} requests, "
        f"max_tokens cycling {lengths}, greedy; {len(prompts)} distinct held-out prompts\n"
    )
    print(
        "| mode | requests | 5xx | 4xx | TTFT p50 s | TTFT p95 s | p50 s | p95 s | requests/s | tokens/s "
        "| vs one at a time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(row("one at a time", seq, seq_wall, None))
    print(row(f"{args.concurrency} concurrent", con, con_wall, seq_wall))
    print(f"\nsame text in both passes: {same}/{good} good requests")
    if args.hostile:
        for kind in ["good", *(h for h, _ in HOSTILE)]:
            codes = sorted({r[0] for r in con if r[4] == kind})
            print(f"{kind}: {sum(r[4] == kind for r in con)} requests, status {codes}")
    after = ", ".join(f"{r:.0f}" for r in rss)
    print(f"server RSS {rss0:.0f} MB before the concurrent pass, {after} MB after (each pass)")
