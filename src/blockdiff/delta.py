"""Low-rank deltas (LoRA) over a frozen base: an NBDiff adaptation that ships in megabytes.

A few lines of our own rather than `peft`: no `transformers` at inference, the parameter names
stay blockdiff's, and the merge is plain arithmetic that the tests check against the unmerged
forward. What is trained: a rank-r pair (A, B) on each chosen projection of every block, and the
embedding row of the mask token (the base has never seen that token), and optionally the RMSNorm
gains (`norms`: 0.05 % of the weights, stored whole). Everything else is the base, bit for bit;
the delta names the base by a checksum of its weights.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import ConfigError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DeltaSpec:
    """rank 0 = full fine-tuning (no delta)."""

    rank: int = 0
    alpha: float = 0.0  # scale = alpha / rank; 0 means alpha = 2 * rank
    targets: list = field(default_factory=lambda: list(TARGETS))
    norms: bool = False  # also train every RMSNorm gain (stored whole: 576 numbers per norm)

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"delta.rank must be >= 0 (0 = full fine-tuning), got {self.rank}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"delta.targets must be a non-empty subset of {', '.join(TARGETS)}, got {bad}")

    @property
    def scale(self) -> float:
        return (self.alpha or 2.0 * self.rank) / self.rank

    def as_dict(self) -> dict:
        return {
            "kind": "lora",
            "rank": self.rank,
            "alpha": self.alpha or 2.0 * self.rank,
            "targets": self.targets,
            "norms": self.norms,
        }


def parse(spec: str) -> DeltaSpec:
    """'lora:RANK' (the CLI form)."""
    kind, _, rank = spec.partition(":")
    if kind != "lora" or not rank.lstrip("-").isdigit():
        raise ConfigError(f"--delta must look like lora:RANK (e.g. lora:16), got '{spec}'")
    if int(rank) <= 0:
        raise ConfigError(f"--delta rank must be >= 1, got {rank}")
    return DeltaSpec(rank=int(rank))


class LoRALinear(nn.Module):
    """y = W x + scale · B A x, with W frozen; B starts at zero so training starts at the base."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        base.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return (
            self.base(x)
            + nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B) * self.scale
        )

    @classmethod
    def of(cls, base: nn.Linear, a: Tensor, b: Tensor) -> LoRALinear:
        """Given factors (scale 1, frozen): no random initialisation to throw away."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.base, m.scale = base, 1.0
        m.lora_A, m.lora_B = nn.Parameter(a, requires_grad=False), nn.Parameter(b, requires_grad=False)
        return m

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w = self.base.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())
            self.base.weight.copy_(w.to(self.base.weight.dtype))
        return self.base


class EmbeddingRows(nn.Module):
    """A frozen embedding with a few trainable rows (the mask token's)."""

    def __init__(self, base: nn.Embedding, ids: list[int]):
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(base.weight.detach()[self.ids].clone())
        base.weight.requires_grad_(False)

    @property
    def weight(self) -> Tensor:  # the model reads the table through here (tied LM head)
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        for j, i in enumerate(self.ids.tolist()):
            out = torch.where((x == i)[..., None], self.rows[j].to(out.dtype), out)
        return out

    def merged(self) -> nn.Embedding:
        with torch.no_grad():
            self.base.weight[self.ids] = self.rows.to(self.base.weight.dtype)
        return self.base


def base_checksum(model: nn.Module) -> str:
    """sha256 of the weights (name, dtype, shape, bytes) of a model with no delta attached."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def attach(model: nn.Module, spec: DeltaSpec) -> None:
    """Freeze the model and add the trainable delta in place."""
    spec.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in spec.targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), spec.rank, spec.scale))
    if spec.norms:
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.requires_grad_(True)
    mask_id = model.config.mask_token_id
    if mask_id is not None:
        model.model.embed_tokens = EmbeddingRows(model.model.embed_tokens, [mask_id])


def attached(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear | EmbeddingRows) for m in model.modules())


def delta_state(model: nn.Module) -> dict[str, Tensor]:
    """The delta's tensors only (what a delta checkpoint stores)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_delta_state(model: nn.Module, sd: dict[str, Tensor]) -> None:
    own = dict(model.named_parameters())
    want = {n for n, p in own.items() if p.requires_grad}
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or unexpected:
        raise ConfigError(
            f"delta does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for n, t in sd.items():
            if own[n].shape != t.shape:
                raise ConfigError(
                    f"delta tensor {n} has shape {tuple(t.shape)}, the model wants {tuple(own[n].shape)}"
                )
            own[n].copy_(t.to(own[n].dtype))


def stack(model: nn.Module, spec: DeltaSpec, sd: dict[str, Tensor]) -> None:
    """A second delta over a model whose first delta is attached, unmerged (a delta over a delta),
    kept unmerged so the base stays on its 4-bit grid: per projection one LoRA of the summed
    rank (the pairs concatenated, each scale folded into its B); the mask row and, with `norms`,
    the norm gains take the second delta's values (they are whole values, not increments)."""
    used: set[str] = set()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for pname in ("self_attn", "mlp"):
                parent = getattr(layer, pname)
                for name in spec.targets:
                    key = f"model.layers.{i}.{pname}.{name}"
                    if not hasattr(parent, name) or key + ".lora_A" not in sd:
                        continue
                    used |= {key + ".lora_A", key + ".lora_B"}
                    a, b = sd[key + ".lora_A"].float(), sd[key + ".lora_B"].float() * spec.scale
                    m = getattr(parent, name)
                    if isinstance(m, LoRALinear):
                        a, b = torch.cat([m.lora_A.float(), a]), torch.cat([m.lora_B.float() * m.scale, b], 1)
                        m = m.base
                    setattr(parent, name, LoRALinear.of(m, a, b))
        if "model.embed_tokens.rows" in sd:
            emb = model.model.embed_tokens
            if not isinstance(emb, EmbeddingRows):
                emb = model.model.embed_tokens = EmbeddingRows(emb, [model.config.mask_token_id])
            emb.rows.copy_(sd["model.embed_tokens.rows"])
            used.add("model.embed_tokens.rows")
        for n, p in model.named_parameters():
            if n in sd and n.endswith("norm.weight"):
                p.copy_(sd[n])
                used.add(n)
    if set(sd) - used:
        raise ConfigError(f"delta does not fit this model: unexpected {sorted(set(sd) - used)[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)


def merge(model: nn.Module) -> None:
    """Fold the delta into plain weights: decoding then costs exactly what the base costs."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, m in list(parent.named_children()):
                if isinstance(m, LoRALinear):
                    setattr(parent, name, m.merged())
    if isinstance(model.model.embed_tokens, EmbeddingRows):
        model.model.embed_tokens = model.model.embed_tokens.merged()
    for p in model.parameters():
        p.requires_grad_(False)
