"""Training state on disk: atomic checkpoints with the model in HF layout plus trainer state
(raw weights, EMA, AdamW moments as safetensors, or as torch.distributed.checkpoint shards when
the run is sharded; step, tokens, timing, recipe as JSON), the `latest` pointer, bit-exact resume
and the metrics log. Mixed into `train.Trainer`."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save_file

from . import sharding
from .checkpoint import (
    SHARDED,
    CheckpointError,
    atomic_dir,
    save_config,
    save_delta,
    save_model,
    verify,
    write_manifest,
    write_text_atomic,
)
from .config import ConfigError

console = Console(stderr=True)
# what a resumed run may change: its length, and how the same training is spread over processes
RESUMABLE_CHANGES = {("train", "steps"), ("train", "parallel"), ("train", "cpu_offload")}
RESUMABLE_CHANGES |= {("train", "activation_checkpointing")}


def opt_state(t: dict) -> dict[int, dict]:
    """AdamW's state by parameter index, from the trainer state's `opt.<i>.<key>` entries."""
    state: dict[int, dict] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    return state


class Checkpointing:
    """Needs: model, opt, ema, tok, r (recipe), out, rank, world, device, and the counters."""

    # ---- state ---------------------------------------------------------------------------------
    def _opt_names(self) -> list[str]:
        """Each optimizer parameter's name, in the optimizer's order (how AdamW state is keyed)."""
        if self.sharded:  # FSDP leaves the root's parameters gathered after a forward: the shards
            self.model.reshard()  # (what the optimizer holds) go back on the module first
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for g in self.opt.param_groups for p in g["params"]]

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model.{n}": p.detach() for n, p in self.trainable()}
        t.update({f"ema.{n}": v for n, v in (self.ema or {}).items()})
        for i, st in self.opt.state_dict()["state"].items():
            for k, v in st.items():
                t[f"opt.{i}.{k}"] = torch.as_tensor(v)
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    def _load_state(self, ckpt: Path) -> None:
        meta_f, ten_f = ckpt / "trainer_state.json", ckpt / "trainer_state.safetensors"
        if (ckpt / SHARDED).is_dir():
            ten_f = ckpt / SHARDED
        for f in (meta_f, ten_f):
            if not f.exists():
                raise CheckpointError(f"cannot resume: missing {f}")
        meta = json.loads(meta_f.read_text())
        saved = meta["recipe"]
        now = self.r.to_dict()
        diff = [
            f"{s}.{k}"
            for s in now
            for k in set(now[s]) | set(saved.get(s, {}))
            if now[s].get(k) != saved.get(s, {}).get(k) and (s, k) not in RESUMABLE_CHANGES
        ]
        if diff:
            raise ConfigError(
                f"cannot resume: recipe differs from the checkpoint's in {', '.join(sorted(diff))}"
            )
        if ten_f.is_dir():
            self._load_sharded(ten_f)
        else:
            self._load_full(ten_f)
        self.start_step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.train_seconds, self.interval = meta["train_seconds"], tuple(meta["interval"])
        console.print(f"resumed from {ckpt} at step {self.start_step}")

    def _load_sharded(self, directory: Path) -> None:
        """Each process reads the parts of the shards it holds now (the whole tensors when the run
        is not sharded), however many processes wrote them."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        names = self._opt_names()
        views = sharding.state_views(self.model, self.opt, names, self.ema)
        try:
            dcp.load(views, checkpoint_id=str(directory), no_dist=not dist.is_initialized())
        except Exception as e:
            raise CheckpointError(f"corrupt or unreadable trainer state {directory}: {e}") from None
        weights = {n: views[f"model.{n}"] for n in names}
        sharding.restore(self.model, self.opt, weights, opt_state(views), names, full=False)

    def _load_full(self, ten_f: Path) -> None:
        try:
            t = load_file(str(ten_f))
        except Exception as e:
            raise CheckpointError(f"corrupt trainer state {ten_f}: {e}") from None
        state = {
            i: {k: v if k == "step" else v.to(self.device) for k, v in st.items()}
            for i, st in opt_state(t).items()
        }
        with torch.no_grad():
            if self.ema:
                for n, e in self.ema.items():
                    e.copy_(sharding.like(t[f"ema.{n}"], e))
            if self.sharded:  # every rank read the full state: each keeps its shard
                weights = {n: t[f"model.{n}"] for n, _ in self.trainable()}
                sharding.restore(self.model, self.opt, weights, state, self._opt_names(), full=True)
            else:
                for n, p in self.trainable():
                    p.copy_(t[f"model.{n}"])
        if not self.sharded:
            sd = self.opt.state_dict()
            sd["state"] = state
            self.opt.load_state_dict(sd)

    def _trim_metrics(self, step: int) -> None:
        f = self.out / "metrics.jsonl"
        if f.exists():
            keep = [ln for ln in f.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
            write_text_atomic(f, "".join(ln + "\n" for ln in keep))

    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the EMA weights in (for evaluation and export), then swap the raw ones back."""
        if not self.ema:
            yield
            return
        if self.sharded:  # FSDP keeps the root gathered after a forward: back to the shards first
            self.model.reshard()
        params = self.trainable()
        backup = {n: p.detach().clone() for n, p in params}
        with torch.no_grad():
            for n, p in params:
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            if self.sharded:  # a forward ran on the EMA weights: drop its gathered copies
                self.model.reshard()
            with torch.no_grad():
                for n, p in params:
                    p.copy_(backup[n])

    def save(self, step: int, metrics: dict | None = None) -> Path | None:
        """Write step-NNNNNNN atomically with a manifest of checksums, point `latest` at it once it
        verifies, and prune old checkpoints. Sharded runs write their shards from every process."""
        name = f"step-{step:07d}"
        try:
            if self.sharded:
                self._write_sharded(name, step, metrics)
            elif self.rank == 0:
                self._write_checkpoint(name, step, metrics)
        except CheckpointError as e:  # disk full...: say what is kept and how to go on from it
            last = self.out / "latest"
            kept = "no checkpoint yet"
            if last.exists():
                kept = f"{self.out / last.read_text().strip()} is intact"
            raise CheckpointError(f"{e}; {kept}; rerun with --resume once it can be written") from e
        if self.rank != 0:
            return None
        problem = verify(self.out / name)
        if problem:  # leave `latest` on the previous good one
            console.print(f"checkpoint {name} failed verification ({problem})", markup=False, soft_wrap=True)
        else:
            write_text_atomic(self.out / "latest", name + "\n")
        self._prune(None if problem else self.out / name)
        return self.out / name

    def _write_checkpoint(self, name: str, step: int, metrics: dict | None) -> None:
        with atomic_dir(self.out / name) as d:
            with self.ema_weights():
                if self.delta_info:  # the delta alone: the base is named by its checksum
                    save_delta(d, self.model, self.tok, self.delta_info)
                else:
                    save_model(d, self.model, self.tok)
            save_file(self._state_tensors(), str(d / "trainer_state.safetensors"))
            self._write_meta(d, step, metrics)

    def _write_sharded(self, name: str, step: int, metrics: dict | None) -> None:
        """Every process writes its shards into one temporary directory that rank 0 makes and names
        to the others; rank 0 adds the rest and renames it into place once all shards are written
        (DCP's save returns on every rank after its metadata is written). A process killed
        before that leaves a temporary directory that resuming removes: `latest` never moves."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        views = sharding.state_views(self.model, self.opt, self._opt_names(), self.ema)
        if self.rank != 0:
            where = [None]
            dist.broadcast_object_list(where, src=0)
            if where[0] is None:  # rank 0 could not make the directory (its error says why)
                raise CheckpointError(f"cannot write {self.out / name}: process 0 could not make it")
            dcp.save(views, checkpoint_id=where[0])
            return
        staged = contextlib.ExitStack()
        try:
            d = staged.enter_context(atomic_dir(self.out / name))
        except BaseException:  # (a full disk): the others wait for a path, they stop too
            dist.broadcast_object_list([None], src=0)
            raise
        with staged:
            dist.broadcast_object_list([str(d / SHARDED)], src=0)
            dcp.save(views, checkpoint_id=str(d / SHARDED))
            save_config(d, self.model, self.tok, self.delta_info or None)
            self._write_meta(d, step, metrics)

    def _write_meta(self, d: Path, step: int, metrics: dict | None) -> None:
        meta = {
            "step": step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "interval": list(self.interval),
            "world_size": self.world,
            "metrics": metrics or {},
            "recipe": self.r.to_dict(),
        }
        if self.r.data.corpus != "shakespeare":  # relative to the cwd: recorded as read
            meta["corpus_path"] = str(Path(self.r.data.corpus).resolve())
        (d / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n")
        (d / "recipe.yaml").write_text(yaml.safe_dump(self.r.to_dict(), sort_keys=False))
        write_manifest(d)

    def _checkpoints(self) -> list[Path]:
        return sorted(p for p in self.out.glob("step-*") if p.is_dir())

    def _prune(self, intact: Path | None) -> None:
        """Keep the newest `train.keep` checkpoints and, whatever `keep` says, the newest intact one
        (`intact`, or searched for): if the latest writes were damaged, the last good state must
        survive them."""
        ckpts = self._checkpoints()
        keep = set(ckpts[-self.r.train.keep :])
        good = intact or next((c for c in reversed(ckpts) if verify(c) is None), None)
        for old in ckpts:
            if old not in keep and old != good:
                shutil.rmtree(old, ignore_errors=True)

    def _resume_point(self) -> Path | None:
        """The newest intact step-* checkpoint (None if there is none), skipping corrupt ones with a
        message; also removes temp dirs that a killed write left behind. Checkpoints newer than
        `latest` count too: they were renamed into place complete, only the pointer update was lost."""
        latest = self.out / "latest"
        if latest.exists() and not latest.read_text().strip():
            raise CheckpointError(
                f"cannot resume: the `latest` file {latest} is empty (it should name a step-* "
                "checkpoint); write the name of an intact checkpoint into it or delete it"
            )
        if self.rank == 0:
            for junk in sorted([*self.out.glob(".step-*.tmp*"), *self.out.glob(".step-*.old")]):
                shutil.rmtree(junk, ignore_errors=True)
                console.print(f"removed {junk} (left by an interrupted write)", markup=False, soft_wrap=True)
        corrupt: list[tuple[Path, str]] = []
        found = None
        for c in reversed(self._checkpoints()):
            if (problem := verify(c)) is None:
                found = c
                break
            corrupt.append((c, problem))
        if corrupt and found is None:
            raise CheckpointError(
                f"cannot resume: every checkpoint in {self.out} is corrupt "
                f"({'; '.join(f'{c.name}: {p}' for c, p in corrupt)})"
            )
        if self.rank == 0:
            for c, problem in corrupt:
                console.print(
                    f"checkpoint {c.name} is corrupt ({problem}); resuming from {found.name}",
                    markup=False,
                    soft_wrap=True,
                )
        return found
