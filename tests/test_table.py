"""The comparison table (experiments/table.py): its eval section parsed and checked once, and Gen PPL
prompts taken from the corpus the recipe names."""

import json

import pytest

from blockdiff.cli import main
from blockdiff.config import ConfigError
from blockdiff.experiments.table import GenPPLRows, TableEval, load_table_recipe

OTHER_TEXT = "".join(f"zebra {i} quietly juggles violet marbles under copper lamps.\n" for i in range(120))

TINY = """
base:
  model: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
          num_key_value_heads: 2}}
  tokenizer: {{kind: byte}}
  data: {{corpus: {corpus}, seq_len: 32}}
  train: {{steps: 1, batch_size: 2, eval_every: 1, save_every: 1, warmup: 1}}
eval: {{kind: genppl, num_samples: 3, prompt_tokens: 8, max_new_tokens: 8, batch_size: 3}}
models:
  BD3 B=4:
    objective: {{block_sizes: [4]}}
    samplers: [{{sampler: bd3, block_size: 4, steps: 2}}]
"""


def test_eval_section_is_a_checked_dataclass():
    ev = TableEval.from_dict({"kind": "genppl", "num_samples": 4, "batch_size": 2}, "t.yaml")
    assert (ev.num_samples, ev.prompt_tokens, ev.batch_size, ev.max_new_tokens) == (4, 16, 2, None)
    assert ev.settings() == {"kind": "genppl", "num_samples": 4}  # batch size never changes a sample
    assert TableEval.from_dict({}, "t.yaml").kind == "genppl"
    bad = [
        ({"num_sample": 3}, r"t.yaml: unknown eval key 'num_sample' \(did you mean 'num_samples'\?\)"),
        ({"kind": "tsk"}, "eval.kind must be genppl or task, got 'tsk'"),
        ({"n": "ten", "kind": "task", "task": "basic_arithmetic"}, "eval.n must be an integer >= 1"),
        ({"batch_size": 0}, "eval.batch_size must be an integer >= 1, got 0"),
        ({"seed": True, "kind": "task", "task": "x"}, "eval.seed must be an integer >= 0"),
        ({"evaluator": 3}, "eval.evaluator must be a string"),
        ({"kind": "task"}, "eval.kind task needs eval.task"),
        ({"kind": "genppl", "n": 10}, "eval.n is read only by eval.kind task, not genppl"),
        (
            {"kind": "task", "task": "x", "prompt_tokens": 8},
            "eval.prompt_tokens is read only by eval.kind genppl",
        ),
        ([1, 2], "eval must be a mapping"),
    ]
    for d, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            TableEval.from_dict(d, "t.yaml")


def test_loaded_recipe_reads_its_corpus(tmp_path):
    (tmp_path / "other.txt").write_text(OTHER_TEXT)
    recipe = tmp_path / "t.yaml"
    recipe.write_text(TINY.format(corpus=tmp_path / "other.txt"))
    d = load_table_recipe(recipe, ["eval.num_samples=2"])
    assert isinstance(d["eval"], TableEval) and d["eval"].num_samples == 2
    with pytest.raises(ConfigError, match="exceeds the models' data.seq_len 32"):
        load_table_recipe(recipe, ["eval.max_new_tokens=30"])


def test_genppl_prompts_come_from_the_recipes_corpus(tmp_path, monkeypatch, tok):
    """The bug: Gen PPL prompts were always cut from Shakespeare, whatever corpus the recipe named.
    The reference model is faked here; the prompts it and the sampler rows see are recorded."""
    import blockdiff.eval.genppl as genppl
    import blockdiff.hub as hub

    (tmp_path / "other.txt").write_text(OTHER_TEXT)
    recipe = tmp_path / "t.yaml"
    recipe.write_text(TINY.format(corpus=tmp_path / "other.txt"))
    seen = {}

    def fake_reference_row(ref, ref_tok, prompts, real):
        seen["reference"] = list(zip(prompts, real, strict=True))
        return 3.0

    def fake_evaluate(model, tok, ref, ref_tok, prompts, sampler, new, **kw):
        seen["rows"] = list(prompts)
        texts = ["x" * new for _ in prompts]
        return genppl.GenPPL(
            gen_ppl=5.0, entropy=2.0, nfe=2.0, tokens_per_second=1.0, tokens_per_nfe=4.0,
            samples=len(prompts), empty=0, degenerate=0, scored_tokens=8, texts=texts,
        )  # fmt: skip

    monkeypatch.setattr(hub, "load_reference", lambda name: (None, None))
    monkeypatch.setattr(genppl, "reference_row", fake_reference_row)
    monkeypatch.setattr(genppl, "evaluate", fake_evaluate)
    out = tmp_path / "out"
    assert main(["eval", "table", str(recipe), "--out", str(out)]) == 0
    assert len(seen["rows"]) == 3 and [p for p, _ in seen["reference"]] == seen["rows"]
    for prompt, real in seen["reference"]:
        assert prompt and prompt in OTHER_TEXT and (prompt + real) in OTHER_TEXT
    res = json.loads((out / "results.json").read_text())
    assert res["prompt_corpus"] == str(tmp_path / "other.txt") and res["real_text_ppl"] == 3.0
    # the evaluator object alone: the same prompts, from the validation split of that file
    rows = GenPPLRows(
        TableEval(num_samples=3, prompt_tokens=8, max_new_tokens=8), str(tmp_path / "other.txt")
    )
    assert rows.prompts(tok)[0] == seen["rows"]
