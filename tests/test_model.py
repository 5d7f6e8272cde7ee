"""The transformer against the reference library, and the KV cache against recomputation."""

import pytest
import torch

from blockdiff import masks
from blockdiff.config import ConfigError
from blockdiff.convert import config_from_hf, from_hf_state_dict
from blockdiff.model import KVCache
from blockdiff.runtime import prepare

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied,kv_heads", [(True, 2), (False, 4)])
def test_logits_match_transformers_llama(tied, kv_heads):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norms too, so a wrong norm would show
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ours = from_hf_state_dict(config_from_hf(hf_cfg.to_dict()), ref.state_dict()).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids, mask=masks.block_causal(20, 1, 2))
        fast = prepare(ours, "float32")(ids, mask=masks.block_causal(20, 1, 2))  # the inference loop
    assert (got - want).abs().max().item() <= 1e-5
    assert (fast - want).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="FusedLayers"):  # its modules are not a second path
        ours.model.layers[0].self_attn(ids, None, None, None, None, 0, False)


def test_kv_cache_equals_recomputation():
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    ours = from_hf_state_dict(
        config_from_hf(hf_cfg.to_dict()), transformers.LlamaForCausalLM(hf_cfg).state_dict()
    )
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        full = ours(ids, mask=masks.block_causal(12, 4))
        cache = KVCache(2)
        outs = []
        for b in range(3):  # block by block, each block written after it is fed
            q = torch.arange(4 * b, 4 * b + 4)
            k = torch.arange(0, 4 * b + 4)
            m = (k[None, :] // 4 <= q[:, None] // 4)[None, None]
            outs.append(
                ours(ids[:, 4 * b : 4 * b + 4], positions=q[None], mask=m, cache=cache, write_cache=True)
            )
    assert len(cache) == 12
    assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-5


def test_unsupported_architecture_is_named():
    with pytest.raises(ConfigError, match="unsupported architecture.*supported: LlamaForCausalLM"):
        config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_a_failed_forward_leaves_nothing_pending_in_the_cache():
    """A forward that dies after writing some layers must not move the next forward's lengths."""
    k = torch.zeros(1, 2, 4, 8)
    cache = KVCache(2)
    cache.extend(0, k, k, 4)  # layer 0 of a forward that then failed: 4 slots pending
    cache.begin()  # the next forward starts
    cache.extend(0, k[:, :, :2], k[:, :, :2], 2)
    cache.extend(1, k[:, :, :2], k[:, :, :2], 2)
    cache.advance()
    assert len(cache) == 2 and cache.lengths.tolist() == [2]
