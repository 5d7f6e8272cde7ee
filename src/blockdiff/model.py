"""The block-diffusion transformer: a Llama-style decoder whose attention pattern is given by the
caller. The same weights are an AR model under a causal mask and a diffusion model under a
block or bidirectional mask; nothing else changes.

Parameter names follow Hugging Face `LlamaForCausalLM`, so Llama-family state dicts load as is.
"""

from __future__ import annotations

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

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [b, 1, q, head_dim] for absolute positions [b, q] (HF rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Keys/values (after RoPE) of tokens already processed, per layer: [b, kv_heads, T, head_dim].

    Only tokens whose keys can never change belong here: the committed prefix of a block-causal
    model. What to store is the decoder's decision (`write=True` on a forward); the model only
    appends.
    """

    def __init__(self, n_layers: int):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def get(self, layer: int) -> tuple[Tensor | None, Tensor | None]:
        return self.k[layer], self.v[layer]

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)

    def keep(self, index: Tensor) -> None:
        """Keep only these cached positions (e.g. drop the block of a dual cache)."""
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i] = self.k[i][:, :, index]
                self.v[i] = self.v[i][:, :, index]


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

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, write: bool) -> Tensor:
        b, q, _ = x.shape
        qh = self.q_proj(x).view(b, q, self.n_heads, self.hd).transpose(1, 2)
        kh = self.k_proj(x).view(b, q, self.n_kv, self.hd).transpose(1, 2)
        vh = self.v_proj(x).view(b, q, self.n_kv, self.hd).transpose(1, 2)
        qh, kh = apply_rope(qh, cos, sin), apply_rope(kh, cos, sin)
        k_all, v_all = kh, vh
        if cache is not None:
            pk, pv = cache.get(layer)
            if pk is not None:
                k_all, v_all = torch.cat([pk, kh], 2), torch.cat([pv, vh], 2)
            if write:
                n = q if write is True else int(write)
                cache.append(layer, kh[:, :, :n], vh[:, :, :n])
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

    def forward(self, x: Tensor) -> Tensor:
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
        write_cache: bool | int = False,
        logits_slice: slice | None = None,
    ) -> Tensor:
        """Raw output logits [b, q, V] (see `token_logits` for which token each row predicts).

        input_ids [b, q]; positions [b, q] absolute positions (default: after the cache);
        mask [b|1, 1, q, len(cache)+q] boolean, True = may attend (None = full attention);
        write_cache appends this forward's keys/values to `cache` (an int: only the first n).
        """
        b, q = input_ids.shape
        if positions is None:
            start = len(cache) if cache is not None else 0
            positions = torch.arange(start, start + q, device=input_ids.device).expand(b, q)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i, write_cache)
        x = self.model.norm(x)
        if logits_slice is not None:
            x = x[:, logits_slice]
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
