"""Supervised prompt/answer data (answer-only loss), task scorers wired to their own checkers, and
the `eval table` / `eval task` / `data task` commands end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from blockdiff.cli import main
from blockdiff.config import ModelConfig
from blockdiff.data.corpus import load_corpus, pack_pairs
from blockdiff.eval import tasks
from blockdiff.masks import block_causal
from blockdiff.model import BlockDiffLM
from blockdiff.noise import Noise
from blockdiff.objectives import block_diffusion_loss

pytest.importorskip("reasoning_gym")


def _model(logits: str) -> BlockDiffLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logits=logits, mask_token_id=15,
    )  # fmt: skip
    return BlockDiffLM(cfg).eval()


def test_answer_only_loss_mdlm_by_hand():
    """Global block: prompt tokens stay clean even where the noise masks them, and only answer
    tokens count, each weighted 1/t, averaged over all answer tokens of the batch."""
    m = _model("aligned")
    x0 = torch.randint(0, 15, (2, 8))
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[0, 3:], keep[1, 5:] = True, True
    t = torch.tensor([[0.5] * 8, [0.25] * 8])
    masked = torch.ones(2, 8, dtype=torch.bool)  # noise masks everything; the loss mask must win
    masked[0, 6] = False
    out = block_diffusion_loss(m, x0, torch.tensor([8, 8]), Noise(t, masked), loss_mask=keep)
    xt = torch.where(masked & keep, torch.full_like(x0, 15), x0)
    logits = m(xt).float()
    logits[..., 15] = float("-inf")
    ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(2, 8)
    assert out.tokens == int(keep.sum())
    assert torch.allclose(out.loss, (ce * (masked & keep) / t).sum() / keep.sum(), atol=1e-5)
    assert torch.allclose(out.rows[1], (ce[1] * (masked & keep)[1] / t[1]).sum() / 3, atol=1e-5)


def test_answer_only_loss_ignores_noise_on_the_prompt_bd3_nbdiff():
    """Vectorised BD3 path, shifted logits, context-causal layout, AR term: noise drawn on prompt
    tokens changes nothing (they are never masked), noise on answer tokens does; an all-ones
    mask is the unmasked objective."""
    m = _model("shifted")
    m.config.layout = "context_causal"
    x0 = torch.randint(0, 15, (2, 8))
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[:, 3:] = True
    t, bs = torch.full((2, 8), 0.5), torch.tensor([4, 4])
    a = torch.rand(2, 8) < 0.5
    b = a.clone()
    b[:, :3] = ~b[:, :3]  # differs only on the prompt
    c = a.clone()
    c[:, 5] = ~c[:, 5]  # differs on an answer token
    loss = [block_diffusion_loss(m, x0, bs, Noise(t, z), 0.5, keep).loss for z in (a, b, c)]
    assert torch.equal(loss[0], loss[1]) and not torch.equal(loss[0], loss[2])
    ones = torch.ones(2, 8, dtype=torch.bool)
    full = block_diffusion_loss(m, x0, bs, Noise(t, a), 0.5, ones)
    assert torch.allclose(full.loss, block_diffusion_loss(m, x0, bs, Noise(t, a), 0.5).loss)


def test_answer_only_loss_ar_by_hand():
    m = _model("shifted")
    x0 = torch.randint(0, 15, (2, 8))
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[:, 4:] = True
    nz = Noise(torch.full((2, 8), 0.5), torch.ones(2, 8, dtype=torch.bool))
    out = block_diffusion_loss(m, x0, torch.tensor([1, 1]), nz, loss_mask=keep)
    logits = m(x0, mask=block_causal(8, 1, 2)).float()  # B=1: causal next-token prediction
    logits[..., 15] = float("-inf")
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), x0[:, 1:].flatten(), reduction="none").view(2, 7)
    want = ce[:, 3:].mean()  # targets 4..7
    assert torch.allclose(out.loss, want, atol=1e-5)
    assert out.tokens == 8


def test_pack_pairs_layout_and_errors(tok, tmp_path):
    ids, mask = pack_pairs(tok, [("ab", "cd"), ("x", "yz")], 8)
    assert tok.decode(ids[0][:4].tolist()) == "abcd" and ids[0][4:].tolist() == [tok.eos_id] * 4
    assert mask[0].tolist() == [False, False] + [True] * 6
    assert mask[1].tolist() == [False] + [True] * 7
    with pytest.raises(ValueError, match="more than seq_len 4"):
        pack_pairs(tok, [("abc", "de")], 4)
    # an answer cut at a length limit: no EOS, right-aligned, loss on the answer only
    ids, mask = pack_pairs(tok, [("ab", "cde", False)], 8)
    assert ids[0][:3].tolist() == [tok.eos_id] * 3 and tok.decode(ids[0][3:].tolist()) == "abcde"
    assert mask[0].tolist() == [False] * 5 + [True] * 3
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"prompt": "a", "answer": "b", "complete": false}\n{"prompt": "c", "answer": "d"}\n')
    assert load_corpus(cut, 0.5).train_pairs == [("a", "b", False)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "only"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_corpus(bad)


def test_reasoning_scorers_use_the_tasks_checkers():
    for name in tasks.REASONING:
        its = tasks.items(name, 2)
        assert [tasks.score(name, it, it.answer) for it in its] == [1.0, 1.0], name
        assert all(tasks.score(name, it, "no idea") < 1.0 for it in its), name
    assert tasks.items("mini_sudoku", 3)[0].prompt == tasks.items("mini_sudoku", 3)[0].prompt  # fixed split
    with pytest.raises(ValueError, match="did you mean 'countdown'"):
        tasks.items("countdwn", 2)


def test_training_data_excludes_evaluation_questions(tmp_path, capsys):
    out = tmp_path / "ms.jsonl"
    # seeds chosen so the generator's items overlap the evaluation pool: the filter must act
    seed = str(tasks.EVAL_SEED - 100)
    assert main(["data", "task", "mini_sudoku", "--n", "300", "--out", str(out), "--seed", seed]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    pool = [it.prompt for it in tasks.items("mini_sudoku", tasks.EVAL_POOL)]
    assert [it.prompt for it in tasks.items("mini_sudoku", 5)] == pool[:5]  # any --n is inside the pool
    held = set(pool)
    assert len(rows) == 300 and len({r["prompt"] for r in rows}) == 300
    assert not held & {r["prompt"] for r in rows}
    assert main(["data", "task", "humaneval", "--n", "3", "--out", str(out)]) == 2


def test_humaneval_scored_in_the_sandbox():
    it = tasks.items("humaneval", 1)[0]
    assert tasks.score("humaneval", it, it.answer) == 1.0
    assert tasks.score("humaneval", it, "    return None\n") == 0.0


def test_eval_task_cli_on_bundled_model(capsys):
    assert main(["eval", "task", "basic_arithmetic", "--n", "2", "--sampler", "bd3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["n"] == 2 and 0.0 <= row["accuracy"] <= 1.0 and row["nfe"] > 0
    assert main(["eval", "task", "nope", "--n", "2"]) == 2


@pytest.mark.slow
def test_eval_table_trains_scores_and_resumes(tmp_path, capsys):
    recipe = tmp_path / "t.yaml"
    recipe.write_text(
        """
