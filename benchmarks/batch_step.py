"""A batch of one-token steps on the int4 runtime: lowbit for one token per sequence (the default)
against AMX tiles for every forward (`runtime.tiles_from(model, 1)`, what `blockdiff serve` with
batches uses). One forward of one new token per sequence over a cached 64-token prefix,
batch 1/2/4/8, the two settings alternated in one process: medians of repeats, each the fastest
of 3 forwards back to back after three more.

    PYTHONPATH=src python benchmarks/batch_step.py [--model smollm2-135m-instruct] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from blockdiff import quant
from blockdiff.model import KVCache
from blockdiff.models import load_model
from blockdiff.runtime import tiles_from

BATCHES = (1, 2, 4, 8)


def timer(model, b: int):
    cache = KVCache(model.config.num_hidden_layers)
    model(torch.randint(0, 1000, (b, 64)), cache=cache, write_cache=True)
    x = torch.randint(0, 1000, (b, 1))

    def run() -> float:
        t = time.perf_counter()
        model(x, cache=cache, write_cache=False, logits_slice=slice(-1, None))
        return time.perf_counter() - t

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    if not quant.tiles():
        sys.exit("this CPU has no AMX tiles (or the native extension is unavailable)")
    torch.manual_seed(0)
    model = load_model(a.model, "int4")[0]
    runs = {b: timer(model, b) for b in BATCHES}
    times = {(b, t): [] for b in BATCHES for t in (quant.TILE_TOKENS, 1)}
    for _ in range(a.repeats):
        for tokens in (quant.TILE_TOKENS, 1):
            tiles_from(model, tokens)
            for b, run in runs.items():
                for _ in range(3):
                    run()
                times[b, tokens].append(min(run() for _ in range(3)))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.model}, 64-token prefix\n")
    print("| batch of one-token steps | lowbit for one token, ms | tiles for every forward, ms | speed-up |")
    print("|---|---|---|---|")
    for b in BATCHES:
        lo, ti = (statistics.median(times[b, t]) * 1e3 for t in (quant.TILE_TOKENS, 1))
        print(f"| {b} | {lo:.2f} | {ti:.2f} | {lo / ti:.2f}× |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
