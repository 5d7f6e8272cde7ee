"""blockdiff through lm-evaluation-harness on a local GSM8K-format task: reasoning-gym's
basic_arithmetic held-out items (the ones `blockdiff eval task basic_arithmetic` asks), the last number
of the answer (as GSM8K's flexible extract), exact match; every sampler in one run, NFEs and wall time.

    python benchmarks/lmeval_arith.py [--model smollm2-nbdiff] [--n 40] [--samplers ar,spec,fastdllm,bd3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from blockdiff.eval import tasks  # noqa: E402
from blockdiff.eval.harness import BlockdiffLM  # noqa: E402

TASK = """task: arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {tokens}
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+(?:\\\\.[0-9]+)?)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-nbdiff")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--samplers", default="ar,spec,fastdllm,bd3")
    args = ap.parse_args()
    items = tasks.items("basic_arithmetic", args.n)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "arith.json"
        data.write_text(json.dumps([{"question": it.prompt, "answer": it.answer} for it in items]))
        (Path(d) / "arith.yaml").write_text(TASK.format(data=data, tokens=args.tokens))
        manager = TaskManager(include_path=d)
        print(f"model {args.model}, {args.n} held-out basic_arithmetic items, {args.tokens} new tokens")
        print("\n| sampler | exact match | NFEs per item | tokens/NFE | seconds |")
        print("|---|---|---|---|---|")
        for sampler in args.samplers.split(","):
            lm = BlockdiffLM(pretrained=args.model, sampler=sampler, batch_size=8)
            t = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm, tasks=["arith"], task_manager=manager, apply_chat_template=True
            )
            secs = time.perf_counter() - t
            acc = out["results"]["arith"]["exact_match,number"]
            per = lm.tokens / max(1, lm.nfe)
            print(f"| {sampler} | {acc:.3f} | {lm.nfe / args.n:.1f} | {per:.2f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
