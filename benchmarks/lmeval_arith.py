"""blockdiff through lm-evaluation-harness on a blockdiff task exported with `write_task`
(`blockdiff eval lm-eval-task`): reasoning-gym's basic_arithmetic held-out items, the prompts and
the checker of `blockdiff eval task basic_arithmetic`; every sampler in one run, accuracy, NFEs
and wall time.

    python benchmarks/lmeval_arith.py [--model smollm2-nbdiff] [--n 40] [--samplers ar,spec,fastdllm,bd3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from blockdiff.eval.harness import BlockdiffLM, write_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-nbdiff")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--samplers", default="ar,spec,fastdllm,bd3")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        task = write_task("basic_arithmetic", args.n, d, args.tokens).stem
        manager = TaskManager(include_path=d)
        print(f"command: python {' '.join(sys.argv)}")
        print(f"model {args.model}, {args.n} held-out basic_arithmetic items, {args.tokens} new tokens")
        print("\n| sampler | accuracy | mean score | NFEs per item | tokens/NFE | seconds |")
        print("|---|---|---|---|---|---|")
        for sampler in args.samplers.split(","):
            lm = BlockdiffLM(pretrained=args.model, sampler=sampler, batch_size=8)
            t = time.perf_counter()
            res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager)["results"][task]
            secs = time.perf_counter() - t
            per = lm.tokens / max(1, lm.nfe)
            print(f"| {sampler} | {res['acc,none']:.3f} | {res['score,none']:.3f} | {lm.nfe / args.n:.1f} | "
                  f"{per:.2f} | {secs:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
