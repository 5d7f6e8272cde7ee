import pytest
import torch

from blockdiff import recipe
from blockdiff.config import ModelConfig
from blockdiff.models import load_model
from blockdiff.tokenizer import byte_tokenizer
from blockdiff.train import Trainer

TEXT = """Shall I compare thee to a summer's day? Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May, and summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines, and often is his gold complexion dimm'd;
And every fair from fair sometime declines, by chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade, nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade, when in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see, so long lives this, and this gives life to thee.
The king is dead; long live the king. O, what a noble mind is here o'erthrown!
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
"""


def tiny_config(**overrides) -> ModelConfig:
    """A small Llama config for tests that build a model directly (override any field)."""
    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(TEXT * 8)
    return d


def tiny_recipe(corpus, logits="aligned", block_sizes=(4, 8, "L"), steps=150, **train):
    return recipe.from_dict(
        {
            "model": dict(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                logits=logits,
                tie_word_embeddings=False,
            ),
            "tokenizer": {"kind": "byte"},
            "data": {"corpus": str(corpus), "seq_len": 64, "val_fraction": 0.1},
            "objective": {"block_sizes": list(block_sizes)},
            "train": dict(
                dict(
                    steps=steps,
                    batch_size=16,
                    lr=3e-3,
                    warmup=10,
                    eval_every=10_000,
                    save_every=10_000,
                    log_every=10_000,
                ),
                **train,
            ),
        }
    )


_MODELS: dict = {}


def trained(tmp_path_factory, corpus, logits, block_sizes):
    """A tiny model trained for a few seconds: real, context-dependent predictions for oracles."""
    key = (logits, tuple(block_sizes))
    if key not in _MODELS:
        out = tmp_path_factory.mktemp("tiny")
        torch.manual_seed(0)
        Trainer(tiny_recipe(corpus, logits, block_sizes), out).run()
        _MODELS[key] = (load_model(out, None)[0], out)  # the plain modules (tests reach into them)
    return _MODELS[key]


@pytest.fixture(scope="session")
def make_model(tmp_path_factory, corpus_dir):
    def make(tok, logits="aligned", block_sizes=(4, 8, "L")):
        return trained(tmp_path_factory, corpus_dir, logits, block_sizes)[0]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, corpus_dir):
    """Run dir of the tiny aligned mix-scale model."""
    return trained(tmp_path_factory, corpus_dir, "aligned", (4, 8, "L"))[1]
