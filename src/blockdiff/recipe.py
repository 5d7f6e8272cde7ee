"""Training recipes: YAML files with sections model / tokenizer / data / objective / train.

Every key is checked (an unknown key names its closest match) and `--set a.b=value` overrides
are parsed as YAML scalars, so `--set train.steps=10` gives an int.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, ModelConfig, check_keys
from .delta import DeltaSpec


@dataclass
class TokenizerSpec:
    kind: str = "bpe"  # bpe (trained on the corpus) | byte | a path to a tokenizer.json / dir
    vocab_size: int = 4096


@dataclass
class DataSpec:
    corpus: str = "shakespeare"
    seq_len: int = 256
    val_fraction: float = 0.05
    # prompt/answer rows: what fills a row after the answer's EOS. eos: EOS, predicted like the
    # answer (LLaDA's SFT); mask: mask tokens, never scored (the loss sees the answer and its EOS).
    pad: str = "eos"


@dataclass
class ObjectiveSpec:
    # Block sizes drawn per sequence; "L" means the whole sequence. [1] + shifted logits = AR,
    # ["L"] = MDLM, [B] = BD3-LM, [4, "L"] = mix-scale.
    block_sizes: list = field(default_factory=lambda: [16])
    weights: list | None = None  # sampling weights of block_sizes (default uniform)
    interval: list = field(default_factory=lambda: [0.0, 1.0])  # clipped [beta, omega] for training t
    antithetic: bool = True
    adaptive_interval: bool = False  # pick [beta, omega] by minimum loss variance at each eval
    ar_weight: float = 0.0  # lambda of the NBDiff auxiliary AR loss
    growth: list | None = None  # [[progress, block_size], ...]: block size grows with progress (NBDiff)
    # [alpha, gamma]: MGDM token reweighting of the diffusion term, alpha * (1 - e^-CE)^gamma * CE
    token_weight: list | None = None
    time_weight: str = "elbo"  # elbo (1/t: the NLL bound) | linear (1 + 20 (1 - t): MGDM's scripts)
    # share of the diffusion term whose target is the AR path's own distribution (self-distilled
    # drafter for spec; needs ar_weight > 0) instead of the data token
    distill: float = 0.0


@dataclass
class TrainSpec:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    ema: float = 0.0  # EMA decay of the weights that are saved for inference (0 = off)
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 200
    log_every: int = 10
    keep: int = 2
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    threads: int = 0  # torch threads (0 = PyTorch's default)
    accumulate: int = 1  # micro-batches per step and process (the same step in less memory)
    parallel: str = "ddp"  # ddp (a full copy per process) | fsdp (FSDP2: parameters, grads, AdamW sharded)
    activation_checkpointing: bool = False  # fsdp: recompute each decoder layer in the backward
    cpu_offload: bool = False  # fsdp on GPUs: sharded parameters, grads and AdamW state in CPU memory


# What a recipe may change on a pretrained base model; positions are rotary (no learned table), so
# the context may grow by fine-tuning on longer rows.
BASE_OVERRIDABLE = {"logits", "layout", "max_position_embeddings"}

SECTIONS = {
    "model": ModelConfig,
    "tokenizer": TokenizerSpec,
    "data": DataSpec,
    "objective": ObjectiveSpec,
    "train": TrainSpec,
    "delta": DeltaSpec,  # a low-rank delta over a frozen base (model.base) instead of full fine-tuning
}


@dataclass
class Recipe:
    model: dict
    tokenizer: TokenizerSpec
    data: DataSpec
    objective: ObjectiveSpec
    train: TrainSpec
    delta: DeltaSpec = field(default_factory=DeltaSpec)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": copy.deepcopy(self.model),
            **{k: asdict(getattr(self, k)) for k in ("tokenizer", "data", "objective", "train")},
        }
        if self.delta.rank:  # recipes without a delta read (and resume) as before the section existed
            out["delta"] = asdict(self.delta)
        return out

    def delta_dict(self) -> dict:
        return self.delta.as_dict()

    def block_sizes(self) -> list[int]:
        L = self.data.seq_len
        return [L if str(b).upper() == "L" else int(b) for b in self.objective.block_sizes]


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(d: dict, sets: list[str]) -> dict:
    d = copy.deepcopy(d)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set key must be section.key (e.g. train.steps), got '{key}'")
        d.setdefault(parts[0], {})[parts[1]] = _parse_value(value)
    return d


def from_dict(d: dict) -> Recipe:
    check_keys(d, list(SECTIONS), "recipe section")
    d = {k: dict(d.get(k) or {}) for k in SECTIONS}
    check_keys(d["model"], [f.name for f in fields(ModelConfig)] + ["base"], "model")
    if d["model"].get("base"):
        arch = sorted(set(d["model"]) - BASE_OVERRIDABLE - {"base"})
        if arch:
            raise ConfigError(
                f"model.{arch[0]} comes from model.base and cannot be set; "
                f"settable: {', '.join(sorted(BASE_OVERRIDABLE))}"
            )
    out = {"model": d["model"]}
    for name in ("tokenizer", "data", "objective", "train", "delta"):
        cls = SECTIONS[name]
        check_keys(d[name], [f.name for f in fields(cls)], name)
        out[name] = cls(**{k: _scalar(name, cls, k, v) for k, v in d[name].items()})
    r = Recipe(**out)
    validate(r)
    return r


def _scalar(section: str, cls: type, key: str, value: Any) -> Any:
    """Check a number/bool key against its default's type. YAML reads `1e-3` (no dot) as a string."""
    default = cls.__dataclass_fields__[key].default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key} must be true or false, got {value!r}")
        return value
    if not isinstance(default, int | float):
        return value
    try:
        num = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        num = None
    if num is None or (isinstance(default, int) and num != int(num)):
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ConfigError(f"{section}.{key} must be {kind}, got {value!r}")
    return int(num) if isinstance(default, int) else num


