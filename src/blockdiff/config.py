"""Model configuration, stored as a Hugging Face-style `config.json`.

The Llama fields keep their Hugging Face names so that Llama-family checkpoints load by name;
the diffusion fields (block size, logit convention, mask token, attention layout) live beside
them and are read only through this class.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOGIT_CONVENTIONS = ("aligned", "shifted")
LAYOUTS = ("block_causal", "context_causal")


class BlockdiffError(Exception):
    """Every expected failure (bad input, missing or corrupt files, no network): the CLI prints
    its message as one line and exits 2."""


def cache_dir() -> Path:
    """Where blockdiff keeps what it downloads, imports and compiles (`BLOCKDIFF_CACHE`)."""
    d = Path(os.environ.get("BLOCKDIFF_CACHE", Path.home() / ".cache" / "blockdiff"))
    d.mkdir(parents=True, exist_ok=True)
    return d


class ConfigError(BlockdiffError, ValueError):
    """A configuration that cannot be used; the message says what to change."""


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_rate(v: object) -> bool:
    return _is_float(v) and 0 <= v <= 1


def did_you_mean(name: object, known) -> str:
    """The tail of an error message: ` (did you mean 'x'?)` for the closest known name, else ''."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(given: dict, allowed: list[str] | tuple[str, ...], where: str) -> None:
    """Reject unknown keys, naming the closest known one."""
    for key in given:
        if key not in allowed:
            raise ConfigError(
                f"unknown {where} key '{key}'{did_you_mean(key, allowed)}; known keys: {', '.join(allowed)}"
            )


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    # diffusion fields
    block_size: int = 16
    block_sizes: list[int] = field(default_factory=list)  # mix-scale training set (empty: just block_size)
    logits: str = "aligned"  # aligned: output i predicts token i; shifted: output i-1 predicts token i
    layout: str = "block_causal"  # clean context block-causal (BD3-LM) or causal (NBDiff)
    train_seq_len: int | None = None  # sequence length trained on: block size == it is the global block
    ar_weight: float | None = None  # lambda of the AR loss it was trained with (None: not recorded)
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    # per sampler, option defaults measured to suit this model (e.g. NBDiff: bd3 in confidence
    # order, greedy); a caller's own options win (decoding.samplers.build_plan)
    sampler_defaults: dict = field(default_factory=dict)
    # per sampler, a one-line warning its model card measured (e.g. "poor text on this model")
    sampler_notes: dict = field(default_factory=dict)
    # how often greedy spec's draft i is accepted once drafts 1..i-1 were, measured on chat
    # prompts (benchmarks/spec_acceptance.py --split train): the prior of spec's draft length
    draft_acceptance: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        width, heads = self.hidden_size, self.num_attention_heads
        if self.head_dim is None and isinstance(width, int) and isinstance(heads, int) and heads > 0:
            self.head_dim = width // heads
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # a hand-edited config.json: each field's type by name
            v, kind = getattr(self, f.name), str(f.type)
            ok = (
                (v is None and "None" in kind)
                or (kind.startswith("int") and _is_int(v))
                or (kind.startswith("float") and _is_float(v))
                or (kind.startswith("bool") and isinstance(v, bool))
                or (kind.startswith("str") and isinstance(v, str))
                or (kind == "list[int]" and isinstance(v, list) and all(_is_int(x) for x in v))
                or (kind == "list[float]" and isinstance(v, list) and all(_is_rate(x) for x in v))
                or (
                    kind == "dict"
                    and isinstance(v, dict)
                    and all(isinstance(x, dict | str) for x in v.values())
                )
            )
            if not ok:
                raise ConfigError(f"config field {f.name} must be {kind.replace(' | None', '')}, got {v!r}")
        for name, kind in (("sampler_defaults", dict), ("sampler_notes", str)):
            if not all(isinstance(x, kind) for x in getattr(self, name).values()):
                raise ConfigError(f"config field {name} maps sampler names to {kind.__name__}s")
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        if self.logits not in LOGIT_CONVENTIONS:
            raise ConfigError(f"logits must be one of {LOGIT_CONVENTIONS}, got '{self.logits}'")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got '{self.layout}'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def shifted(self) -> bool:
        return self.logits == "shifted"

    @property
    def trained_block_sizes(self) -> list[int]:
        return self.block_sizes or [self.block_size]

    @property
    def has_global_block(self) -> bool:
        """Was the model trained with the global block (full attention over its training rows)?"""
        seq_len = self.train_seq_len or self.max_position_embeddings
        return any(b >= seq_len for b in self.trained_block_sizes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        d = dict(d)
        extra = d.pop("blockdiff", {})  # diffusion fields are nested when saved
        d.update(extra)
        # Hugging Face configs carry many keys we do not use; keep only ours.
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_user(cls, d: dict[str, Any]) -> ModelConfig:
        """From a user-written config: unknown keys are errors, not silently dropped."""
        check_keys(d, [f.name for f in dataclasses.fields(cls)], "model")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        diff_keys = ["block_size", "block_sizes", "logits", "layout", "train_seq_len", "ar_weight"]
        measured = ["sampler_defaults", "sampler_notes", "draft_acceptance"]  # written when there
        diff_keys += measured
        out = {k: v for k, v in d.items() if k not in diff_keys}
        out.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu")
        out["blockdiff"] = {k: d[k] for k in diff_keys if k not in measured or d[k]}
        return out

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
