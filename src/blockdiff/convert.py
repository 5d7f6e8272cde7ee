"""Import Hugging Face Llama-family weights: blockdiff's parameter names are Llama's, so this is a
config translation plus a state-dict load. AR checkpoints use shifted logits (the output at i-1
predicts token i), which is what `logits="shifted"` records.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ConfigError, ModelConfig
from .model import BlockDiffLM

SUPPORTED = ("LlamaForCausalLM",)


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if hf.get("model_type") != "llama" and not set(archs) & set(SUPPORTED):
        raise ConfigError(f"unsupported architecture {archs}; supported: {', '.join(SUPPORTED)}")
    if hf.get("rope_scaling"):
        raise ConfigError(f"rope_scaling {hf['rope_scaling']} is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("Llama variants with attention/MLP biases are not supported")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    cfg = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id") if isinstance(hf.get("eos_token_id"), int) else None,
        pad_token_id=hf.get("pad_token_id"),
        logits="shifted",
        layout="context_causal",
        block_size=1,
        block_sizes=[1],
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> BlockDiffLM:
    model = BlockDiffLM(cfg)
    try:
        model.load_llama_state_dict(sd)
    except ValueError as e:
        raise ConfigError(f"state dict does not match a Llama model: {e}") from None
    return model
