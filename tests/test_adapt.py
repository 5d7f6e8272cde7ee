"""NBDiff adaptation end to end on a tiny AR base: layout, growth, AR regulariser, samplers."""

import json

import pytest

from blockdiff import cli
from blockdiff.decoding import SAMPLERS, generate
from blockdiff.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ar_base(make_model, tok, tiny_ckpt, tmp_path_factory):
    make_model(tok, logits="shifted", block_sizes=(1,))  # trains and caches the tiny AR model
    from tests.conftest import _MODELS

    return _MODELS[("shifted", (1,))][1]


def test_adapt_tiny_ar_base(ar_base, corpus_dir, tmp_path, capsys):
    out = tmp_path / "adapted"
    args = [
        "adapt",
        "--base",
        str(ar_base),
        "--data",
        str(corpus_dir),
        "--target-block-size",
        "4",
        "--seq-len",
        "32",
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--mix-scale",
        "--lr",
        "1e-3",
        "--precision",
        "fp32",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    model, tok = load_model(out)
    cfg = model.config
    assert (cfg.layout, cfg.logits, cfg.block_sizes, cfg.train_seq_len) == (
        "context_causal",
        "shifted",
        [4, 32],
        32,
    )
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["block_size"] for r in recs] == [1, 1, 2, 2, 4, 4, 4, 4]  # 1 -> 2 -> 4 over the first half
    assert all(r["ar"] > 0 for r in recs)  # the AR regulariser is computed on the clean half
    for sampler in SAMPLERS:  # a normal checkpoint: every sampler runs on it
        g = generate(model, tok, "Shall I", sampler=sampler, max_new_tokens=8)
        assert g.rows[0].nfe >= 1
    assert cli.main(args[:-2] + ["--out", str(out), "--resume", "--set", "train.steps=9"]) == 0


def test_a_base_models_measured_spec_prior_is_not_inherited(ar_base, corpus_dir, tmp_path, capsys):
    """`draft_acceptance` was measured on the base's weights: a model trained from it starts
    without one (spec then measures its own drafts)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(ar_base, base)
    for path in base.rglob("config.json"):  # the run's checkpoints
        cfg = json.loads(path.read_text())
        cfg.setdefault("blockdiff", {})["draft_acceptance"] = [0.9, 0.8]
        path.write_text(json.dumps(cfg))
    assert load_model(base, None)[0].config.draft_acceptance == [0.9, 0.8]
    out = tmp_path / "adapted"
    args = ["adapt", "--base", str(base), "--data", str(corpus_dir), "--target-block-size", "4"]
    args += ["--seq-len", "32", "--steps", "2", "--batch-size", "2", "--precision", "fp32", "--out", str(out)]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert load_model(out, None)[0].config.draft_acceptance == []


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--target-block-size", "3"], "block_size 3 does not divide seq_len 32"),
        (["--base", "/nonexistent"], "cannot load causal LM '/nonexistent'"),
        (["--set", "model.hidden_size=8"], "model.hidden_size comes from model.base"),
        (["--seq-len", "4096"], "data.seq_len 4096 exceeds the base's context"),
    ],
)
def test_adapt_bad_input_fails_before_training(ar_base, corpus_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    args = [
        "adapt",
        "--base",
        str(ar_base),
        "--data",
        str(corpus_dir),
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--out",
        str(out),
        *extra,
    ]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_mask_row_needs_room():
    """The mask token's id must be the next free row or an unused padded row; a tokenizer larger
    than the embedding leaves no consistent id."""
    import torch

    from blockdiff.config import ConfigError, ModelConfig
    from blockdiff.hub import add_mask_row
    from blockdiff.model import BlockDiffLM

    cfg = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1)
    cfg.update(num_attention_heads=2, num_key_value_heads=2)
    m = BlockDiffLM(ModelConfig(**cfg))
    mean = m.model.embed_tokens.weight.detach().mean(0).clone()
    add_mask_row(m, 10)  # grows by one row, tied head follows
    assert m.config.vocab_size == 11 and m.lm_head.weight.shape[0] == 11
    assert torch.allclose(m.model.embed_tokens.weight[10], mean)
    padded = BlockDiffLM(ModelConfig(**cfg))
    add_mask_row(padded, 7)  # an unused row of a padded vocabulary: no growth
    assert padded.config.vocab_size == 10
    with pytest.raises(ConfigError, match="no room for a mask token"):
        add_mask_row(BlockDiffLM(ModelConfig(**cfg)), 12)
