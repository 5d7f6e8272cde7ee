"""The cost curve `spec` chooses its shape by (`costs.measure`, what `costs.forward_cost` keeps per
machine and model): ms per forward of n tokens over a 64-token cache, under a mask, logits for
every token, for the base and the adapted model at each CPU precision, and the ratio to one
token at the widths spec feeds: (k + w)(k + 2) tokens (k drafts, w candidates for the first).

    python benchmarks/cost_curve.py [--models smollm2-135m-instruct smollm2-nbdiff] [--dtypes int4 bfloat16]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from blockdiff import costs
from blockdiff.decoding.speculative import rows
from blockdiff.models import load_model
from blockdiff.quant import tiles

SHAPES = ((1, 1), (1, 2), (1, 4), (2, 1), (3, 1), (3, 4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "smollm2-nbdiff"])
    ap.add_argument("--dtypes", nargs="+", default=["int4", "bfloat16"])
    a = ap.parse_args()
    torch.set_num_threads(2)
    print(f"command: python {' '.join(sys.argv)}")
    names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
    cpu = names[0] if names else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu or platform.machine()}, "
          f"AMX tiles: {tiles()}\n")  # fmt: skip
    ms = " | ".join(str(n) for n in costs.WIDTHS)
    shapes = " | ".join(f"k={k} w={w} ({rows(k, w)})" for k, w in SHAPES)
    print(f"| model | precision | ms: {ms} | cost: {shapes} | seconds |")
    print("|---|---|" + "---|" * (len(costs.WIDTHS) + len(SHAPES) + 1))
    for name in a.models:
        for dtype in a.dtypes:
            model, _ = load_model(name, dtype)
            t = time.perf_counter()
            table = costs.measure(model)
            secs = time.perf_counter() - t
            c = costs.curve(table)
            cells = " | ".join(f"{table[n]:.1f}" for n in costs.WIDTHS)
            ratios = " | ".join(f"{c(rows(k, w)):.2f}" for k, w in SHAPES)
            print(f"| {name} | {dtype} | {cells} | {ratios} | {secs:.1f} |", flush=True)
            del model


if __name__ == "__main__":
    main()