base:
  model: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
          num_key_value_heads: 2}
  tokenizer: {kind: byte}
  data: {seq_len: 192}
  train: {steps: 3, batch_size: 4, eval_every: 3, save_every: 3, log_every: 1, warmup: 1}
eval: {kind: task, task: basic_arithmetic, n: 3, train_size: 40, batch_size: 3}
models:
  AR:
    model: {logits: shifted}
    objective: {block_sizes: [1]}
    samplers: [{sampler: ar}]
  BD3 B=4:
    objective: {block_sizes: [4]}
    samplers: [{sampler: bd3, block_size: 4, steps: 2}]
"""
    )
    out = tmp_path / "out"
    assert main(["eval", "table", str(recipe), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["sampler"]) for r in res["rows"]] == [
        ("AR", "ar"),
        ("BD3 B=4", "bd3 block_size=4 steps=2"),
    ]
    assert all(math.isfinite(m["val_nll_bound"]) and m["cpu_s"] > 0 for m in res["models"].values())
    assert (out / "plot.png").stat().st_size > 1000
    assert "| BD3 B=4 | bd3 block_size=4 steps=2 |" in (out / "table.md").read_text()
    lines, before = (out / "ar" / "metrics.jsonl").read_text(), (out / "results.json").read_text()
    assert main(["eval", "table", str(recipe), "--out", str(out)]) == 0  # resumes: nothing redone
    assert (out / "ar" / "metrics.jsonl").read_text() == lines
    assert (out / "results.json").read_text() == before
    # a changed recipe is not silently mixed with old results
    assert main(["eval", "table", str(recipe), "--out", str(out), "--set", "train.steps=4"]) == 2
    assert main(["eval", "table", str(recipe), "--out", str(out), "--set", "eval.n=2"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("kind: task", "kind: tsk"))
    assert main(["eval", "table", str(bad)]) == 2


def test_table_recipe_errors_before_training():
    from blockdiff.config import ConfigError
    from blockdiff.experiments.table import load_table_recipe

    d = load_table_recipe("recipes/table-shakespeare.yaml", ["train.steps=7"])
    assert d["base"]["train"]["steps"] == 7 and len(d["models"]) == 6
    with pytest.raises(ConfigError, match="exceeds the models' data.seq_len 128"):
        load_table_recipe("recipes/table-shakespeare.yaml", ["eval.max_new_tokens=500"])
    with pytest.raises(ConfigError, match="unknown eval key"):
        load_table_recipe("recipes/table-shakespeare.yaml", ["eval.num_sample=3"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_table_recipe("recipes/table-shakespeare.yaml", ["train.step=3"])


def test_canvas_length_rules(tok):
    its = [tasks.Item("ab", "xyz", {}), tasks.Item("abcd", "x", {})]
    assert tasks.canvas_length(tok, its, 64, None) == 16  # longest answer + EOS, rounded up to 16
    assert tasks.canvas_length(tok, its, 18, None) == 14  # trimmed to what the context leaves
    assert tasks.canvas_length(tok, its, 64, 40) == 36  # global-block model: ends where rows ended
    with pytest.raises(ValueError, match="longer data.seq_len"):
        tasks.canvas_length(tok, its, 7, None)


def test_block_expansion_stops_at_eos():
    from blockdiff.decoding.canvas import Canvas

    c = Canvas.build([[5, 6]], 8, mask_id=1, eos_id=0, pad_id=2)
    c.set_grid(4)
    assert c.expand_block(0, 0, 4, 4)  # room to grow before any EOS
    c = Canvas.build([[5, 6]], 8, mask_id=1, eos_id=0, pad_id=2)
    c.set_grid(4)
    c.commit(torch.tensor([0]), torch.tensor([3]), torch.tensor([0]), torch.tensor([1.0]))  # EOS in block 0
    assert (c.tokens[0, 4:] == 0).all()
    assert not c.expand_block(0, 0, 4, 4)  # the EOS fill after it is not room to grow into


@pytest.mark.slow
def test_eval_table_genppl_kind(tmp_path, corpus_dir):
    """The table's main mode: two models, Gen PPL under SmolLM2 with NFEs, the real-text row."""
    recipe = tmp_path / "g.yaml"
    recipe.write_text(
        f"""
base:
  model: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
          num_key_value_heads: 2}}
  tokenizer: {{kind: byte}}
  data: {{corpus: {corpus_dir}, seq_len: 32}}
  train: {{steps: 2, batch_size: 4, eval_every: 2, save_every: 2, warmup: 1}}
eval: {{kind: genppl, num_samples: 2, prompt_tokens: 8, max_new_tokens: 8, batch_size: 2}}
models:
  AR:
    model: {{logits: shifted}}
    objective: {{block_sizes: [1]}}
    samplers: [{{sampler: ar}}]
  BD3 B=4:
    objective: {{block_sizes: [4]}}
    samplers: [{{sampler: bd3, block_size: 4, steps: 2}}, {{sampler: bd3, block_size: 4, steps: 4}}]
"""
    )
    out = tmp_path / "out"
    assert main(["eval", "table", str(recipe), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert math.isfinite(res["real_text_ppl"]) and res["real_text_ppl"] > 1
    nfe = {r["sampler"]: r["nfe"] for r in res["rows"]}
    assert nfe["bd3 block_size=4 steps=2"] < nfe["bd3 block_size=4 steps=4"] <= 8
    assert all(math.isfinite(r["gen_ppl"]) and r["gen_ppl"] > 1 for r in res["rows"])
    assert "real text" in (out / "table.md").read_text() and (out / "plot.png").exists()


def test_sudoku_digits_layout_is_the_gym_puzzle_and_checker():
    for name, size in (("mini_sudoku_digits", 4), ("sudoku_digits", 9)):
        gym = tasks.items(name.removesuffix("_digits"), 3)
        its = tasks.items(name, 3)
        for g, it in zip(gym, its, strict=True):
            puzzle = g.entry["metadata"]["puzzle"]
            assert it.prompt == "".join(str(d) for row in puzzle for d in row) + "="
            assert len(it.answer) == size * size and it.answer.isdigit()
            assert tasks._as_grid(it.answer, size) == g.answer  # the gym's answer format
            assert tasks.score(name, it, it.answer) == 1.0
            wrong = it.answer[:-1] + str(int(it.answer[-1]) % size + 1)
            assert tasks.score(name, it, wrong) < 1.0
            assert tasks.score(name, it, it.answer[:-1]) < 1.0  # a cell short
    train = {p["prompt"] for p in tasks.training_pairs("mini_sudoku_digits", 200, seed=tasks.EVAL_SEED - 50)}
    assert not train & {it.prompt for it in tasks.items("mini_sudoku_digits", tasks.EVAL_POOL)}
