"""`blockdiff data task | distill`: training data."""

from __future__ import annotations

import argparse

from ..config import ConfigError


def cmd_data_task(a: argparse.Namespace) -> int:
    from ..eval.tasks import check_task, write_training_data

    check_task(a.task)
    if a.n < 1:
        raise ConfigError(f"--n must be >= 1 (the number of pairs to write), got {a.n}")
    out = write_training_data(a.task, a.n, a.out, a.seed)
    print(f"{a.n} {a.task} prompt/answer pairs -> {out} (evaluation questions excluded)")
    return 0


def cmd_data_distill(a: argparse.Namespace) -> int:
    from ..distill import distill

    out = distill(a.model, a.out, a.n, a.max_new_tokens, a.batch_size, a.seq_len)
    print(f"self-distilled pairs -> {out}")
    return 0


def add(sub) -> None:
    da = sub.add_parser("data", help="write training data").add_subparsers(dest="what", required=True)
    dt = da.add_parser("task", help="prompt/answer pairs (JSONL) for a reasoning task; loss on answers only")
    dt.add_argument("task")
    dt.add_argument("--n", type=int, required=True)
    dt.add_argument("--out", required=True)
    dt.add_argument("--seed", type=int, default=0)
    dt.set_defaults(fn=cmd_data_task)
    dd = da.add_parser("distill", help="a chat model's own answers to an offline prompt set (SFT JSONL)")
    dd.add_argument("--model", default="smollm2-135m-instruct")
    dd.add_argument("--n", type=int, default=100000, help="at most this many prompts (train split)")
    dd.add_argument("--out", required=True)
    dd.add_argument("--max-new-tokens", type=int, default=160, dest="max_new_tokens")
    dd.add_argument("--batch-size", type=int, default=16, dest="batch_size")
    dd.add_argument("--seq-len", type=int, default=256, dest="seq_len", help="drop pairs longer than this")
    dd.set_defaults(fn=cmd_data_distill)
