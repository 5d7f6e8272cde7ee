"""The inference runtime, built once at load: fused projections and weights per precision.

q|k|v become one projection and gate|up another (two matrix products per layer fewer, and one
RoPE call for q and k together); each fused projection is stored as the precision asks:

* float32 / bfloat16 — one dense matrix (a delta merged into it);
* int8  — per-output-channel int8, any weights (lossy: `quant.Int8Linear`);
* int4  — the weights' own 4-bit grid (exact for SmolLM2's Q4_1 base, `quant.Int4Linear`), a
  delta unmerged beside it, for forwards over a cache of up to `quant.NARROW_ROWS` tokens per
  sequence; a bfloat16 copy for the others, where the dense GEMM is cheaper (`quant.ByWidth`,
  `quant.WidthSwitch`). Refused for weights on no grid;
* auto  — on a CPU, int4 where it is exact, float32 otherwise (the default: never rounds a
  stored weight; activations are bfloat16 in int4); float32 on other devices.

Every RMSNorm becomes `FastRMSNorm` (one fused kernel instead of eight small operations), and the
decoder layers run as one plain loop (`FusedLayers`). Training never sees this: it works on the
unfused modules that checkpoints name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError
from .delta import EmbeddingRows, LoRALinear
from .model import KVCache, RMSNorm, SplitMask, apply_rope
from .quant import ByWidth, Int4Linear, Int8Linear, NotOnGrid, WidthSwitch

PRECISIONS = ("auto", "float32", "bfloat16", "int8", "int4")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    return precision


class FastRMSNorm(nn.Module):
    """RMSNorm through one LayerNorm over [x, -x]: that vector's mean is 0 and its variance is
    mean(x²), so its first half is x / sqrt(mean(x²) + eps). torch's CPU RMSNorm is a chain of
    ~8 small operations: 20 µs for one 576-wide token against 14 (benchmarks/norm_rope.py), and
    a step runs 61 norms. The gain multiplies after the rounding to the activation dtype, as in `RMSNorm`: the
    gain inside the kernel (one rounding) moved bfloat16 logits further from float32's (measured,
    docs/decisions.md)."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.eps = norm.eps

    def forward(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        return self.weight * F.layer_norm(torch.cat([x, -x], -1), (2 * d,), eps=self.eps)[..., :d]


class FusedLayers:
    """A prepared model's decoder layers as one loop over their fused projections, calling each
    module's `forward` directly: a one-token step of SmolLM2 made ~400 module calls (dispatch,
    hooks, attribute lookups), 17-20 % of its time (BENCHMARKS.md). The same operations in the
    same order as the modules would run, so the same logits (tested). Inference only: training
    runs the modules (their hooks, the split training mask)."""

    def __init__(self, model):
        cfg = model.config
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layers = [
            (l.input_layernorm.forward, l.self_attn.qkv_proj.forward, l.self_attn.o_proj.forward,
             l.post_attention_layernorm.forward, l.mlp.gate_up_proj.forward, l.mlp.down_proj.forward)
            for l in model.model.layers
        ]  # fmt: skip

    def __call__(self, x: Tensor, cos, sin, mask, cache: KVCache | None, write) -> Tensor:
        if isinstance(mask, SplitMask):
            raise ValueError("the split training mask runs on the training modules, not a prepared model")
        b, q, _ = x.shape
        nh, nkv, gqa = self.nh, self.nkv, self.nh != self.nkv
        for i, (norm1, qkv, o, norm2, gate_up, down) in enumerate(self.layers):
            h = qkv(norm1(x)).view(b, q, nh + 2 * nkv, self.hd).transpose(1, 2)
            qk = apply_rope(h[:, : nh + nkv], cos, sin)  # one RoPE call rotates q and k together
            k, v = qk[:, nh:], h[:, nh + nkv :]
            if cache is not None:
                k, v = cache.update(i, k, v, write)
            a = F.scaled_dot_product_attention(qk[:, :nh], k, v, attn_mask=mask, enable_gqa=gqa)
            x = x + o(a.transpose(1, 2).reshape(b, q, -1))
            gate, up = gate_up(norm2(x)).chunk(2, dim=-1)
            x = x + down(F.silu(gate) * up)
        return x


def _parts(mods: list[nn.Module]) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Weights [sum N, K] of projections sharing an input, and their low-rank deltas as one
    (A [sum r, K], B [sum N, sum r]) pair (block-diagonal B, the scale folded in)."""
    ws, a, b = [], [], []
    for m in mods:
        base = m.base if isinstance(m, LoRALinear) else m
        w = base.weight.detach().float()
        ws.append(w)
        if isinstance(m, LoRALinear):
            a.append(m.lora_A.detach().float())
            b.append(m.lora_B.detach().float() * m.scale)
        else:
            a.append(w.new_zeros(0, w.shape[1]))
            b.append(w.new_zeros(w.shape[0], 0))
    low = (torch.cat(a), torch.block_diag(*b)) if any(len(t) for t in a) else None
    return torch.cat(ws), low


def _dense(w: Tensor, dtype: torch.dtype) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # no throwaway init
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    return lin


def _store(w: Tensor, low, precision: str, switch: WidthSwitch, narrow_w: Tensor | None = None):
    """One projection in the precision's storage (`narrow_w`: the weights the 4-bit copy holds,
    when they differ from `w` in rows no output is read from)."""
    merged = w if low is None else w + low[1] @ low[0]
    if precision in ("float32", "bfloat16"):
        return _dense(merged, getattr(torch, precision))
    if precision == "int8":
        return Int8Linear(_dense(merged, torch.float32))
    narrow = Int4Linear(w if narrow_w is None else narrow_w, low)
    return ByWidth(narrow, _dense(merged, torch.bfloat16), switch)


def _head_narrow(model) -> Tensor:
    """The LM head's weights for the 4-bit copy: the mask token's row (trained, on no grid) zeroed,
    its logit is never read (a mask token is never a prediction: `token_logits`, `speculate`)."""
    w = model.lm_head.weight.detach().float().clone()
    mid = model.config.mask_token_id
    if mid is not None and mid < len(w):
        w[mid] = 0
    return w


def _on_grid(model) -> bool:
    a = model.model.layers[0].self_attn
    try:
        Int4Linear(_parts([a.q_proj])[0])
        Int4Linear(_head_narrow(model)[:1024])
    except NotOnGrid:
        return False
    return True


def prepare(model, precision: str = "auto", device: str | torch.device = "cpu"):
    """The model, fused and stored for inference in `precision` (in place; returns the model)."""
    check_precision(precision)
    if torch.device(device).type != "cpu":
        if precision in ("int4", "int8"):
            raise ConfigError(f"precision {precision} runs torch's CPU kernels; on {device} use bfloat16")
        precision = "float32" if precision == "auto" else precision
    if precision == "auto":
        precision = "int4" if _on_grid(model) else "float32"
    elif precision == "int4" and not _on_grid(model):
        raise ConfigError(
            "precision int4 keeps the weights' own 4-bit grid, and this model's weights are on "
            "none (not imported from a 4-bit file): use int8 or bfloat16"
        )
    act = torch.float32 if precision == "float32" else torch.bfloat16
    sw = model.width_switch = WidthSwitch() if precision == "int4" else None
    try:  # the first layer and the head were checked; a model on a grid only in part ends here
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.fuse(_store(*_parts([a.q_proj, a.k_proj, a.v_proj]), precision, sw))
            a.o_proj = _store(*_parts([a.o_proj]), precision, sw)
            m.fuse(_store(*_parts([m.gate_proj, m.up_proj]), precision, sw))
            m.down_proj = _store(*_parts([m.down_proj]), precision, sw)
            layer.input_layernorm = FastRMSNorm(layer.input_layernorm)
            layer.post_attention_layernorm = FastRMSNorm(layer.post_attention_layernorm)
        model.model.norm = FastRMSNorm(model.model.norm)
        if isinstance(model.model.embed_tokens, EmbeddingRows):
            model.model.embed_tokens = model.model.embed_tokens.merged()
        head = model.lm_head.weight.detach().float()
        narrow = _head_narrow(model) if precision == "int4" else None
        model.lm_head = _store(head, None, precision, sw, narrow)
    except NotOnGrid as e:
        raise ConfigError(
            f"precision {precision}: some of this model's weights are on no 4-bit grid ({e}); "
            "load it with --dtype bfloat16 or float32"
        ) from None
    for p in model.parameters():
        p.requires_grad_(False)
        if p.is_floating_point() and p.dtype != act:
            p.data = p.data.to(act)
    model.precision = precision
    model.fused_layers = FusedLayers(model)
    return model.eval()
