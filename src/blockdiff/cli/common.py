"""What the decoding commands share: their options, their sampler options, one way to load."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import ConfigError
from ..decoding import DEFAULT_SAMPLER, DecodeSpec
from ..decoding.samplers import SAMPLERS
from ..models import load_model
from ..runtime import PRECISIONS


def sampler_kwargs(a: argparse.Namespace) -> dict:
    names = ("block_size", "steps", "threshold", "temperature", "top_p", "top_k", "seed")
    names += ("draft_len", "draft_width")
    kw = {k: getattr(a, k) for k in names if getattr(a, k, None) is not None}
    if getattr(a, "regex", None) is not None:
        kw["regex"] = a.regex
    if getattr(a, "json_schema", None) is not None:
        kw["json_schema"] = schema_arg(a.json_schema)
    if getattr(a, "grammar", None) is not None:
        kw["grammar"] = grammar_arg(a.grammar)
    if getattr(a, "no_cache", False):
        kw["cache"] = "none"
    elif getattr(a, "cache", None):
        kw["cache"] = a.cache
    return kw


def schema_arg(arg: str) -> str:
    """--json-schema: JSON text as it is, else a schema file's text (checked where it is used)."""
    if arg.lstrip().startswith("{"):
        return arg
    if not Path(arg).is_file():
        raise ConfigError(f"--json-schema {arg!r}: no such file, and not JSON text")
    return Path(arg).read_text()


def grammar_arg(arg: str) -> str:
    """--grammar: a grammar file's text, else the argument itself (a grammar)."""
    try:
        return Path(arg).read_text() if "\n" not in arg and Path(arg).is_file() else arg
    except OSError:  # a long inline grammar is no file name
        return arg


def decode_spec(a: argparse.Namespace, model, max_new_tokens: int | None, **defaults) -> DecodeSpec:
    """The command's decode request, checked once against the model before any decoding
    (`max_new_tokens=None`: the feature decides the length; `defaults` where the user is silent)."""
    kw = {**defaults, **sampler_kwargs(a)}
    seed = kw.pop("seed", 0)
    return DecodeSpec.build(model, a.sampler, max_new_tokens, seed, **kw)


def decode_args(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--model",
        help="model name (smollm2-nbdiff, shakespeare-5m, smollm2-135m-instruct) or checkpoint/run dir",
    )
    g.add_argument("--sampler", default=DEFAULT_SAMPLER, help="one of " + ", ".join(SAMPLERS))
    g.add_argument("--block-size", type=int, dest="block_size")
    g.add_argument("--steps", type=int)
    g.add_argument("--threshold", type=float)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float, dest="top_p")
    g.add_argument("--top-k", type=int, dest="top_k")
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--draft-len", type=int, dest="draft_len",
        help="spec: tokens drafted per forward (default: as many as pay on this runtime, per answer)",
    )  # fmt: skip
    g.add_argument(
        "--draft-width", type=int, dest="draft_width",
        help="spec: candidates for the first drafted token, a token tree (default: as many as pay)",
    )  # fmt: skip
    g.add_argument("--cache", choices=["none", "prefix", "dual", "exact"])
    g.add_argument("--no-cache", action="store_true", dest="no_cache")
    g.add_argument("--json", action="store_true")
    add_precision(g)


def load(a: argparse.Namespace, path):
    """A model for one of the decoding commands, in their --dtype on their --device."""
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise ConfigError(f"unknown --device '{a.device}' (cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {a.device}: this machine has no CUDA device")
    return load_model(path, a.dtype, device)


def add_precision(g) -> None:
    g.add_argument(
        "--dtype",
        default="auto",
        choices=PRECISIONS,
        help="weights for inference: auto = int4 where the weights are on a 4-bit grid (exact: "
        "SmolLM2 and deltas over it), else float32; int8 = weight-only, lossy (README: Precision)",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (int4/int8 are CPU kernels)")
