"""blockdiff in lm-evaluation-harness: log-likelihoods against their oracles (the AR path's direct
sum; the ELBO by enumerating every masking pattern), generation equal to `generate`, and local
tasks (the harness's own loading of JSON files) scored as blockdiff scores them."""

import json
import statistics

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from blockdiff.decoding import generate, row_seeds  # noqa: E402
from blockdiff.eval.harness import BlockdiffLM, json_task  # noqa: E402

from .conftest import trained  # noqa: E402


@pytest.fixture(scope="module")
def shifted_ckpt(tmp_path_factory, corpus_dir):
    return trained(tmp_path_factory, corpus_dir, "shifted", (1,))[1]


def req(kind: str, *args, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihood_is_the_ar_paths_sum(shifted_ckpt):
    lm = BlockdiffLM(pretrained=str(shifted_ckpt), sampler="ar")
    m, tok = lm.model, lm.tok
    ctx, cont = "The king", " is dead"
    want, ids = 0.0, tok.encode(ctx)
    for t in tok.encode(ctx + cont)[len(ids) :]:  # one causal forward per token, raw next-token row
        x = torch.tensor([ids])
        causal = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
        row = m(x, mask=causal[None, None])[0, -1].float()
        row[tok.mask_id] = float("-inf")
        want += float(row.log_softmax(-1)[t])
        ids = [*ids, t]
    (got, greedy), (again, _) = lm.loglikelihood([req("loglikelihood", ctx, cont)] * 2)
    assert got == pytest.approx(want, abs=1e-4) and got == again
    rolled = lm.loglikelihood_rolling([req("loglikelihood_rolling", ctx + cont)])[0]
    assert rolled == pytest.approx(lm._ar([tok.eos_id], tok.encode(ctx + cont))[0], abs=1e-4)


def test_monte_carlo_elbo_converges_to_the_exact_one(tiny_ckpt):
    lm = BlockdiffLM(pretrained=str(tiny_ckpt), sampler="bd3", batch_size=64)
    ctx, cont = lm._split("To be, or not", " to be")
    assert len(cont) <= 6
    exact = lm.exact_elbo(ctx, cont)
    assert lm.elbo(ctx, cont, 256) == lm.elbo(ctx, cont, 256)  # the same seed, the same number

    def spread(n: int) -> float:
        vals = []
        for s in range(8):
            lm.spec = lm.spec.__class__(lm.spec.sampler, lm.spec.options, None, s)
            vals.append(lm.elbo(ctx, cont, n))
        return statistics.pstdev(vals), statistics.fmean(vals)

    (small, _), (large, mean) = spread(16), spread(256)
    assert 2.0 < small / large < 8.0  # ~ sqrt(256 / 16) = 4
    assert mean == pytest.approx(exact, abs=3 * large + 1e-6)
    assert exact < 0
    assert lm.elbo(ctx, []) == lm.exact_elbo(ctx, []) == 0.0  # an empty continuation: probability 1


def test_generate_until_is_blockdiff_generate_cut_at_stops(tiny_ckpt):
    lm = BlockdiffLM(pretrained=str(tiny_ckpt), sampler="bd3", block_size=4, seed=3)
    ctxs = ["ROMEO:", "To be, or"]
    reqs = [
        req("generate_until", c, {"until": ["\n", "."], "max_gen_toks": 12}, i=i) for i, c in enumerate(ctxs)
    ]
    got = lm.generate_until(reqs)
    for i, c in enumerate(ctxs):
        text = generate(lm.model, lm.tok, [c], "bd3", 12, seed=row_seeds(3, [i]), block_size=4).texts[0]
        cut = min((p for p in (text.find("\n"), text.find(".")) if p >= 0), default=len(text))
        assert got[i] == text[:cut]
    assert lm.nfe > 0


def test_local_tasks_through_the_harness(tiny_ckpt, tmp_path):
    """The harness loads its data from local JSON (its own `datasets` loading), asks blockdiff, and
    scores: two of three references are blockdiff's own greedy texts, one is not (2/3 exact
    match); one label is the choice blockdiff's ELBO prefers, one is not (accuracy 1/2)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    greedy = dict(block_size=4, order="confidence", temperature=0.0)  # no seed in the texts
    lm = BlockdiffLM(pretrained=str(tiny_ckpt), sampler="bd3", mc_samples=8, **greedy)
    questions = ["ROMEO:", "To be", "KING"]
    texts = [generate(lm.model, lm.tok, [q], "bd3", 8, **greedy).texts[0].split("\n")[0] for q in questions]
    gen = [{"question": q, "answer": a} for q, a in zip(questions, [*texts[:2], texts[2] + "#"], strict=True)]
    mc = [
        {"question": "To be, or not", "choices": ["to be", "xq zz"]},
        {"question": "The king", "choices": ["is", "qx"]},
    ]
    picks = [
        max(range(2), key=lambda c, d=d: lm.elbo(*lm._split(d["question"], " " + d["choices"][c])))
        for d in mc
    ]
    mc[0]["label"], mc[1]["label"] = picks[0], 1 - picks[1]
    (tmp_path / "gen.json").write_text(json.dumps(gen))
    (tmp_path / "mc.json").write_text(json.dumps(mc))
    (tmp_path / "bd_gen.yaml").write_text(
        json_task("bd_gen", tmp_path / "gen.json") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (tmp_path / "bd_mc.yaml").write_text(
        json_task("bd_mc", tmp_path / "mc.json") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["bd_gen", "bd_mc"], task_manager=TaskManager(include_path=str(tmp_path))
    )
    res = out["results"]
    assert res["bd_gen"]["exact_match,none"] == pytest.approx(2 / 3)
    assert res["bd_mc"]["acc,none"] == pytest.approx(1 / 2)


def test_the_cli_runs_the_harness_and_reports_nfes(tiny_ckpt, tmp_path):
    import subprocess
    import sys

    (tmp_path / "q.json").write_text(json.dumps([{"question": "ROMEO:", "answer": "x"}]))
    (tmp_path / "bd_q.yaml").write_text(
        json_task("bd_q", tmp_path / "q.json") + 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  max_gen_toks: 8\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    base = [sys.executable, "-m", "blockdiff", "eval", "lm-eval", "run", "--model", "blockdiff"]
    args = ["--tasks", "bd_q", "--include_path", str(tmp_path)]
    good, bad_out = tmp_path / "good", tmp_path / "bad"
    ok = subprocess.run(
        [*base, "--model_args", f"pretrained={tiny_ckpt},sampler=bd3,block_size=4", *args,
         "--output_path", str(good)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "|bd_q" in ok.stdout and "8 tokens generated in" in ok.stdout and "tokens/NFE" in ok.stdout
    (results,) = good.rglob("results_*.json")
    info = json.loads(results.read_text())["config"]["blockdiff"]
    assert info["sampler"] == "bd3" and info["tokens"] == 8 and info["nfe"] > 0
    assert info["options"]["block_size"] == 4
    bad = subprocess.run(
        [*base, "--model_args", f"pretrained={tiny_ckpt},sampler=bd3,blok_size=4", *args,
         "--output_path", str(bad_out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "did you mean 'block_size'" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
    assert not bad_out.exists() or not any(bad_out.rglob("*"))  # nothing half-written


def test_a_model_without_an_ar_path_is_told_so(tiny_ckpt):
    from blockdiff.config import ConfigError

    with pytest.raises(ConfigError, match="no AR path"):
        BlockdiffLM(pretrained=str(tiny_ckpt), loglikelihood="ar")
    with pytest.raises(ValueError, match="unknown sampler"):
        BlockdiffLM(pretrained=str(tiny_ckpt), sampler="bd4")


def test_a_written_task_scores_as_blockdiff_eval_task(tmp_path):
    """`write_task` puts a task's held-out items into the harness: the same prompts, the same
    completions and the same scores (the task's own checker) as `blockdiff eval task`."""
    pytest.importorskip("reasoning_gym")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from blockdiff.eval import tasks
    from blockdiff.eval.harness import write_task

    greedy = dict(threshold=0.9)  # Fast-dLLM's threshold rule: no randomness to line up
    lm = BlockdiffLM(pretrained="shakespeare-5m", sampler="fastdllm", batch_size=4, **greedy)
    want = tasks.evaluate_task(lm.model, lm.tok, "basic_arithmetic", lm.spec, n=3, max_new_tokens=24)
    write_task("basic_arithmetic", 3, tmp_path, 24)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["blockdiff_basic_arithmetic"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    res = out["results"]["blockdiff_basic_arithmetic"]
    samples = sorted(out["samples"]["blockdiff_basic_arithmetic"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [e["completion"] for e in want.examples]
    assert [s["score"] for s in samples] == [e["score"] for e in want.examples]
    assert res["acc,none"] == pytest.approx(want.accuracy)
    assert res["score,none"] == pytest.approx(want.mean_score)
    info = out["config"]["blockdiff"]  # the results file says what the decoding cost
    assert info["sampler"] == "fastdllm" and info["nfe"] == lm.nfe > 0 and info["tokens"] == lm.tokens


def test_batched_loglikelihood_equals_one_request_at_a_time(shifted_ckpt):
    lm = BlockdiffLM(pretrained=str(shifted_ckpt), sampler="ar", batch_size=3)
    reqs = [req("loglikelihood", c, x) for c, x in [("The", " king"), ("To be, or not to", " be"), ("A", "")]]
    together = lm.loglikelihood(reqs)
    alone = [lm._ar(*lm._split(*r.args)) for r in reqs]
    assert [g for _, g in together] == [g for _, g in alone]
    assert [v for v, _ in together] == pytest.approx([v for v, _ in alone], abs=1e-4)
    assert together[2] == (0.0, True)  # an empty continuation: probability 1
    from blockdiff.objectives import ar_logprobs

    rows = [lm.tok.encode(c + x) for c, x in [("The", " king"), ("To be, or not to", " be")]]
    starts = [len(lm.tok.encode("The")), len(lm.tok.encode("To be, or not to"))]
    one = ar_logprobs(lm.model, rows, starts, lm.tok.eos_id)
    split = ar_logprobs(lm.model, rows, starts, lm.tok.eos_id, max_fed=len(rows[1]))  # a group each
    for (a, ga), (b, gb) in zip(one, split, strict=True):
        assert torch.allclose(a, b, atol=1e-5) and torch.equal(ga, gb) and len(a) == len(ga) >= 1


def test_a_request_longer_than_the_context_is_refused(shifted_ckpt):
    from blockdiff.config import ConfigError

    lm = BlockdiffLM(pretrained=str(shifted_ckpt), sampler="ar")
    L = lm.model.config.max_position_embeddings
    ids = lm.tok.encode("To be, or not to be " * L)
    # the last token is predicted, never fed: L + 1 tokens fit, L + 2 do not
    (got, _), (want, _) = lm._ar_batched([(ids[:L], ids[L : L + 1]), (ids[:2], ids[2:3])])
    assert got < 0 and want < 0
    with pytest.raises(ConfigError, match="longer than the model's context"):
        lm._ar_batched([(ids[: L + 1], ids[L + 1 : L + 2])])
    long = "To be, or not to be " * L
    with pytest.raises(ConfigError, match="longer than the model's context"):
        lm.loglikelihood([req("loglikelihood", long, " be")])


GSM8K_YAML = """output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer.split('####')[-1].strip()}}"
generation_kwargs:
  until: ["Question:", "<|im_end|>", "\\n\\n"]
  max_gen_toks: 32
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
"""


@pytest.mark.slow
def test_a_gsm8k_format_task_with_its_numeric_filters_on_the_shipped_model(tmp_path):
    """GSM8K's own layout and answer filters (strict `#### N`, flexible last number) over the
    shipped model's chat answers: the harness extracts the numbers blockdiff wrote."""
    import re

    import lm_eval
    from lm_eval.tasks import TaskManager

    items = [("What is 2 + 3?", 5), ("What is 3 + 5?", 8), ("What is 7 + 2?", 9)]  # it says 11 to the last
    data = [{"question": q, "answer": f"The answer is {a}.\n#### {a}"} for q, a in items]
    (tmp_path / "gsm.json").write_text(json.dumps(data))
    (tmp_path / "bd_gsm.yaml").write_text(json_task("bd_gsm", tmp_path / "gsm.json") + GSM8K_YAML)
    lm = BlockdiffLM(pretrained="smollm2-nbdiff", sampler="ar", dtype="float32")
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["bd_gsm"], task_manager=TaskManager(include_path=str(tmp_path)),
        apply_chat_template=True, log_samples=True,
    )  # fmt: skip
    res = out["results"]["bd_gsm"]
    flexible = {}
    for s in out["samples"]["bd_gsm"]:
        found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", s["resps"][0][0])
        last = next(x for x in found[-1] if x) if found else "[invalid]"
        flexible[s["doc_id"]] = s["filtered_resps"][0] if s["filter"] == "flexible-extract" else None
        if s["filter"] == "flexible-extract":
            assert s["filtered_resps"][0] == last, s
    assert res["exact_match,strict-match"] == 0.0  # a chat answer has no "#### N" line
    assert res["exact_match,flexible-extract"] == pytest.approx(2 / 3), flexible


def test_a_prompt_longer_than_the_context_is_refused_before_decoding(tiny_ckpt):
    lm = BlockdiffLM(pretrained=str(tiny_ckpt), sampler="bd3", block_size=4)
    long = "To be, or not to be " * lm.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=r"\+ max_new_tokens \(8\) exceeds the model's context"):
        lm.generate_until([req("generate_until", long, {"max_gen_toks": 8})])
    assert lm.nfe == 0
