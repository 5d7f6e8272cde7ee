"""The inference runtime, built once at load: fused projections and weights per precision.

q|k|v become one projection and gate|up another (two matrix products per layer fewer, and one
RoPE call for q and k together); each fused projection is stored as the precision asks:

* float32 / bfloat16 — one dense matrix (a delta merged into it);
* int8  — per-output-channel int8, any weights (lossy: `quant.Int8Linear`);
* int4  — the weights' own 4-bit grid (exact for SmolLM2's Q4_1 base, `quant.Int4Linear`), a
  delta unmerged beside it, for forwards over a cache of up to `quant.narrow_rows()` tokens per
  sequence; a bfloat16 copy for the others, where the dense GEMM is cheaper (`quant.ByWidth`,
  `quant.WidthSwitch`). Refused for weights on no grid;
* auto  — on a CPU, int4 where it is exact, float32 otherwise (the default: never rounds a
  stored weight; activations are bfloat16 in int4); float32 on other devices.

Every RMSNorm becomes `FastRMSNorm` (one fused kernel instead of eight small operations), and the
decoder layers run as one call: compiled C++ (`native`) for forwards of a few tokens per sequence
on a CPU, else one TorchScript function (`decoder_stack`; both called by `FusedLayers`).
Training never sees this: it works on the unfused modules that checkpoints name.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .config import ConfigError
from .delta import EmbeddingRows, LoRALinear
from .model import KVCache, RMSNorm, SplitMask, apply_rope
from .quant import (
    DENSE,
    LOWBIT4,
    LOWBIT8,
    NOT_COPIED,
    TILE_TOKENS,
    TILED,
    ByWidth,
    Int4Linear,
    Int8Linear,
    NotOnGrid,
    PackedLinear,
    WidthSwitch,
    can_pack,
    project,
)

PRECISIONS = ("auto", "float32", "bfloat16", "int8", "int4")
# Forwards of at most this many tokens per sequence run as the compiled step (`native`); wider ones
# (prompts, wide diffusion blocks) as TorchScript, where the matrix products dominate and SDPA
# attends. 32: the int4 runtime's codes go to 16 tokens (tiles), and bfloat16 forwards of 16 and
# 32 tokens cost less here than in TorchScript (11.4 / 15.7 ms against 13.2 / 16.2, one process
# alternating the two; BENCHMARKS.md).
NATIVE_ROWS = 32


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    return precision


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm through one LayerNorm over [x, -x]: that vector's mean is 0 and its variance is
    mean(x²), so its first half is x / sqrt(mean(x²) + eps). torch's CPU RMSNorm is a chain of
    ~8 small operations: 20 µs for one 576-wide token against 14 (benchmarks/norm_rope.py), and
    a step runs 61 norms. The gain multiplies after the rounding to the activation dtype, as in
    `RMSNorm`: the gain inside the kernel (one rounding) moved bfloat16 logits further from
    float32's (measured, docs/decisions.md)."""
    d = x.shape[-1]
    return weight * F.layer_norm(torch.cat([x, -x], -1), [2 * d], eps=eps)[..., :d]


class FastRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.eps = norm.eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def decoder_stack(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor | None,
    ks: list[Tensor],
    vs: list[Tensor],
    span: int,
    slots: Tensor | None,
    norms: list[Tensor],
    kinds: list[int],
    outs: list[int],
    parts: list[list[Tensor]],
    nh: int,
    nkv: int,
    hd: int,
    eps: float,
) -> Tensor:
    """The decoder layers of a prepared model (per layer: two norms, four projections `kinds`,
    `outs`, `parts` as `quant.project` reads them). With a cache (`ks`, `vs`: buffers large
    enough, `KVCache.reserve`), the fed keys go after its `span` slots and attention reads all of
    them, or (`slots` [b, n]) attention reads the cache then the fed keys and the first n fed are
    stored at those per-row slots afterwards — `KVCache.update`'s two ways, in the same order."""
    b, q, d = x.shape[0], x.shape[1], x.shape[2]
    gqa = nh != nkv
    x = x.reshape(b * q, d)  # 2-D between the projections: no reshapes around each product
    for i in range(len(norms) // 2):
        j = 4 * i
        h = project(rms_norm(x, norms[2 * i], eps), kinds[j], outs[j], parts[j])
        h = h.view(b, q, nh + 2 * nkv, hd).transpose(1, 2)
        qk = apply_rope(h.narrow(1, 0, nh + nkv), cos, sin)  # one RoPE call rotates q and k together
        k, v = qk.narrow(1, nh, nkv), h.narrow(1, nh + nkv, nkv)
        if len(ks) > 0:
            kb, vb = ks[i], vs[i]
            if slots is None:
                kb.narrow(2, span, q).copy_(k)
                vb.narrow(2, span, q).copy_(v)
                k, v = kb.narrow(2, 0, span + q), vb.narrow(2, 0, span + q)
            else:
                n = slots.shape[1]
                both_k, both_v = (
                    torch.cat([kb.narrow(2, 0, span), k], 2),
                    torch.cat([vb.narrow(2, 0, span), v], 2),
                )
                idx = slots[:, None, :, None].expand(b, nkv, n, hd)
                kb.scatter_(2, idx, k.narrow(2, 0, n).to(kb.dtype))
                vb.scatter_(2, idx, v.narrow(2, 0, n).to(vb.dtype))
                k, v = both_k, both_v
        a = F.scaled_dot_product_attention(qk.narrow(1, 0, nh), k, v, attn_mask=mask, enable_gqa=gqa)
        x = x + project(a.transpose(1, 2).reshape(b * q, nh * hd), kinds[j + 1], outs[j + 1], parts[j + 1])
        gate_up = project(rms_norm(x, norms[2 * i + 1], eps), kinds[j + 2], outs[j + 2], parts[j + 2])
        gate, up = gate_up.chunk(2, -1)
        x = x + project(F.silu(gate) * up, kinds[j + 3], outs[j + 3], parts[j + 3])
    return x.view(b, q, d)


def _scripted(fn):
    """`fn` compiled by TorchScript, or `fn` itself where that fails: the same operations either
    way (tested equal), TorchScript only cuts the Python between them: a one-token int4 forward
    of SmolLM2 8.0 -> 6.3 ms (BENCHMARKS.md). TorchScript is deprecated in favour of
    torch.compile, which ran this step slower (docs/decisions.md)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(fn)
    except Exception as e:  # a torch without TorchScript, sources changed since import: eager
        warnings.warn(f"the decoder loop runs uncompiled (slower): TorchScript failed: {e}", stacklevel=2)
        return fn


_STACK = None


def _packed(m: nn.Module) -> tuple[int, int, list[Tensor]]:
    return m.packed() if hasattr(m, "packed") else (DENSE, m.out_features, [m.weight])


class FusedLayers:
    """A prepared model's decoder layers as one call of `decoder_stack` (TorchScript): a one-token
    step of SmolLM2 made ~400 module calls and ~1000 Python-level tensor operations, half of the
    step besides the 4-bit kernels. Its weights are packed once (per width, for `ByWidth`). The
    same operations in the same order as the modules would run, so the same logits (tested).
    Inference only: training runs the modules (their hooks, the split training mask)."""

    def __init__(self, model):
        global _STACK
        if _STACK is None:
            _STACK = _scripted(decoder_stack)
        self.stack = _STACK
        self.model = model
        self._pack()

    def _pack(self) -> None:
        """The weights as `decoder_stack` reads them, per width (again if the model moved)."""
        cfg, layers = self.model.config, self.model.model.layers
        norms = [n.weight for l in layers for n in (l.input_layernorm, l.post_attention_layernorm)]
        projs = [
            p
            for l in layers
            for p in (l.self_attn.qkv_proj, l.self_attn.o_proj, l.mlp.gate_up_proj, l.mlp.down_proj)
        ]
        eps = float(layers[0].input_layernorm.eps)
        shape = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, eps)
        self.nkv, self.hd = shape[1:3]

        def packing(width: str) -> tuple:
            kinds, outs, parts = zip(*(_packed(getattr(p, width, p)) for p in projs), strict=True)
            return (norms, list(kinds), list(outs), list(parts), *shape)

        self.wide, self.narrow = packing("wide"), packing("narrow")
        self.native_codes = any(k >= LOWBIT4 for k in self.narrow[1])  # read by the native step only
        # the same, every forward's codes on tiles (`tiles_from(model, 1)`)
        kinds = [k + TILED if k in (LOWBIT4, LOWBIT8) else k for k in self.narrow[1]]
        self.narrow_tiled = (self.narrow[0], kinds, *self.narrow[2:])
        self.switch, self.device = self.model.width_switch, norms[0].device
        self.native = native.layers() if self.device.type == "cpu" else None

    def __reduce_ex__(self, protocol):
        raise TypeError(NOT_COPIED)

    def __call__(self, x: Tensor, cos, sin, mask, cache: KVCache | None, write) -> Tensor:
        if isinstance(mask, SplitMask):
            raise ValueError("the split training mask runs on the training modules, not a prepared model")
        if x.device != self.device:  # moved after `prepare`: the packed lists hold the old tensors
            self._pack()
        b, q, _ = x.shape
        slots, span, ks, vs = None, 0, [], []
        if cache is not None:
            slots = cache.reserve(x.new_empty(b, self.nkv, 0, self.hd), q, write)
            span, ks, vs = cache.span, cache.k, cache.v
        run = self.stack  # wide forwards: the matrix products dominate, SDPA's kernel attends
        if self.native is not None and q <= NATIVE_ROWS and self._native_takes(x, mask):
            run = self.native
        # codes in the compiled kernel's layout are read by the native step only (TorchScript
        # would multiply their float32 weights, ~100x slower): elsewhere the bfloat16 copy
        narrow = (
            self.switch is not None and not self.switch.wide and (run is self.native or not self.native_codes)
        )
        weights = self.wide
        if narrow:
            weights = self.narrow_tiled if self.switch.tile_tokens == 1 else self.narrow
        return run(x, cos, sin, mask, ks, vs, span, slots, *weights)

    @staticmethod
    def _native_takes(x: Tensor, mask: Tensor | None) -> bool:
        """What the native step is written for: float32 or bfloat16 activations without a gradient
        to record, a boolean mask [b|1, 1, q, keys] or none (others: TorchScript, as SDPA reads them)."""
        if x.dtype not in (torch.float32, torch.bfloat16) or (torch.is_grad_enabled() and x.requires_grad):
            return False
        if mask is None:
            return True
        return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, x.shape[1])


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


def _dense(w: Tensor, dtype: torch.dtype, pack: bool = False) -> nn.Module:
    if dtype == torch.bfloat16 and pack:
        return PackedLinear(w)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # no throwaway init
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    return lin


def _store(w: Tensor, low, precision: str, switch: WidthSwitch, pack: bool, narrow_w: Tensor | None = None):
    """One projection in the precision's storage (`pack`: bfloat16 in oneDNN's layout; `narrow_w`:
    the weights the 4-bit copy holds, when they differ from `w` in rows no output is read from)."""
    merged = w if low is None else w + low[1] @ low[0]
    if precision in ("float32", "bfloat16"):
        return _dense(merged, getattr(torch, precision), pack)
    if precision == "int8":
        return Int8Linear(_dense(merged, torch.float32))
    narrow = Int4Linear(w if narrow_w is None else narrow_w, low)
    return ByWidth(narrow, _dense(merged, torch.bfloat16, pack), switch)


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


def tiles_from(model, tokens: int) -> None:
    """From how many tokens per sequence an int4 model's forwards multiply its codes on AMX tiles:
    `quant.TILE_TOKENS` (2, the default: lowbit is ~10 % faster for one token alone) or 1 (every
    forward: a batch of one-token steps — a server's — then costs little more than one step).
    Per model, never per batch: a sequence's numbers still never depend on the batch it is in.
    Nothing changes where the CPU has no tiles or the model holds no 4-bit codes."""
    if tokens not in (1, TILE_TOKENS):
        raise ValueError(f"tiles from 1 or {TILE_TOKENS} tokens per sequence, not {tokens}")
    if getattr(model, "width_switch", None) is not None:
        model.width_switch.tile_tokens = tokens


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
    on_cpu = next(model.parameters()).device.type == "cpu"
    pack = on_cpu and can_pack(device)  # bfloat16 in oneDNN's layout: on a CPU, where it works
    try:  # the first layer and the head were checked; a model on a grid only in part ends here
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.fuse(_store(*_parts([a.q_proj, a.k_proj, a.v_proj]), precision, sw, pack))
            a.o_proj = _store(*_parts([a.o_proj]), precision, sw, pack)
            m.fuse(_store(*_parts([m.gate_proj, m.up_proj]), precision, sw, pack))
            m.down_proj = _store(*_parts([m.down_proj]), precision, sw, pack)
            layer.input_layernorm = FastRMSNorm(layer.input_layernorm)
            layer.post_attention_layernorm = FastRMSNorm(layer.post_attention_layernorm)
        model.model.norm = FastRMSNorm(model.model.norm)
        if isinstance(model.model.embed_tokens, EmbeddingRows):
            model.model.embed_tokens = model.model.embed_tokens.merged()
        head = model.lm_head.weight.detach().float()
        narrow = _head_narrow(model) if precision == "int4" else None
        model.lm_head = _store(head, None, precision, sw, pack, narrow)
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
