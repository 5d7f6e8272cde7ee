"""Gen PPL math against hand computation; entropy of known token lists."""

import math

import pytest
import torch

from blockdiff.eval.genppl import continuation_nll, evaluate, score, unigram_entropy

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def evaluator(tok):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ref_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>")
    return model, ref_tok


def test_unigram_entropy():
    assert unigram_entropy([7] * 10) == 0.0
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert unigram_entropy([1, 1, 1, 2]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert unigram_entropy([]) == 0.0


def _hand(model, ids, first, window):
    """Token-by-token: token i scored with the (up to) `window` tokens before it, as the
    sliding windows place them."""
    total = 0.0
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for i in range(first, len(ids)):
            total -= float(logp[i - 1, ids[i]])
    return total


def test_continuation_nll_full_window_is_exact(evaluator):
    model, _ = evaluator
    ids = list(range(3, 23))
    s, n = continuation_nll(model, ids[:5], ids[5:], window=64, stride=64)
    assert n == 15 and s == pytest.approx(_hand(model, ids, 5, 64), rel=1e-9)


def test_continuation_nll_sliding_window_by_hand(evaluator):
    model, _ = evaluator
    ids = [(7 * i) % 200 + 3 for i in range(20)]
    s, n = continuation_nll(model, ids[:2], ids[2:], window=8, stride=4)
    expected = 0.0
    with torch.no_grad():
        for end in [6, 10, 14, 18, 20]:
            pos = end - 4 if end != 20 else 18
            start = max(0, end - 8)
            logp = torch.log_softmax(model(torch.tensor([ids[start:end]])).logits[0].double(), -1)
            for i in range(pos, end):
                expected -= float(logp[i - 1 - start, ids[i]])
    assert n == 18 and s == pytest.approx(expected, rel=1e-9)


def test_score_excludes_prompt_and_gen_ppl_is_token_weighted(evaluator, tok, make_model):
    ref, ref_tok = evaluator
    nll, n = score(ref, ref_tok, ["ab", ""], ["cde", "xy"], 1024, 512)
    eos = [ref_tok.eos_token_id]
    a = continuation_nll(ref, eos + tok.encode("ab"), tok.encode("cde"))
    b = continuation_nll(ref, eos, tok.encode("xy"))
    assert n == 5 and nll == pytest.approx(a[0] + b[0], rel=1e-9)
    m = make_model(tok)
    res = evaluate(m, tok, ref, ref_tok, ["Shall I", "The king"], "bd3", 8, block_size=4)
    assert res.samples == 2 and res.nfe >= 1 and res.empty == 0
    nll, n = score(ref, ref_tok, ["Shall I", "The king"], res.texts, 1024, 512)
    assert res.gen_ppl == pytest.approx(math.exp(nll / n)) and res.scored_tokens == n


@pytest.mark.slow
def test_eval_genppl_cli_on_bundled_model(capsys):
    """`blockdiff eval genppl` end to end: bundled model, SmolLM2 evaluator, real-text row."""
    import json

    from blockdiff import cli

    args = ["eval", "genppl", "--sampler", "bd3", "--num-samples", "2", "--max-new-tokens", "16", "--json"]
    assert cli.main(args) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["samples"] == 2 and d["gen_ppl"] > 1 and d["real_text_ppl"] > 1 and d["nfe"] >= 1
    assert {"entropy", "tokens_per_second", "empty", "degenerate"} <= set(d)


def test_genppl_checks_the_context_before_loading_anything(tiny_ckpt, monkeypatch, capsys):
    """--max-new-tokens beyond the model's context: one clear line, no model or evaluator loaded."""
    from blockdiff import cli, hub
    from blockdiff.cli import common

    def heavy(*a, **k):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr(common, "load_model", heavy)  # what the decoding commands load through
    monkeypatch.setattr(hub, "load_reference", heavy)
    args = ["eval", "genppl", "--model", str(tiny_ckpt), "--max-new-tokens", "5000", "--json"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--prompt-tokens 16 + --max-new-tokens 5000 exceeds the model's context of 64 tokens" in err


def test_genppl_corpus_is_the_one_the_run_read(tmp_path, monkeypatch):
    """A relative data.corpus is read from the working directory at training time; the run records
    where, so `eval genppl` finds the same corpus from any other directory."""
    from blockdiff.eval.genppl import trained_corpus
    from blockdiff.train import Trainer
    from tests.conftest import TEXT, tiny_recipe

    (tmp_path / "work" / "notes").mkdir(parents=True)
    (tmp_path / "work" / "notes" / "a.txt").write_text(TEXT * 4)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    Trainer(tiny_recipe("notes", steps=2), tmp_path / "run").run()
    monkeypatch.chdir(tmp_path / "elsewhere")
    corpus, source = trained_corpus(str(tmp_path / "run"))
    assert corpus == str(tmp_path / "work" / "notes") and source == "the model's training recipe"