TIME_WEIGHTS = ("elbo", "linear")


def validate(r: Recipe) -> None:
    L = r.data.seq_len
    for B in r.block_sizes():
        if B < 1 or L % B:
            raise ConfigError(f"block_size {B} does not divide seq_len {L}")
    if r.objective.weights is not None and len(r.objective.weights) != len(r.objective.block_sizes):
        raise ConfigError("objective.weights must have one entry per objective.block_sizes entry")
    lo, hi = r.objective.interval
    if not 0 <= lo < hi <= 1:
        raise ConfigError(
            f"objective.interval must satisfy 0 <= beta < omega <= 1, got {r.objective.interval}"
        )
    tw = r.objective.token_weight
    if tw is not None and not (
        isinstance(tw, list)
        and len(tw) == 2
        and all(isinstance(x, int | float) and x >= 0 for x in tw)
        and tw[0] > 0
    ):
        raise ConfigError(f"objective.token_weight must be [alpha > 0, gamma >= 0], got {tw}")
    aw = r.objective.ar_weight
    if isinstance(aw, bool) or not isinstance(aw, int | float) or not math.isfinite(aw) or aw < 0:
        raise ConfigError(f"objective.ar_weight (--ar-loss-weight) must be a number >= 0, got {aw!r}")
    dw = r.objective.distill
    if isinstance(dw, bool) or not isinstance(dw, int | float) or not 0 <= dw <= 1:
        raise ConfigError(f"objective.distill must be a number in [0, 1], got {dw!r}")
    if dw and not aw:
        raise ConfigError("objective.distill teaches with the AR path: it needs objective.ar_weight > 0")
    if r.objective.time_weight not in TIME_WEIGHTS:
        raise ConfigError(
            f"objective.time_weight must be one of {', '.join(TIME_WEIGHTS)}, got '{r.objective.time_weight}'"
        )
    if r.data.pad not in ("eos", "mask"):
        raise ConfigError(f"data.pad must be eos or mask, got '{r.data.pad}'")
    if r.train.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be fp32 or bf16, got '{r.train.precision}'")
    if not isinstance(r.train.accumulate, int) or r.train.accumulate < 1:
        raise ConfigError(f"train.accumulate must be an integer >= 1, got {r.train.accumulate!r}")
    if r.train.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel must be ddp or fsdp, got '{r.train.parallel}'")
    if r.train.batch_size < 1 or r.train.steps < 1:
        raise ConfigError("train.batch_size and train.steps must be >= 1")
    r.delta.validate()
    if r.delta.rank and not r.model.get("base"):
        raise ConfigError("delta.rank > 0 needs model.base: a delta is trained over a pretrained model")
    for _, B in r.objective.growth or []:
        if L % int(B):
            raise ConfigError(f"growth block_size {B} does not divide seq_len {L}")


