"""Training throughput of every objective on one model and one batch: AR, MDLM, BD3 (B=4, 16), mix-scale.

One training step = `blockdiff.objectives.block_diffusion_loss` (mask and noise building included)
+ backward + gradient clipping + AdamW step, as in `blockdiff.train`. Each configuration gets its
own model (same shape, same initial weights) and optimizer. The configurations are run
round-robin: every repeat times `--steps` steps of each configuration in turn, so slow phases of
a shared, noisy machine hit all of them alike; the table reports the median over all timed
steps.

Clean tokens are the tokens of the training sequences (batch x seq_len), the same for every
row; BD3 and mix-scale feed 2x as many tokens to the transformer ([xt ⊕ x0]).

Peak memory is measured in a fresh process per configuration (`--no-memory` skips it): that
process builds the model and optimizer, runs `--memory-steps` steps and reports
* CPU: peak resident set size (VmHWM; ru_maxrss where there is no /proc) of the whole process
  (Python, torch, weights, everything), and Δ = peak RSS minus the RSS just before the first
  step: the activations, gradients, AdamW moments and allocator caches that training adds.
* CUDA: torch.cuda.max_memory_allocated (tensors only, no allocator cache), and Δ from the
  allocation before the first step.

    python benchmarks/train_throughput.py                        # demo shape, fp32 and bf16
    python benchmarks/train_throughput.py --precision bf16 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from blockdiff import noise as noise_mod
from blockdiff.config import ModelConfig
from blockdiff.model import BlockDiffLM
from blockdiff.objectives import block_diffusion_loss


@dataclass
class Setting:
    name: str
    sizes: list  # block sizes drawn per row ("L" = the whole sequence)
    logits: str


SETTINGS = [
    Setting("AR", [1], "shifted"),
    Setting("MDLM", ["L"], "aligned"),
    Setting("BD3 B=4", [4], "aligned"),
    Setting("BD3 B=16", [16], "aligned"),
    Setting("mix-scale", [4, 16, "L"], "aligned"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5, help="round-robin rounds over all configurations")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    p.add_argument("--only", nargs="+", help="run only these configurations (names as in the table)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: memory of one setting in this process
    p.add_argument("--probe-precision", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [s.name for s in SETTINGS]
    for n in a.only or []:
        if n not in names:
            p.error(f"unknown configuration '{n}' (known: {', '.join(names)})")
    for s in SETTINGS:
        for B in s.sizes:
            if B != "L" and a.seq_len % B:
                p.error(f"block size {B} of '{s.name}' does not divide --seq-len {a.seq_len}")
    return a


def model_config(a: argparse.Namespace, **diffusion) -> ModelConfig:
    """The benchmarked shape from the command line; diffusion fields per configuration."""
    return ModelConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        mask_token_id=a.vocab - 1,
        **diffusion,
    )


# ---- one configuration --------------------------------------------------------------------------
class Run:
    """A model, its optimizer and the fixed batch of one configuration."""

    def __init__(self, s: Setting, a: argparse.Namespace, precision: str, x0: torch.Tensor):
        self.s, self.a, self.precision = s, a, precision
        self.device = torch.device(a.device)
        L = a.seq_len
        self.sizes = [L if B == "L" else int(B) for B in s.sizes]
        cfg = model_config(
            a, max_position_embeddings=L, block_size=self.sizes[0], block_sizes=self.sizes, logits=s.logits
        )
        torch.manual_seed(a.seed)
        self.model = BlockDiffLM(cfg).to(self.device).train()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=3e-4,
            betas=(0.9, 0.95),
        )
        self.x0 = x0.to(self.device)
        self.n = 0

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        gen = torch.Generator().manual_seed(self.a.seed * 1_000_003 + self.n)
        self.n += 1
        b = len(self.x0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tic = time.perf_counter()
        pick = torch.randint(len(self.sizes), (b,), generator=gen)
        bs = torch.tensor(self.sizes)[pick]
        nz = noise_mod.draw(tuple(self.x0.shape), bs, gen, (0.0, 1.0), True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = block_diffusion_loss(self.model, self.x0, bs, nz)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - tic


def transformer_tokens_per_clean_token(s: Setting) -> int:
    """1 for AR (x0 alone) and MDLM (xt alone); 2 for the vectorised [xt ⊕ x0] input."""
    return 1 if (s.sizes == [1] and s.logits == "shifted") or s.sizes == ["L"] else 2


def batch(a: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(a.seed)
    return torch.randint(0, a.vocab - 1, (a.batch, a.seq_len), generator=g)  # never the mask id


# ---- memory: one fresh process per configuration ------------------------------------------------
def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def rss_now_mb() -> float:
    now = _proc_status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak RSS of this process image. On Linux VmHWM, not ru_maxrss: ru_maxrss survives execve
    and so starts at the RSS of the parent that spawned us (the timing process, with every model)."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10  # bytes on macOS, KiB elsewhere


def probe(a: argparse.Namespace) -> None:
    s = next(s for s in SETTINGS if s.name == a.probe)
    run = Run(s, a, a.probe_precision, batch(a))
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
        before = torch.cuda.memory_allocated(run.device) / 2**20
        for _ in range(a.memory_steps):
            run.step()
        peak = torch.cuda.max_memory_allocated(run.device) / 2**20
    else:
        before = rss_now_mb()
        for _ in range(a.memory_steps):
            run.step()
        peak = peak_rss_mb()
    print(json.dumps({"peak_mb": peak, "delta_mb": peak - before}))


def measure_memory(a: argparse.Namespace, s: Setting, precision: str, argv: list[str]) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        *argv,
        "--probe",
        s.name,
        "--probe-precision",
        precision,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"memory probe for {s.name} ({precision}) failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- the table ----------------------------------------------------------------------------------
def run_precision(a: argparse.Namespace, precision: str, settings: list[Setting], argv: list[str]) -> None:
    x0 = batch(a)
    runs = [Run(s, a, precision, x0) for s in settings]
    times: dict[str, list[float]] = {r.s.name: [] for r in runs}
    t0 = time.time()
    for _ in range(a.warmup):
        for r in runs:
            r.step()
    for _ in range(a.repeats):  # round-robin: each round visits every configuration
        for r in runs:
            times[r.s.name].extend(r.step() for _ in range(a.steps))
    wall = time.time() - t0
    del runs
    mem = {s.name: measure_memory(a, s, precision, argv) for s in settings} if not a.no_memory else {}

    clean = a.batch * a.seq_len
    med = {n: statistics.median(v) for n, v in times.items()}
    ref = med.get("AR")
    mem_kind = "peak alloc MB" if a.device.startswith("cuda") else "peak RSS MB"
    print(f"\n### {precision}{' (autocast)' if precision == 'bf16' else ''}, {a.device}\n")
    head = [
        "config",
        "block sizes",
        "logits",
        "step ms (median)",
        "spread ms",
        "clean tok/s",
        "step / AR",
        "time per clean token / AR",
        "transformer tokens per clean token",
    ]
    if mem:
        head += [mem_kind, "Δ MB (step)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for s in settings:
        v = sorted(times[s.name])
        m = med[s.name]
        q1, q3 = v[len(v) // 4], v[(3 * len(v)) // 4]
        ratio = f"{m / ref:.2f}x" if ref else "n/a"
        # Same batch and seq_len for every row, so time per clean token scales like step time.
        per_tok = f"{(m / clean) / (ref / clean):.2f}x" if ref else "n/a"
        sizes = "[" + ", ".join(str(b) for b in s.sizes) + "]"
        row = [
            s.name,
            sizes,
            s.logits,
            f"{m * 1e3:.0f}",
            f"{q1 * 1e3:.0f}–{q3 * 1e3:.0f}",
            f"{clean / m:,.0f}",
            ratio,
            per_tok,
            str(transformer_tokens_per_clean_token(s)),
        ]
        if mem:
            row += [f"{mem[s.name]['peak_mb']:.0f}", f"{mem[s.name]['delta_mb']:.0f}"]
        print("| " + " | ".join(row) + " |")
    n = a.repeats * a.steps
    print(
        f"\n{n} timed steps per configuration ({a.repeats} rounds x {a.steps}), {a.warmup} warm-up; "
        f"spread = interquartile range; timing wall {wall:.0f}s. Every configuration trains on the same "
        f"{clean} clean tokens per step, so time per clean token / AR equals step / AR."
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.probe:
        probe(a)
        return
    settings = [s for s in SETTINGS if not a.only or s.name in a.only]
    params = BlockDiffLM(model_config(a)).num_parameters()
    print("$ " + shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])))
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(
        f"\ntorch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, device {a.device}, load average {load} at start"
    )
    print(
        f"model: {params / 1e6:.2f}M parameters (hidden {a.hidden}, {a.layers} layers, {a.heads} heads / "
        f"{a.kv_heads} KV heads, intermediate {a.intermediate}, vocab {a.vocab}); "
        f"batch {a.batch} x seq_len {a.seq_len} = {a.batch * a.seq_len} clean tokens per step"
    )
    for precision in a.precision:
        run_precision(a, precision, settings, argv)


if __name__ == "__main__":
    main()
