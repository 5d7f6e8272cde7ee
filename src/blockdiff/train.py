"""Training: one loop for every objective, resumable bit for bit, data parallel under torchrun.

Everything random in a step (which sequences, which block sizes, which tokens are masked) is a
function of (seed, step) drawn for the global batch and then sliced per process. So resuming
from step k, or running on N processes, reproduces the single-process run exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import delta as delta_mod
from . import noise as noise_mod
from . import recipe as recipe_mod
from . import sharding
from .config import ConfigError, ModelConfig
from .data.corpus import encode_rows, load_corpus
from .model import BlockDiffLM
from .models import load_base_model
from .objectives import block_diffusion_loss
from .schedule import block_size_now, global_rows, lr_at
from .tokenizer import Tokenizer, byte_tokenizer, train_bpe
from .trainer_state import Checkpointing

console = Console(stderr=True)


def build_tokenizer(spec: recipe_mod.TokenizerSpec, train_texts: list[str]) -> Tokenizer:
    if spec.kind == "byte":
        return byte_tokenizer()
    if spec.kind == "bpe":
        return train_bpe(train_texts, spec.vocab_size)
    return Tokenizer.load(spec.kind)


class Trainer(Checkpointing):
    def __init__(self, r: recipe_mod.Recipe, out_dir: Path, resume: bool = False):
        self.r, self.out = r, Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a run directory")
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        sharding.check(r.train, self.world)
        self.sharded = r.train.parallel == "fsdp"
        if self.world > 1 and not dist.is_initialized():
            sharding.init_process_group()
        self.device = torch.device(
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
        if r.train.threads:
            torch.set_num_threads(r.train.threads)
        self.stop = False
        self.start_step, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.interval = tuple(r.objective.interval)
        ckpt = self._resume_point() if resume else None
        if resume and ckpt is None:
            console.print(f"[yellow]--resume: no checkpoint in {self.out}, starting from scratch[/]")
        if not resume and self._latest() is not None:
            raise ConfigError(
                f"{self.out} already holds a training run; pass --resume or choose another --out"
            )
        self._setup_data_and_model(ckpt)
        if ckpt is not None:
            self._load_state(ckpt)

    # ---- setup ---------------------------------------------------------------------------------
    def _latest(self) -> Path | None:
        f = self.out / "latest"
        return self.out / f.read_text().strip() if f.exists() else None

    def _setup_data_and_model(self, ckpt: Path | None) -> None:
        r = self.r
        mcfg = dict(r.model)
        base = mcfg.pop("base", None)
        corpus = load_corpus(r.data.corpus, r.data.val_fraction)
        base_model = None
        if ckpt:
            self.tok = Tokenizer.load(ckpt)
        elif not base:
            self.tok = build_tokenizer(r.tokenizer, corpus.train)
        if base and (ckpt is None or r.delta.rank):
            base_model, tok = load_base_model(base)
            self.tok = self.tok if ckpt else tok
            ctx = mcfg.get("max_position_embeddings", base_model.config.max_position_embeddings)
            if r.data.seq_len > ctx:
                raise ConfigError(
                    f"data.seq_len {r.data.seq_len} exceeds the base's context of {ctx}; set "
                    "model.max_position_embeddings (rotary positions: the context can grow by "
                    "fine-tuning) or shorten the rows"
                )
        self.train_data, self.train_mask = encode_rows(
            self.tok, corpus.train, corpus.train_pairs, r.data.seq_len, r.data.pad
        )
        self.val_data, self.val_mask = encode_rows(
            self.tok, corpus.val, corpus.val_pairs, r.data.seq_len, r.data.pad
        )
        sizes = r.block_sizes()
        if base:  # adapting a pretrained model: its architecture, our diffusion settings
            src = ModelConfig.load(ckpt / "config.json") if ckpt else base_model.config
            self.cfg = dataclasses.replace(
                src,
                block_size=sizes[0],
                block_sizes=sizes,
                train_seq_len=r.data.seq_len,
                ar_weight=r.objective.ar_weight,
                **{"draft_acceptance": [], **mcfg},  # the base's measured prior is not this model's
            )
            self.model = base_model if base_model is not None else BlockDiffLM(self.cfg)
            self.model.config = self.cfg
            self.delta_info = None
            if r.delta.rank:  # the base stays frozen, bit for bit; only the delta trains
                self.delta_info = {
                    **r.delta_dict(),
                    "base": str(base),
                    "base_sha256": delta_mod.base_checksum(self.model),
                }
                torch.manual_seed(r.train.seed)  # the delta's initial A: the recipe's, not the caller's RNG
                delta_mod.attach(self.model, r.delta)
            self.model.to(self.device)
            self._setup_optimizer()
            return
        mcfg.update(
            vocab_size=self.tok.vocab_size,
            mask_token_id=self.tok.mask_id,
            eos_token_id=self.tok.eos_id,
            pad_token_id=self.tok.pad_id,
            block_size=sizes[0],
            block_sizes=sizes,
            train_seq_len=r.data.seq_len,
            ar_weight=r.objective.ar_weight,
            max_position_embeddings=max(r.data.seq_len, mcfg.get("max_position_embeddings", 0)),
        )
        torch.manual_seed(r.train.seed)
        self.delta_info = None
        self.cfg = ModelConfig.from_user(mcfg)
        self.model = BlockDiffLM(self.cfg).to(self.device)
        self._setup_optimizer()

    def _setup_optimizer(self) -> None:
        r = self.r
        self.ddp = sharding.parallelize(self.model, r.train, self.world)  # first: AdamW holds the shards
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": r.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=r.train.lr, betas=tuple(r.train.betas))
        self.ema = {n: p.detach().clone() for n, p in self.trainable()} if r.train.ema else None

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What the optimizer updates and the trainer state stores: all weights, or the delta."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # ---- steps ---------------------------------------------------------------------------------
    def _backward(self, x0, bs, nz, keep, tw) -> torch.Tensor:
        """Gradients of this process's rows, in `train.accumulate` micro-batches (gradients are
        synchronised on the last one only); returns [loss, diff, ar], their mean."""
        r, A = self.r, self.r.train.accumulate
        n, parts = len(x0) // A, []
        for i in range(A):
            sl, last = slice(i * n, (i + 1) * n), i == A - 1
            with self._sync(last), self.autocast():
                part = None if keep is None else keep[sl]
                out = block_diffusion_loss(
                    self.ddp,
                    x0[sl],
                    bs[sl],
                    nz.rows(sl),
                    r.objective.ar_weight,
                    part,
                    tw,
                    r.objective.time_weight,
                    r.objective.distill,
                )
            (out.loss / A).backward()
            parts.append(torch.stack([out.loss.detach(), out.diff.detach(), out.ar.detach()]).float())
        return torch.stack(parts).mean(0)

    def _sync(self, last: bool):
        """Gradient synchronisation on the last micro-batch of a step only (DDP, FSDP)."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
        elif self.ddp is not self.model and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def batch(self, step: int, batch: int, seed: int, interval, sizes: list[int]):
        """Global batch for `step`, sliced to this process's rows (with their loss mask, if any)."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = global_rows(step, batch, len(self.train_data), seed)
        x0 = self.train_data[rows]
        w = torch.tensor(self.r.objective.weights or [1.0] * len(sizes), dtype=torch.float)
        bs = torch.tensor(sizes)[torch.multinomial(w, batch, replacement=True, generator=gen)]
        keep = None if self.train_mask is None else self.train_mask[rows]
        offs = noise_mod.grid_offsets(keep, bs)
        nz = noise_mod.draw(tuple(x0.shape), bs, gen, interval, self.r.objective.antithetic, offs)
        per = batch // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        keep = None if keep is None else keep[sl].to(self.device)
        return x0[sl].to(self.device), bs[sl], nz.rows(sl), keep

    def autocast(self):
        on = self.r.train.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """NLL bound per token (full interval, fixed noise) for each block size of the recipe."""
        r, out = self.r, {}
        self.model.eval()
        with self.ema_weights():
            for B in sorted(set(r.block_sizes())):
                tot = 0.0
                n = min(r.train.eval_batches, max(1, len(self.val_data) // r.train.batch_size))
                for i in range(n):
                    rows = torch.arange(i * r.train.batch_size, (i + 1) * r.train.batch_size) % len(
                        self.val_data
                    )
                    x0, keep = self.val_data[rows].to(self.device), self._val_mask(rows)
                    gen = torch.Generator().manual_seed(10_007 + i)
                    bs = torch.full((len(x0),), B)
                    offs = noise_mod.grid_offsets(keep, bs)
                    nz = noise_mod.draw(tuple(x0.shape), bs, gen, (0.0, 1.0), True, offs)
                    with self.autocast():
                        tot += block_diffusion_loss(self.model, x0, bs, nz, loss_mask=keep).diff.item()
                out[f"val_nll_B{B}"] = tot / n
            if r.objective.adaptive_interval:
                self.interval = self._choose_interval()
                out["interval"] = list(self.interval)
        main = out[f"val_nll_B{r.block_sizes()[0]}"]
        out.update(val_nll=main, val_ppl_bound=math.exp(min(main, 50)))
        self.model.train()
        return out

    def _val_mask(self, rows: torch.Tensor) -> torch.Tensor | None:
        return None if self.val_mask is None else self.val_mask[rows].to(self.device)

    def _choose_interval(self) -> tuple[float, float]:
        """BD3-LM's data-driven clipping: the [beta, omega] whose loss estimates vary least."""
        rows = torch.arange(min(self.r.train.batch_size, len(self.val_data)))
        x0, keep = self.val_data[rows].to(self.device), self._val_mask(rows)
        bs = torch.full((len(x0),), self.r.block_sizes()[0])
        best, best_var = self.interval, float("inf")
        for cand in noise_mod.interval_candidates():
            gen = torch.Generator().manual_seed(4242)
            nz = noise_mod.draw(tuple(x0.shape), bs, gen, cand, True, noise_mod.grid_offsets(keep, bs))
            with self.autocast():
                var = block_diffusion_loss(self.model, x0, bs, nz, loss_mask=keep).rows.var().item()
            if var < best_var:
                best, best_var = cand, var
        return best

    def _on_signal(self, signum, frame) -> None:
        self.stop = True
        console.print(f"[yellow]signal {signum}: saving a checkpoint after this step[/]")

    def run(self) -> Path | None:
        """Train to train.steps. SIGINT/SIGTERM: checkpoint after the current step, exit 130."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:  # in-process callers (tests, notebooks) get their own handlers back
            for s, h in previous.items():
                signal.signal(s, h)

    def _run(self) -> Path | None:
        r = self.r
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            # Drop records past the step we start from (all of them on a fresh start), so the log
            # never holds a step twice; one writer, so processes do not race on the temp file.
            self._trim_metrics(self.start_step)
        if self.rank == 0:
            console.print(
                f"blockdiff train: {self.model.num_parameters() / 1e6:.2f}M params, "
                f"block sizes {r.block_sizes()}, "
                f"{len(self.train_data)} train / {len(self.val_data)} val sequences of {r.data.seq_len}, "
                f"{self.world} process(es), device {self.device}"
            )
        metrics_f = self.out / "metrics.jsonl"
        self.model.train()
        with self._progress_bar() as bar:
            return self._loop(metrics_f, bar)

    def _progress_bar(self):
        """A live bar (loss, tokens/s, time left) on a terminal; log lines alone otherwise."""
        if self.rank != 0 or not console.is_terminal:
            return contextlib.nullcontext(None)
        return Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )

    def _loop(self, metrics_f: Path, bar: Progress | None) -> Path | None:
        r, t = self.r, self.r.train
        task = bar.add_task("train", total=t.steps, completed=self.start_step, info="") if bar else None
        step, t0, tok0 = self.start_step, time.time(), self.tokens_seen
        last = None
        tw = tuple(r.objective.token_weight) if r.objective.token_weight else None
        while step < t.steps:
            lr = lr_at(step, t)
            for g in self.opt.param_groups:
                g["lr"] = lr
            sizes = block_size_now(r, step)
            x0, bs, nz, keep = self.batch(step, t.batch_size, t.seed, self.interval, sizes)
            tic = time.time()
            losses = self._backward(x0, bs, nz, keep, tw)
            gnorm = sharding.full(
                torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable()], t.grad_clip)
            )
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ema:
                d = min(t.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for n, p in self.trainable():
                        self.ema[n].mul_(d).add_(p.detach(), alpha=1 - d)
            self.train_seconds += time.time() - tic
            step += 1
            self.tokens_seen += t.batch_size * r.data.seq_len
            if self.world > 1:
                # Each process holds the mean over its own rows: the global batch's loss is their mean.
                dist.all_reduce(losses)
                losses /= self.world
            loss, diff, ar = losses.tolist()
            rec = {"step": step, "loss": loss, "diff": diff, "ar": ar, "lr": lr, "block_size": sizes[0]}
            if bar is not None:
                tps = (self.tokens_seen - tok0) / (time.time() - t0)
                bar.update(task, completed=step, info=f"loss {loss:.4f} · {tps:.0f} tok/s · B={sizes[0]}")
            if step % t.log_every == 0 or step == t.steps:
                el = time.time() - t0
                rec.update(
                    grad_norm=gnorm.item(),
                    tokens_seen=self.tokens_seen,
                    tok_per_s=(self.tokens_seen - tok0) / el,
                )
                if self.rank == 0:
                    console.print(
                        f"step {step}/{t.steps} loss {rec['loss']:.4f} lr {lr:.2e} "
                        f"{rec['tok_per_s']:.0f} tok/s",
                        highlight=False,
                    )
            if step % t.eval_every == 0 or step == t.steps:
                rec.update(self.evaluate())
                if self.rank == 0:
                    console.print(
                        f"  eval: val NLL bound {rec['val_nll']:.4f} (ppl <= {rec['val_ppl_bound']:.2f})"
                    )
            if self.rank == 0 and (step % t.log_every == 0 or "val_nll" in rec or step == t.steps):
                with metrics_f.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if self.world > 1:
                flag = torch.tensor([float(self.stop)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                self.stop = bool(flag.item())
            if step % t.save_every == 0 or step == t.steps or self.stop:
                last = self.save(step, {k: v for k, v in rec.items() if k.startswith("val")}) or last
                if self.world > 1:
                    dist.barrier()
            if self.stop:
                if self.rank == 0:
                    console.print(f"[yellow]stopped at step {step}; resume with --resume --out {self.out}[/]")
                raise SystemExit(130)
        return last


def train(recipe_path: str, out_dir: str | None, resume: bool, sets: list[str]) -> Path | None:
    r = recipe_mod.load(recipe_path, sets)
    out = Path(out_dir) if out_dir else Path("runs") / Path(recipe_path).stem
    trainer = Trainer(r, out, resume)
    try:
        return trainer.run()
    finally:
        del trainer  # FSDP's modules hold the process group: free them first (docs/decisions.md)
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
