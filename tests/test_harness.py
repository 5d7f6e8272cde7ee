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
from blockdiff.eval.harness import BlockdiffLM  # noqa: E402

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
        "task: bd_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.json'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    (tmp_path / "bd_mc.yaml").write_text(
        "task: bd_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.json'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
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
        f"task: bd_q\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'q.json'}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  max_gen_toks: 8\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    base = [sys.executable, "-m", "blockdiff", "eval", "lm-eval", "run", "--model", "blockdiff"]
    args = ["--tasks", "bd_q", "--include_path", str(tmp_path)]
    ok = subprocess.run(
        [*base, "--model_args", f"pretrained={tiny_ckpt},sampler=bd3,block_size=4", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "|bd_q" in ok.stdout and "8 tokens generated in" in ok.stdout and "tokens/NFE" in ok.stdout
    bad = subprocess.run(
        [*base, "--model_args", f"pretrained={tiny_ckpt},sampler=bd3,blok_size=4", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "did you mean 'block_size'" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr


def test_a_model_without_an_ar_path_is_told_so(tiny_ckpt):
    from blockdiff.config import ConfigError

    with pytest.raises(ConfigError, match="no AR path"):
        BlockdiffLM(pretrained=str(tiny_ckpt), loglikelihood="ar")
    with pytest.raises(ValueError, match="unknown sampler"):
        BlockdiffLM(pretrained=str(tiny_ckpt), sampler="bd4")
