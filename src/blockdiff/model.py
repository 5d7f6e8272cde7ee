"""The block-diffusion transformer: a Llama-style decoder whose attention pattern is given by the
caller. The same weights are an AR model under a causal mask and a diffusion model under a
block or bidirectional mask; nothing else changes.

Parameter names follow Hugging Face `LlamaForCausalLM`, so Llama-family state dicts load as is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # normalised in float32, scaled in the input's dtype
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


@functools.lru_cache(maxsize=8)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> Tensor:
    """RoPE's frequencies (the same bits every call: computed once per shape; never written to)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin of shape [b, 1, q, head_dim] for absolute positions [b, q] (HF's
    rotate-half layout; the sin's first half negated so that `apply_rope` rotates with one roll)."""
    freqs = positions.float()[..., None] * _inv_freq(head_dim, theta, positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    sin = emb.sin()
    sin[..., : head_dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x·cos + rotate_half(x)·sin, bit for bit: rotate_half(x) = [-x2, x1] = roll(x)·[-1, 1]."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin


def _kept(write: bool | int, q: int) -> int:
    """How many of a forward's q fed tokens stay in the cache (`write_cache` as a bool or a count)."""
    return 0 if not write else q if write is True else int(write)


class KVCache:
    """Keys/values (after RoPE) of tokens already processed, per layer, in preallocated buffers
    [b, kv_heads, capacity, head_dim] written in place (capacity doubles when full).

    Each row has its own length: `truncate` rolls rows back (rejected speculative drafts), and
    later writes overwrite what was dropped. Attention reads the first `span` slots; which of
    them a row may see is `visible()` (slots below its length), combined into the caller's
    mask. What to store is the decoder's decision (`write_cache` on a forward).
    """

    def __init__(self, n_layers: int):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.span = 0  # slots attention reads (the longest row)
        self.lengths: Tensor | None = None  # [b] slots each row holds
        self._pending: Tensor | None = None  # per-row end of this forward's writes

    def __len__(self) -> int:
        return self.span

    def get(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        if self.k[layer] is None or self.span == 0:
            return None, None
        return self.k[layer][:, :, : self.span], self.v[layer][:, :, : self.span]

    def _ensure(self, layer: int, like: Tensor, need: int) -> None:
        buf = self.k[layer]
        if buf is not None and buf.shape[2] >= need:
            return
        cap = max(need, 2 * (0 if buf is None else buf.shape[2]), 64)
        b, h, _, d = like.shape
        for store in (self.k, self.v):
            new = like.new_zeros((b, h, cap, d))
            if store[layer] is not None:
                new[:, :, : store[layer].shape[2]] = store[layer]
            store[layer] = new

    def write(self, layer: int, k: Tensor, v: Tensor, slots: Tensor | None = None) -> None:
        """Store k/v [b, h, n, d]: after each row's length (default) or at `slots` [b, n]."""
        b, n = k.shape[0], k.shape[2]
        if self.lengths is None:
            self.lengths = torch.zeros(b, dtype=torch.long, device=k.device)
        if slots is None:
            slots = self.lengths[:, None] + torch.arange(n, device=k.device)
        self._ensure(layer, k, int(slots.max()) + 1)
        idx = slots[:, None, :, None].expand(b, k.shape[1], n, k.shape[3])
        self.k[layer].scatter_(2, idx, k.to(self.k[layer].dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v[layer].dtype))
        self._pending = slots.max(1).values + 1

    def extend(self, layer: int, k: Tensor, v: Tensor, keep: int) -> tuple[Tensor, Tensor]:
        """Put all fed k/v [b, h, q, d] after the cached slots and return the keys attention reads
        (cache then fed: no concatenation); only the first `keep` stay after this forward."""
        b, q = k.shape[0], k.shape[2]
        if self.lengths is None:
            self.lengths = torch.zeros(b, dtype=torch.long, device=k.device)
        end = self.span + q
        self._ensure(layer, k, end)
        self.k[layer][:, :, self.span : end] = k
        self.v[layer][:, :, self.span : end] = v
        if keep and self._pending is None:  # the same for every layer: made once per forward (`begin`)
            self._pending = torch.full_like(self.lengths, self.span + keep)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reserve(self, like: Tensor, q: int, write: bool | int | Tensor) -> Tensor | None:
        """Before a forward that runs every layer in one call (`runtime.decoder_stack`): buffers
        [b, h, ·, d] like `like` large enough in every layer for what `update` would store, and
        what is pending after it; returns the per-row slots (a Tensor `write`) or None."""
        if self.lengths is None:
            self.lengths = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)
        if isinstance(write, Tensor):
            need, self._pending = int(write.max()) + 1, write.max(1).values + 1
        else:
            need, keep = self.span + q, _kept(write, q)
            if keep:
                self._pending = torch.full_like(self.lengths, self.span + keep)
        if self.k[-1] is None or self.k[-1].shape[2] < need:  # the runtime grows every layer at once
            for layer in range(len(self.k)):
                self._ensure(layer, like, need)
        return write if isinstance(write, Tensor) else None

    def begin(self) -> None:
        """A forward starts: nothing of an earlier, failed one is pending."""
        self._pending = None

    def update(self, layer: int, k: Tensor, v: Tensor, write: bool | int | Tensor) -> tuple[Tensor, Tensor]:
        """Store this forward's k/v [b, h, q, d] as `write` says (see `BlockDiffLM.forward`) and
        return the keys and values attention reads: the cached ones, then these."""
        if isinstance(write, Tensor):  # explicit per-row slots [b, n] for the first n fed
            pk, pv = self.get(layer)
            both = (k, v) if pk is None else (torch.cat([pk, k], 2), torch.cat([pv, v], 2))
            self.write(layer, k[:, :, : write.shape[1]], v[:, :, : write.shape[1]], write)
            return both
        return self.extend(layer, k, v, _kept(write, k.shape[2]))

    def advance(self) -> None:
        """After a forward's writes in every layer: rows now end after what was written."""
        if self._pending is not None:
            self.lengths = torch.maximum(self.lengths, self._pending)
            self.span = int(self.lengths.max())
            self._pending = None

    def regrid(self, parts: list[tuple[KVCache, list[int], int]], n: int) -> None:
        """Become, in place, the rows `rows` of each part's cache, its slots moved right by `shift`
        (slots are canvas columns under the exact cache); every row then holds `n` slots, those no
        part fills are zero (padding the caller's mask hides)."""
        b = sum(len(rows) for _, rows, _ in parts)
        device = None
        for name in ("k", "v"):
            store = getattr(self, name)
            for layer in range(len(store)):
                bufs = [getattr(c, name)[layer] for c, _, _ in parts]
                like = next((x for x in bufs if x is not None), None)
                shape = None if like is None else (b, like.shape[1], max(n, 64), like.shape[3])
                store[layer] = None if like is None else like.new_zeros(shape)
                at = 0
                for buf, (c, rows, s) in zip(bufs, parts, strict=True):
                    lo, hi = max(0, -s), min(c.span, n - s)
                    if buf is not None and hi > lo:
                        store[layer][at : at + len(rows), :, lo + s : hi + s] = buf[rows, :, lo:hi]
                    at += len(rows)
                device = device or (like.device if like is not None else None)
        self.lengths = torch.full((b,), n, dtype=torch.long, device=device)
        self.span, self._pending = n, None

    def truncate(self, lengths: Tensor | int) -> None:
        """Roll rows back to these lengths (never forward); dropped slots get overwritten later."""
        if self.lengths is None:
            return
        new = torch.as_tensor(lengths, device=self.lengths.device).expand_as(self.lengths)
        if bool((new > self.lengths).any()):
            raise ValueError("truncate cannot lengthen a row")
        self.lengths = new.clone()
        self.span = int(self.lengths.max()) if len(self.lengths) else 0

    def move(self, row: int, src: list[int], dst: list[int]) -> None:
        """Copy one row's slots `src` to `dst` (a speculative tree's accepted branch, consecutive)."""
        for buf in (b for b in self.k + self.v if b is not None):
            buf[row, :, dst] = buf[row, :, src]

    def visible(self) -> Tensor | None:
        """[b, span] True where a row's slot holds a live key (None: all slots of all rows)."""
        if self.lengths is None or bool((self.lengths == self.span).all()):
            return None
        return torch.arange(self.span, device=self.lengths.device)[None] < self.lengths[:, None]

    def keep(self, index: Tensor) -> None:
        """Keep only these cached positions (e.g. drop the block of a dual cache)."""
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i] = self.k[i][:, :, index]
                self.v[i] = self.v[i][:, :, index]
        self.span = len(index)
        if self.lengths is not None:
            self.lengths = torch.full_like(self.lengths, len(index))


@dataclass
class SplitMask:
    """A mask over [noisy ⊕ clean] in which clean queries see clean keys only (see masks.split)."""

    noisy: Tensor  # [b, 1, q - L, k] rows of the noisy queries
    clean: Tensor  # [b, 1, L, L] rows of the clean queries over the clean keys


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # the inference runtime's fused q|k|v

    def fuse(self, qkv: nn.Module) -> None:
        """Use one projection for q|k|v (runtime.prepare builds it from the three)."""
        self.qkv_proj, self.q_proj, self.k_proj, self.v_proj = qkv, None, None, None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, write: bool) -> Tensor:
        if self.qkv_proj is not None:
            raise RuntimeError("a prepared model's layers run in runtime.FusedLayers, not the modules")
        b, q, _ = x.shape  # the unfused modules (training)
        qh = self.q_proj(x).view(b, q, self.n_heads, self.hd).transpose(1, 2)
        kh = self.k_proj(x).view(b, q, self.n_kv, self.hd).transpose(1, 2)
        vh = self.v_proj(x).view(b, q, self.n_kv, self.hd).transpose(1, 2)
        qh, kh = apply_rope(qh, cos, sin), apply_rope(kh, cos, sin)
        k_all, v_all = (kh, vh) if cache is None else cache.update(layer, kh, vh, write)
        gqa = self.n_heads != self.n_kv
        if isinstance(mask, SplitMask):
            # [xt ⊕ x0]: the clean half never attends to the noisy half, so its queries need
            # only the clean keys: 3L² attention work instead of 4L², same result.
            L = mask.clean.shape[-1]
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        qh[:, :, :-L], k_all, v_all, attn_mask=mask.noisy, enable_gqa=gqa
                    ),
                    F.scaled_dot_product_attention(
                        qh[:, :, -L:],
                        k_all[:, :, -L:],
                        v_all[:, :, -L:],
                        attn_mask=mask.clean,
                        enable_gqa=gqa,
                    ),
                ],
                dim=2,
            )
        else:
            out = F.scaled_dot_product_attention(qh, k_all, v_all, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, q, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # the inference runtime's fused gate|up

    def fuse(self, gate_up: nn.Module) -> None:
        self.gate_up_proj, self.gate_proj, self.up_proj = gate_up, None, None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            raise RuntimeError("a prepared model's layers run in runtime.FusedLayers, not the modules")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, write):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, write)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class BlockDiffLM(nn.Module):
    """Llama-compatible transformer. `mask` decides whether it acts as AR, block or full diffusion."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.width_switch = None  # the int4 runtime's choice of weights per forward (quant.WidthSwitch)
        self.fused_layers = None  # a prepared model's decoder loop (runtime.FusedLayers)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def load_llama_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load Llama-named weights (tied head and RoPE buffers tolerated); mismatch = ValueError."""
        tied = self.config.tie_word_embeddings
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        if tied:
            sd.pop("lm_head.weight", None)
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        write_cache: bool | int | Tensor = False,
        logits_slice: slice | Tensor | None = None,
    ) -> Tensor:
        """Raw output logits [b, q, V] (see `token_logits` for which token each row predicts).

        input_ids [b, q]; positions [b, q] absolute positions (default: after the cache);
        mask [b|1, 1, q, len(cache)+q] boolean, True = may attend (None = full attention);
        write_cache appends this forward's keys/values to `cache` (an int: only the first n; a
        [b, n] tensor: the first n at these per-row slots). logits_slice: a slice, or per-row
        indices [b, m], of the outputs to return.
        """
        b, q = input_ids.shape
        if positions is None:
            start = len(cache) if cache is not None else 0
            positions = torch.arange(start, start + q, device=input_ids.device).expand(b, q)
        if self.width_switch is not None:
            self.width_switch.set(q, len(cache) if cache is not None else 0)
        if cache is not None:
            cache.begin()
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if self.fused_layers is not None:
            x = self.fused_layers(x, cos, sin, mask, cache, write_cache)
        else:
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, mask, cache, i, write_cache)
        if cache is not None:
            cache.advance()
        if logits_slice is not None:  # the LM head (and final norm) only where logits are read
            x = (
                x[:, logits_slice]
                if isinstance(logits_slice, slice)
                else x.gather(1, logits_slice[..., None].expand(-1, -1, x.shape[-1]))
            )
        x = self.model.norm(x)
        return self.lm_head(x)


def token_logits(logits: Tensor, cfg: ModelConfig, prev: Tensor | None = None) -> Tensor:
    """Per-token predictive logits: row i predicts token i, whatever the checkpoint's convention.

    This is the one place that reads `cfg.logits`. For shifted models row i comes from output
    i-1; the first row comes from `prev` (the output just before this span, e.g. the last
    committed token's), or is -inf-free zeros if none is given. The mask token is never a valid
    prediction (SUBS parameterisation), so its logit is set to -inf.
    """
    if cfg.shifted:
        first = prev if prev is not None else torch.zeros_like(logits[:, :1])
        if first.ndim == 2:
            first = first[:, None]
        logits = torch.cat([first, logits[:, :-1]], dim=1)
    if cfg.mask_token_id is not None and cfg.mask_token_id < logits.shape[-1]:
        logits = logits.clone() if not cfg.shifted else logits
        logits[..., cfg.mask_token_id] = float("-inf")
    return logits
