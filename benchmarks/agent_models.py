"""The step cost of delta models on this CPU: `ar` over an agent prompt, ms per forward, each
model at --dtype auto and, for comparison, bfloat16, interleaved in one run.

A delta over SmolLM2 keeps its base's exact 4-bit weights under `auto`; a delta over a delta
(the diffusion agent: a delta over `smollm2-nbdiff`) does too since `delta.stack`, and bfloat16
is what it ran at before (its merged base is off the 4-bit grid).

    python benchmarks/agent_models.py runs/agent-ar runs/agent-nbdiff [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from blockdiff.agent import make_task
from blockdiff.agent.trajectory import render, scripted_trajectory
from blockdiff.decoding import generate
from blockdiff.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    loaded = {(m, d): load_model(m, d) for m in a.models for d in ("auto", "bfloat16")}
    times: dict[tuple, list[float]] = {k: [] for k in loaded}
    prompt_tokens = 0
    for _ in range(a.repeats):
        for k, (model, tok) in loaded.items():  # interleaved: the machine is shared
            prompt = render(scripted_trajectory(make_task("eval", 3))[:10], tok)  # round 5's dialogue
            prompt_tokens = len(tok.encode(prompt))
            t = time.perf_counter()
            out = generate(model, tok, [prompt], "ar", max_new_tokens=a.tokens, stop_at_eos=False)
            times[k].append(1000 * (time.perf_counter() - t) / out.rows[0].nfe)
    args = f"{' '.join(a.models)} --tokens {a.tokens} --repeats {a.repeats}"
    print(f"command: python benchmarks/agent_models.py {args}")
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load {os.getloadavg()}")
    print(f"`ar`, {a.tokens} tokens after a {prompt_tokens}-token agent prompt (prefill included), median")
    print("| model | dtype | runtime precision | ms per forward |")
    print("|---|---|---|---|")
    for (m, d), (model, _) in loaded.items():
        print(f"| {m} | {d} | {model.precision} | {statistics.median(times[(m, d)]):.1f} |")


if __name__ == "__main__":
    main()
