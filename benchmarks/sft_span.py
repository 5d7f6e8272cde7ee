"""What feeding only the scored span saves on supervised rows: one training step (loss, backward)
of a rank-16 delta over the shipped NBDiff SmolLM2 on a batch of agent rows (long prompts,
short calls), with the cut (`objectives.scored_span`) and without it (the whole row in both
halves), and the AR step on the same rows for reference. Round-robin repeats, medians, bf16
autocast as in training; the losses are printed to show the two computations agree.

    python benchmarks/sft_span.py --data runs/agent/sft.jsonl [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

from blockdiff import delta, noise, objectives
from blockdiff.data.corpus import pack_pairs, read_pairs
from blockdiff.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="smollm2-nbdiff")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=640, dest="seq_len")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model, tok = load_model(a.model, None)
    delta.attach(model, delta.DeltaSpec(rank=16))
    model.train()
    pairs = read_pairs(Path(a.data))
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(pairs), generator=g)[: a.batch].tolist()
    ids, keep = pack_pairs(tok, [pairs[i] for i in pick], a.seq_len, pad="mask")
    x0, keep = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(keep)
    b, L = x0.shape
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"{b} rows of {L}; scored tokens per row {keep.sum(1).float().mean():.1f}, "
        f"last scored column {int(keep.any(0).nonzero()[-1])}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    bs4, bs1 = torch.full((b,), 4), torch.full((b,), 1)
    off = noise.grid_offsets(keep, bs4)
    nz = noise.draw((b, L), bs4, g, offsets=off)
    whole = lambda keep, *r: (torch.zeros(len(keep), dtype=torch.long), keep.shape[1], keep.shape[1])  # noqa: E731

    def step(bs, cut: bool) -> tuple[float, float]:
        ctx = mock.patch.object(objectives, "scored_span", whole) if not cut else nullcontext()
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
            out = objectives.block_diffusion_loss(model, x0, bs, nz, ar_weight=0.5, loss_mask=keep)
        out.loss.backward()
        return time.perf_counter() - t, out.loss.item()

    rows = {
        "NBDiff B=4, whole rows": (bs4, False),
        "NBDiff B=4, scored span": (bs4, True),
        "AR (B=1), whole rows": (bs1, False),
        "AR (B=1), scored span": (bs1, True),
    }
    times: dict[str, list[float]] = {k: [] for k in rows}
    loss: dict[str, float] = {}
    for _ in range(a.repeats):
        for k, (bs, cut) in rows.items():
            s, loss[k] = step(bs, cut)
            times[k].append(s)
    ref = statistics.median(times["NBDiff B=4, whole rows"])
    print("| step | seconds (median) | vs NBDiff whole rows | loss |")
    print("|---|---|---|---|")
    for k in rows:
        m = statistics.median(times[k])
        print(f"| {k} | {m:.2f} | {m / ref:.2f}x | {loss[k]:.4f} |")


if __name__ == "__main__":
    main()
