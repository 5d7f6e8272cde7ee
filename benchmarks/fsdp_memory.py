"""DDP vs FSDP on this machine: peak memory and step time per process, SmolLM2-135M full
fine-tuning (the NBDiff recipe), 2 processes each, one after the other in one run.

Peak memory is each worker's peak resident set (VmHWM in /proc, polled while it runs); the step
time is the mean over the logged steps after the first (metrics.jsonl). The only checkpoint is
the final one; "during the steps" stops sampling when the last step is logged, before it (a
sharded run's save gathers the full state on rank 0, which the whole-run peak includes).

    python benchmarks/fsdp_memory.py [--steps 6] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def status_kib(pid: int, key: str) -> int:
    """VmHWM (peak resident set so far) or VmRSS (resident now) of a process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(mode: str, a: argparse.Namespace, out: Path) -> dict:
    torchrun = Path(sys.executable).parent / "torchrun"
    ac = str(a.checkpointing and mode == "fsdp").lower()
    sets = {"train.parallel": mode, "train.steps": a.steps, "train.batch_size": a.batch}
    sets |= {"data.seq_len": a.seq_len, "train.save_every": 10**6, "train.eval_every": 10**6}
    sets |= {"train.log_every": 1, "train.warmup": 1, "train.activation_checkpointing": ac}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "blockdiff.cli", "train"]
    cmd += ["recipes/nbdiff-smollm2.yaml", "--out", str(out / mode), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    steady: dict[int, int] = {}  # resident set while the steps run (after the first one is logged)
    metrics_f = out / mode / "metrics.jsonl"
    while p.poll() is None:
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        for k in map(int, kids):
            peaks[k] = max(peaks.get(k, 0), status_kib(k, "VmHWM"))
            if metrics_f.exists() and f'"step": {a.steps},' not in metrics_f.read_text():
                steady[k] = max(steady.get(k, 0), status_kib(k, "VmRSS"))  # steps, not the final save
        time.sleep(0.2)
    err = p.stderr.read()
    if p.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{err[-3000:]}")
    m = [json.loads(ln) for ln in (out / mode / "metrics.jsonl").read_text().splitlines()]
    tokens = a.batch * a.seq_len
    secs = [tokens / r["tok_per_s"] for r in m[1:] if "tok_per_s" in r]  # cumulative rate: rough
    peak = [v / 1024 for v in peaks.values()]
    return {
        "peak_mib": peak,
        "steady_mib": [v / 1024 for v in steady.values()],
        "loss": m[-1]["loss"],
        "tok_s": m[-1]["tok_per_s"],
        "step_s": sum(secs) / len(secs),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--checkpointing", action="store_true", help="FSDP with activation checkpointing")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = {mode: run(mode, a, Path(d)) for mode in ("ddp", "fsdp")}
    flag = " --checkpointing" if a.checkpointing else ""
    size = f"--steps {a.steps} --batch {a.batch} --seq-len {a.seq_len}{flag}"
    print(f"command: python benchmarks/fsdp_memory.py {size}")
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, 2 processes x 1 thread, gloo")
    print(f"load average at the end: {os.getloadavg()}")
    print(
        "| mode | peak RSS per process, whole run (MiB) | max RSS during the steps (MiB) "
        "| tokens/s | final loss |"
    )
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        peaks = " / ".join(f"{x:.0f}" for x in sorted(r["peak_mib"]))
        steady = " / ".join(f"{x:.0f}" for x in sorted(r["steady_mib"]))
        print(f"| {mode} | {peaks} | {steady} | {r['tok_s']:.0f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
