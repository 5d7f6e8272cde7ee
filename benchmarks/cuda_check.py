"""Correctness of the CUDA path (the CPU test suite's oracles, re-run on a GPU), and the training
step time of a SmolLM2-sized model that sizes a GPU adaptation run.

    python benchmarks/cuda_check.py [--timing-seq-len 512] [--timing-batch 16] [--steps-for-seconds 60]

Prints one PASS/FAIL line per check and exits 1 if any fails. With --steps-for-seconds S it
writes, to --steps-file, how many optimizer steps of the timed shape fit in S seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from blockdiff.config import ModelConfig
from blockdiff.decoding import generate
from blockdiff.model import BlockDiffLM
from blockdiff.models import bundled_path, load_model
from blockdiff.noise import draw
from blockdiff.objectives import block_diffusion_loss

PROMPTS = ["ROMEO.\nBut soft, what light", "KING.\nWhat news", "HAMLET.\nTo be, or not to be"]
FAILED: list[str] = []
DEV = "cuda"  # --device cpu dry-runs this script on a machine without a GPU


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def decoding_checks() -> None:
    cpu, tok = load_model(bundled_path("shakespeare-5m"))
    gpu = load_model(bundled_path("shakespeare-5m"), device=DEV)[0]
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    diff = (cpu(ids) - gpu(ids.to(DEV)).cpu()).abs().max().item()
    check("logits CUDA fp32 = CPU fp32", diff < 1e-3, f"max abs diff {diff:.2e}")
    for sampler, kw in [
        ("ar", {}),
        ("bd3", dict(block_size=4, steps=2)),
        ("bd3", dict(block_size=16, steps=8)),
        ("dcd", dict(block_size=16)),
    ]:
        kw = dict(kw, max_new_tokens=24, stop_at_eos=False)
        a = generate(gpu, tok, PROMPTS, sampler, cache="exact", **kw)
        b = generate(gpu, tok, PROMPTS, sampler, cache="none", **kw)
        check(f"{sampler} {kw}: exact KV cache = recomputation on CUDA", a.texts == b.texts)
        c = generate(cpu, tok, PROMPTS, sampler, cache="exact", **kw)
        same = sum(x == y for x, y in zip(a.texts, c.texts, strict=True))
        print(f"info  {sampler}: CUDA and CPU greedy texts identical for {same}/{len(PROMPTS)} prompts")
    for sampler, kw in [
        ("llada", dict(block_size=8, steps=8)),
        ("fastdllm", dict(block_size=8, cache="dual")),
    ]:
        batched = generate(gpu, tok, PROMPTS, sampler, max_new_tokens=16, seed=[1, 2, 3], **kw).texts
        alone = [
            generate(gpu, tok, [p], sampler, max_new_tokens=16, seed=[s], **kw).texts[0]
            for p, s in zip(PROMPTS, [1, 2, 3], strict=True)
        ]
        check(f"{sampler}: batched = unbatched on CUDA", batched == alone)
    bf = load_model(bundled_path("shakespeare-5m"), "bfloat16", device=DEV)[0]
    out = generate(bf, tok, PROMPTS, "bd3", max_new_tokens=32, block_size=4, steps=2)
    check("bf16 CUDA decoding runs", all(len(t) > 0 for t in out.texts), repr(out.texts[0][:40]))


def training_check(steps: int) -> None:
    """The trainer on CUDA in bf16: a short run of the demo recipe must lower the loss."""
    from blockdiff.train import train

    with tempfile.TemporaryDirectory() as d:
        sets = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}"]
        sets += ["train.log_every=5"]
        sets += ["train.precision=bf16", "train.warmup=5", "data.corpus=shakespeare"]
        last = train("recipes/demo.yaml", f"{d}/run", False, sets)
        import json

        lines = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = [x["loss"] for x in lines if "loss" in x]
        check(
            "trainer on CUDA (bf16) lowers the loss",
            last is not None and losses[-1] < losses[0] - 0.5,
            f"{losses[0]:.2f} -> {losses[-1]:.2f}",
        )


def fsdp_check(steps: int) -> None:
    """FSDP over 2 ranks (one GPU each: NCCL refuses two ranks on one device) against 1 process on
    the same global batch: the losses of every step, and the step time of each. On a one-GPU
    machine it says so and skips; `--device cpu` runs it over gloo."""
    import json
    import os
    import subprocess

    from blockdiff.train import train

    if DEV == "cuda" and torch.cuda.device_count() < 2:
        print(f"SKIP  FSDP 2 ranks = 1 process: {torch.cuda.device_count()} GPU (needs 2)", flush=True)
        return
    sets = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}"]
    sets += ["train.log_every=1", "train.precision=bf16", "train.warmup=5", "train.ema=0"]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        train("recipes/demo.yaml", f"{d}/one", False, sets)
        one_s = time.perf_counter() - t0
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
        cmd += ["-m", "blockdiff.cli", "train", "recipes/demo.yaml", "--out", f"{d}/two"]
        for x in [*sets, "train.parallel=fsdp", "train.activation_checkpointing=true"]:
            cmd += ["--set", x]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        two_s = time.perf_counter() - t0
        if p.returncode:
            check("FSDP 2 ranks runs", False, p.stderr[-2000:])
            return

        def read(run: str) -> list[dict]:
            lines = (Path(d) / run / "metrics.jsonl").read_text().splitlines()
            return [r for r in map(json.loads, lines) if "loss" in r]

        a, b = read("one"), read("two")
        gap = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b, strict=True))
        name = "FSDP 2 ranks (bf16, checkpointing) = 1 process, every step's loss"
        check(name, gap < 0.02, f"max rel {gap:.1e}")
        tps = [sum(r["tok_per_s"] for r in run[2:]) / len(run[2:]) for run in (a, b)]
        print(f"info  demo recipe: 1 process {tps[0]:,.0f} tok/s, FSDP 2 ranks {tps[1]:,.0f} tok/s; "
              f"wall {one_s:.0f} s vs {two_s:.0f} s with start-up", flush=True)  # fmt: skip


def timing(seq_len: int, batch: int, seconds: float, out: Path | None) -> None:
    """Step time of the NBDiff objective (B=4, context-causal, lambda=0.5) on SmolLM2's shape."""
    cfg = ModelConfig(
        vocab_size=49153, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True, logits="shifted", layout="context_causal", mask_token_id=49152,
    )  # fmt: skip
    model = BlockDiffLM(cfg).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEV == "cuda")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 49152, (batch, seq_len), device=DEV)
    bs = torch.full((batch,), 4)

    def step() -> None:
        with torch.autocast(DEV, dtype=torch.bfloat16):
            out = block_diffusion_loss(model, x0, bs, draw((batch, seq_len), bs, gen), ar_weight=0.5)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync()
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        step()
    sync()
    dt = (time.perf_counter() - t0) / n
    mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")
    print(f"info  SmolLM2 shape, NBDiff objective, batch {batch} x {seq_len}: {dt * 1e3:.0f} ms/step, "
          f"{batch * seq_len / dt:,.0f} clean tokens/s, peak {mem:.1f} GiB")  # fmt: skip
    if out is not None:
        steps = int(seconds / dt)
        out.write_text(str(steps))
        print(f"info  {steps} steps fit in {seconds:.0f} s -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timing-seq-len", type=int, default=512)
    ap.add_argument("--timing-batch", type=int, default=16)
    ap.add_argument("--steps-for-seconds", type=float, default=60.0)
    ap.add_argument("--steps-file", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--fsdp-steps", type=int, default=20)
    a = ap.parse_args()
    global DEV
    DEV = a.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    with torch.no_grad():
        decoding_checks()
    training_check(a.train_steps)
    fsdp_check(a.fsdp_steps)
    timing(a.timing_seq_len, a.timing_batch, a.steps_for_seconds, a.steps_file)
    print(f"{len(FAILED)} check(s) failed: {FAILED}" if FAILED else "all CUDA checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