def load(path: str | Path, sets: list[str] | None = None) -> Recipe:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"recipe {p} does not exist")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML: {e}") from None
    return from_dict(apply_overrides(d, sets or []))


# ---- the NBDiff recipe of `blockdiff adapt` ------------------------------------------------------
ADAPT_YAML = "nbdiff-smollm2.yaml"  # in assets/recipes; recipes/nbdiff-smollm2.yaml links to it
SCALED_WITH_STEPS = ("warmup", "eval_every", "save_every", "log_every")


def adapt_defaults() -> dict:
    """The NBDiff adaptation recipe shipped in the package: the one source of `adapt`'s defaults."""
    from importlib import resources

    return yaml.safe_load((resources.files("blockdiff") / "assets" / "recipes" / ADAPT_YAML).read_text())


def growth_schedule(spec: str, target: int, until: float = 0.5) -> list | None:
    """'none', 'linear' (1, 2, 4, ... target spread evenly over the first half of training) or
    explicit 'progress:block,...' pairs such as '0:1,0.2:2,0.4:4'."""
    if spec == "none":
        return None
    if spec == "linear":
        sizes = [1]
        while sizes[-1] * 2 <= target:
            sizes.append(sizes[-1] * 2)
        if sizes[-1] != target:
            sizes.append(target)
        return [
            [round(until * i / (len(sizes) - 1), 4) if len(sizes) > 1 else 0.0, b]
            for i, b in enumerate(sizes)
        ]
    try:
        return [[float(p), int(b)] for p, b in (item.split(":") for item in spec.split(","))]
    except ValueError:
        raise ConfigError(f"--growth must be none, linear or 'progress:block,...', got '{spec}'") from None


def adapt_recipe(
    base: str | None = None,
    data: str | None = None,
    target_block_size: int | None = None,
    ar_loss_weight: float | None = None,
    growth: str = "linear",
    delta: str | None = None,
    mix_scale: bool = False,
    seq_len: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    precision: str | None = None,
    sets: list[str] | None = None,
) -> Recipe:
    """NBDiff (context-causal layout, shifted logits, AR-loss regulariser, gradual block growth):
    the shipped recipe (`adapt_defaults`) with the given values in place of its own (None keeps
    the recipe's). With another number of steps, the recipe's step counts (SCALED_WITH_STEPS)
    scale in proportion; save_every stays >= min(steps, 100), since a full checkpoint is GBs.
    `sets` (--set KEY=VALUE) apply last."""
    from .delta import parse as parse_delta

    d = adapt_defaults()
    given = {
        "model.base": base,
        "data.corpus": data,
        "data.seq_len": seq_len,
        "objective.ar_weight": ar_loss_weight,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "train.precision": precision,
    }
    for key, value in given.items():
        if value is not None:
            section, name = key.split(".")
            d[section][name] = value
    obj, train = d["objective"], d["train"]
    B = target_block_size if target_block_size is not None else int(obj["block_sizes"][0])
    obj["block_sizes"] = [B, "L"] if mix_scale else [B]
    obj["growth"] = growth_schedule(growth, B)
    if steps is not None and steps != train["steps"]:
        for key in SCALED_WITH_STEPS:
            train[key] = max(1, round(train[key] * steps / train["steps"]))
        train["steps"] = steps
    train["save_every"] = max(train["save_every"], min(train["steps"], 100))
    if delta:
        d["delta"] = vars(parse_delta(delta))
    return from_dict(apply_overrides(d, sets or []))
