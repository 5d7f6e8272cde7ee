"""`blockdiff train | adapt | import | info | export`: models in and out of training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..checkpoint import read_trainer_meta, resolve
from ..models import load_model, path_of
from ..recipe import adapt_defaults


def cmd_train(a: argparse.Namespace) -> int:
    from ..train import train

    last = train(a.config, a.out, a.resume, a.set or [])
    if last is not None:
        print(f"checkpoint: {last}")
    return 0


def cmd_adapt(a: argparse.Namespace) -> int:
    """NBDiff: context-causal layout, shifted logits, AR-loss regulariser, gradual block growth."""
    from ..recipe import adapt_recipe
    from ..train import Trainer

    names = ("base", "data", "target_block_size", "ar_loss_weight", "growth", "delta", "mix_scale")
    names += ("seq_len", "steps", "batch_size", "lr", "precision", "set")
    r = adapt_recipe(**{n if n != "set" else "sets": getattr(a, n) for n in names})
    base, B = Path(str(r.model["base"])).name, r.block_sizes()[0]
    last = Trainer(r, Path(a.out or f"runs/adapt-{base}-B{B}"), a.resume).run()
    if last is not None:
        print(f"checkpoint: {last}")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    from ..hub import import_checkpoint

    import_checkpoint(a.base, a.out, getattr(torch, a.dtype))
    print(f"imported {a.base} -> {a.out}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    p = resolve(path_of(a.path))  # a model name or a checkpoint or run directory
    model, tok = load_model(p, None)
    cfg, meta = model.config, read_trainer_meta(p)
    card = p / "model_card.json"
    if card.exists():
        meta = {**json.loads(card.read_text()), **meta}
    info = {
        "path": str(p),
        "architecture": (
            f"Llama-style: {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size}"
        ),
        "parameters": model.num_parameters(),
        "block_size": cfg.block_size,
        "block_sizes": cfg.block_sizes or [cfg.block_size],
        "logits": cfg.logits,
        "layout": cfg.layout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "training_tokens": meta.get("tokens_seen"),
        "train_seconds": meta.get("train_seconds"),
        "val_nll_bound": {k: v for k, v in (meta.get("metrics") or {}).items() if k.startswith("val_nll")}
        or None,
    }
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>24}: {v}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from ..export import export

    export(a.run, a.out, dtype=a.dtype, force=a.force)
    print(f"exported {resolve(a.run)} -> {a.out}")
    return 0


def add(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("config")
    t.add_argument("--out")
    t.add_argument("--resume", action="store_true")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. train.steps=10"
    )
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    e = sub.add_parser(
        "export", help="copy a run's newest checkpoint for inference (weights only, model card)"
    )
    e.add_argument("run")
    e.add_argument("out")
    e.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    e.add_argument("--force", action="store_true", help="replace OUT if it already exists")
    e.set_defaults(fn=cmd_export)

    ad = sub.add_parser(
        "adapt",
        help="turn a pretrained AR model into a block-diffusion model (NBDiff)",
        description="NBDiff adaptation. Defaults (shown in brackets) come from the shipped recipe "
        "recipes/nbdiff-smollm2.yaml; with another --steps its warm-up, eval, save and log intervals "
        "scale in proportion.",
    )
    d = adapt_defaults()
    dflt = {k: v for s in ("model", "data", "objective", "train") for k, v in d[s].items()}
    ad.add_argument("--base", help=f"a known name, a path or an HF id [{dflt['base']}]")
    ad.add_argument("--data", help=f"corpus: shakespeare, a text file or folder, a .jsonl [{dflt['corpus']}]")
    ad.add_argument(
        "--target-block-size", type=int, dest="target_block_size", help=f"[{dflt['block_sizes'][0]}]"
    )
    ad.add_argument("--ar-loss-weight", type=float, dest="ar_loss_weight", help=f"[{dflt['ar_weight']}]")
    ad.add_argument("--growth", default="linear", help="none | linear | 'progress:block,...' [linear]")
    ad.add_argument("--delta", help="lora:RANK trains a low-rank delta over the frozen base")
    ad.add_argument("--mix-scale", action="store_true", dest="mix_scale", help="also train the global block")
    ad.add_argument("--seq-len", type=int, dest="seq_len", help=f"[{dflt['seq_len']}]")
    ad.add_argument("--steps", type=int, help=f"[{dflt['steps']}]")
    ad.add_argument("--batch-size", type=int, dest="batch_size", help=f"[{dflt['batch_size']}]")
    ad.add_argument("--lr", type=float, help=f"[{dflt['lr']}]")
    ad.add_argument("--precision", choices=["fp32", "bf16"], help=f"[{dflt['precision']}]")
    ad.add_argument("--out")
    ad.add_argument("--resume", action="store_true")
    ad.add_argument("--set", action="append", metavar="KEY=VALUE")
    ad.set_defaults(fn=cmd_adapt)

    im = sub.add_parser("import", help="convert a Llama-family causal LM into a blockdiff checkpoint")
    im.add_argument("base", help="smollm2-135m-instruct, a .gguf file, a local directory or an HF id")
    im.add_argument("out")
    im.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    im.set_defaults(fn=cmd_import)
