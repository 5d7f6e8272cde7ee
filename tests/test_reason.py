"""Stitching (Sample -> Score -> Stitch -> Refine) and the countdown chain task it is measured on:
the splitter, path scores, the stitched prompt from hand-made scored steps, Monte-Carlo step
labels on a policy whose labels are known, cost counters, and end to end on tiny models."""

import math

import pytest
import torch

from blockdiff.config import ModelConfig
from blockdiff.eval import tasks as T
from blockdiff.model import BlockDiffLM
from blockdiff.reason import scorers as Sc
from blockdiff.reason import steps as P
from blockdiff.reason import stitch as S
from blockdiff.tokenizer import byte_tokenizer

pytest.importorskip("reasoning_gym")


def _item(numbers: list[int], target: int) -> T.Item:
    e = {"metadata": {"numbers": numbers, "target": target, "source_dataset": "countdown"}}
    return T.Item(",".join(map(str, numbers)) + f",{target}=", "", e)


# -- the task -------------------------------------------------------------------------------


def test_countdown_chain_items_answers_and_checker():
    its = T.items("countdown_chain", 20)
    for it in its:
        assert it.prompt.endswith("=") and len(it.prompt.split(",")) == 5
        assert T.score("countdown_chain", it, it.answer) == 1.0, it.answer
        assert T.valid_steps("countdown_chain", it, it.answer.split(",")) == [True] * 3
    it = _item([3, 4, 2, 5], 9)
    assert T.score("countdown_chain", it, "3+4=7,7*2=14,14-5=9") == 1.0
    assert T.score("countdown_chain", it, "3+4=8,8*2=16,16-5=11") < 1.0  # false equation
    assert T.score("countdown_chain", it, "3+4=7,7+2=9") < 1.0  # 5 unused
    assert T.score("countdown_chain", it, "3+4=7,7*2=14,14-6=8") < 1.0  # 6 is not given
    assert T.score("countdown_chain", it, "") < 1.0
    assert T.chain_expression("3+4=7,7*2=14,14-5=9", [3, 4, 2, 5]) == "(((3+4)*2)-5)"
    assert T.score("countdown_chain", it, "5/0=0,3+4=7") < 1.0  # no ZeroDivisionError either
    assert T.score("countdown_chain", it, "50+50=100,3+4=7,7*2=14,14-5=9") < 1.0  # a made-up step
    assert T.score("countdown_chain", it, "3+4=7,7*2=14,14-5=9,9*1=9") < 1.0  # a 1 that is not given
    assert T.score("countdown_chain", it, "8/3=2,3+4=7") < 1.0  # inexact division
    assert T.valid_steps("countdown_chain", _item([5, 5, 2, 3], 5), ["5-5=0", "2/0=0"]) == [True, False]


def test_countdown_chain_valid_steps_by_hand():
    it = _item([3, 4, 2, 5], 9)
    assert T.valid_steps("countdown_chain", it, ["3+4=7", "7*2=14", "14-5=9"]) == [True, True, True]
    it24 = _item([2, 3, 4, 1], 24)
    assert T.valid_steps("countdown_chain", it24, ["2*3=6", "6*4=24", "24*1=24"]) == [True] * 3
    assert T.valid_steps("countdown_chain", it24, ["4-3=1"]) == [False]  # true, but {2, 1, 1} cannot make 24
    assert T.valid_steps("countdown_chain", it24, ["2*3=6", "6+4=10"]) == [True, False]  # 10 and 1: no
    assert T.valid_steps("countdown_chain", it, ["3+4=8", "8*2=16"]) == [False, False]  # false, then after
    assert T.valid_steps("countdown_chain", it, ["3+3=6"]) == [False]  # one 3 only
    assert T.valid_steps("countdown_chain", it, ["three"]) == [False]
    with pytest.raises(ValueError, match="no checkable intermediate steps"):
        T.valid_steps("countdown", it, ["3+4=7"])


def test_every_held_out_reference_is_a_chain_the_checker_accepts():
    its = T.items("countdown_chain", 1000)
    assert all(T.score("countdown_chain", it, it.answer) == 1.0 for it in its)
    assert its[434].answer.split(",")[0].endswith("=0")  # 92,48,48,92 -> 48 needs a zero


def _all_solutions(puzzle: list[list[int]]) -> list[list[str]]:
    """Every solution of a 4x4 puzzle by brute force over row permutations (the oracle's oracle)."""
    from itertools import permutations

    rows = ["".join(p) for p in permutations("1234")]
    out = [[]]
    for r in range(4):
        out = [
            g + [row]
            for g in out
            for row in rows
            if all(puzzle[r][c] in (0, int(row[c])) for c in range(4))
            and all(row[c] != h[c] for h in g for c in range(4))
            and (r % 2 == 0 or set(row[:2]) | set(g[-1][:2]) == set("1234"))
            and (r % 2 == 0 or set(row[2:]) | set(g[-1][2:]) == set("1234"))
        ]
    return out


def test_sudoku_rows_as_checkable_steps():
    """A row prefix is valid exactly when some solution starts with it (brute force), on real
    held-out puzzles and on one with many solutions."""
    loose = {"metadata": {"puzzle": [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]}}
    puzzles = [it.entry for it in T.items("mini_sudoku_digits", 5)] + [loose]
    for e in puzzles:
        it = T.Item("", "", e)
        sols = _all_solutions(e["metadata"]["puzzle"])
        assert sols
        prefixes = {tuple(g[:k]) for g in sols for k in range(1, 5)}
        for g in sols[:3]:
            assert T.valid_steps("mini_sudoku_digits", it, g) == [True] * 4
            for k in range(4):  # every other row in place k
                for row in ("1234", "2143", "3412", "4321", "1243", "2134", "1111"):
                    steps = [*g[:k], row]
                    want = [True] * k + [tuple(steps) in prefixes]
                    assert T.valid_steps("mini_sudoku_digits", it, steps) == want, (steps, e)
    assert T.valid_steps("mini_sudoku_digits", T.Item("", "", loose), ["123", "1234"]) == [False, False]


def test_solve_chain_uses_every_number_once():
    assert T.solve_chain([5], 5) == [] and T.solve_chain([5], 6) is None
    chain = T.solve_chain([3, 4, 2, 5], 9)
    assert chain is not None and T.chain_expression(",".join(chain), [3, 4, 2, 5]) is not None
    assert T.score("countdown_chain", _item([3, 4, 2, 5], 9), ",".join(chain)) == 1.0
    assert T.solve_chain([1, 1, 1, 1], 99) is None


def test_countdown_chain_training_pairs_exclude_eval_questions():
    held = {it.prompt for it in T.items("countdown_chain", 100)}
    pairs = T.training_pairs("countdown_chain", 50, seed=0)
    assert len(pairs) == 50 and not held & {p["prompt"] for p in pairs}


# -- pieces of stitching ----------------------------------------------------------------------


def test_split_and_join_steps():
    assert P.split_steps("a+b=c, c*d=e,,", ",") == ["a+b=c", "c*d=e"]
    assert P.split_steps("First. Then this! Done?", "sentences") == ["First.", "Then this!", "Done?"]
    assert P.split_steps("x\n\n y \n", "\n") == ["x", "y"]
    assert P.join_steps(["x", "y"], ",") == "x,y"
    assert P.split_steps(" 123456789 ", "chunks:4") == ["1234", "5678", "9"]
    assert P.join_steps(["1234", "5678"], "chunks:4") == "12345678"
    with pytest.raises(ValueError, match="chunks:N"):
        P.split_steps("12", "chunks:0")


def test_path_score_is_the_geometric_mean():
    assert P.path_score([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert P.path_score([0.9, 0.1]) == pytest.approx(math.sqrt(0.09))
    assert P.path_score([1.0, 0.0]) == 0.0 and P.path_score([]) == 0.0


def test_best_path_majority_and_stitched_context_by_hand():
    r = [
        P.Rollout("a1,b1,c1", ["a1", "b1", "c1"], 4, [0.95, 0.5, 0.99]),  # gm 0.78
        P.Rollout("a1,b2,c2", ["a1", "b2", "c2"], 5, [0.92, 0.97, 0.91]),  # gm 0.93: best
        P.Rollout("a3,b3", ["a3", "b3"], 6, [0.2, 0.95]),
        P.Rollout("a1,b2,c2", ["a1", "b2", "c2"], 5, [0.92, 0.97, 0.91]),
    ]
    assert P.best_path(r) is r[1]
    assert P.majority(r).text == "a1,b2,c2"
    lines = S.stitched_steps(r, threshold=0.9)
    # step 0: a1 once (best score 0.95); step 1: b2 0.97, b3 0.95; step 2: c1 0.99, c2 0.91 (the best
    # path's last step, also above threshold)
    assert lines == [(0, 0.95, "a1"), (1, 0.97, "b2"), (1, 0.95, "b3"), (2, 0.99, "c1"), (2, 0.91, "c2")]
    assert S.stitch_prompt("Q=", lines[:2]) == "1: [c=0.95] a1\n2: [c=0.97] b2\nQ="
    # the best path's last step is added even below the threshold, and within the cap
    low = [P.Rollout("x,y", ["x", "y"], 1, [0.99, 0.3])]
    assert S.stitched_steps(low, 0.9) == [(0, 0.99, "x"), (1, 0.3, "y")]
    assert S.stitched_steps(r, 0.9, cap=2) == [(0, 0.95, "a1"), (2, 0.91, "c2")]
    early = [P.Rollout("x", ["x"], 1, [0.5]), P.Rollout("a,b", ["a", "b"], 1, [0.95, 0.95])]
    early[1].scores = [0.2, 0.99]  # now the one-step path is best: its last step goes to index 0
    assert S.stitched_steps(early, 0.9) == [(0, 0.5, "x"), (1, 0.99, "b")]
    # fitted to a token budget by dropping the lowest-scoring lines
    tok = byte_tokenizer()
    assert S.fit_lines("Q=", lines, tok, len(S.stitch_prompt("Q=", lines))) == lines
    assert S.fit_lines("Q=", lines, tok, 2 * 15 + 2) == [(1, 0.97, "b2"), (2, 0.99, "c1")]
    assert S.fit_lines("Q=", lines, tok, 2) == []
    # agree: only paths with the best path's answer
    assert {s for _, _, s in S.stitched_steps(r, 0.9, agree=True)} == {"a1", "b2", "c2"}


def test_oracle_scorer_and_mc_labels_on_a_policy_with_known_labels():
    """A policy that completes any prefix correctly when the target is still reachable (and writes
    nonsense otherwise): every Monte-Carlo label must equal the checker's step validity."""
    its = [_item([3, 4, 2, 5], 9), _item([10, 2, 3, 7], 27)]
    rolls = [
        [P.Rollout("", ["3+4=7", "7*2=14", "14-5=9"], 3), P.Rollout("", ["3+5=8", "8+2=10", "10-4=6"], 3)],
        [P.Rollout("", ["10*2=20", "20+7=27"], 3), P.Rollout("", ["10+2=13"], 3)],
    ]
    calls = []

    def policy(prompts: list[str], seed: int) -> list[tuple[str, int]]:
        calls.append(len(prompts))
        out = []
        for p in prompts:
            head, _, done = p.partition("=")
            nums = [int(x) for x in head.split(",")]
            it = _item(nums[:-1], nums[-1])
            steps = [s for s in done.split(",") if s]
            ok = all(T.valid_steps("countdown_chain", it, steps))
            pool = list(nums[:-1])
            for s in steps if ok else []:
                m = T._EQ.match(s)
                pool.remove(int(m[1]))
                pool.remove(int(m[3]))
                pool.append(int(m[4]))
            rest = T.solve_chain(pool, nums[-1]) if ok else None
            out.append((",".join(rest) if rest is not None else "1+1=2", 2))
        return out

    rows = S.mc_labels("countdown_chain", its, rolls, policy, k=2, sep=",")
    oracle = Sc.OracleScorer("countdown_chain")
    want = [v for it, rs in zip(its, rolls, strict=True) for row in oracle.score(it, rs, ",") for v in row]
    assert [r["value"] for r in rows] == want and 0 < sum(want) < len(want)
    assert want[:6] == [1, 1, 1, 0, 0, 0]  # the first path solves it; "3+5=8" leaves {4, 2, 8}: no 9
    assert [r["answer"] for r in rows] == ["+" if w else "-" for w in want]
    assert rows[0]["prompt"] == "3,4,2,5,9=3+4=7?" and rows[2]["prompt"] == "3,4,2,5,9=3+4=7,7*2=14,14-5=9?"
    solved = [s == "14-5=9" for rs in rolls for r in rs for s in r.steps]
    assert calls == [2 * (9 - sum(solved))]  # one batched call, k per prefix; a solved prefix needs none


# -- model-backed scorers and the whole pipeline ----------------------------------------------


def _tiny(logits: str, vocab: int) -> BlockDiffLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logits=logits, mask_token_id=vocab - 1,
        max_position_embeddings=128,
    )  # fmt: skip
    return BlockDiffLM(cfg).eval()


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


def test_logprob_scorer_equals_hand_computed_token_probabilities(byte_tok):
    m = _tiny("shifted", byte_tok.vocab_size)
    it = _item([3, 4, 2, 5], 9)
    r = P.Rollout("3+4=7,7*2=14", ["3+4=7", "7*2=14"], 1)
    sc = Sc.LogProbScorer(m, byte_tok)
    got = sc.score(it, [r], ",")[0]
    ids = byte_tok.encode(it.prompt + "3+4=7,7*2=14")
    with torch.no_grad():
        lg = m(torch.tensor([ids]), mask=torch.ones(1, 1, len(ids), len(ids)).tril().bool())[0].float()
        lg[:, m.config.mask_token_id] = float("-inf")  # the mask is never a prediction (SUBS)
        logp = torch.log_softmax(lg, -1)
    a, b = len(byte_tok.encode(it.prompt)), len(byte_tok.encode(it.prompt + "3+4=7"))
    want0 = math.exp(sum(float(logp[t - 1, ids[t]]) for t in range(a, b)) / (b - a))
    want1 = math.exp(sum(float(logp[t - 1, ids[t]]) for t in range(b, len(ids))) / (len(ids) - b))
    assert got == pytest.approx([want0, want1], rel=1e-5) and sc.forwards == 1
    with pytest.raises(ValueError, match="AR path"):
        Sc.LogProbScorer(_tiny("aligned", byte_tok.vocab_size), byte_tok).score(it, [r], ",")


def test_prm_scorer_reads_plus_against_minus(byte_tok):
    m = _tiny("shifted", byte_tok.vocab_size)
    it = _item([3, 4, 2, 5], 9)
    rs = [P.Rollout("", ["3+4=7", "7*2=14"], 1), P.Rollout("", ["3+5=8"], 1)]
    sc = Sc.PRMScorer(m, byte_tok)
    got = sc.score(it, rs, ",")
    assert [len(g) for g in got] == [2, 1] and sc.forwards == 3
    ids = byte_tok.encode("3,4,2,5,9=3+4=7,7*2=14?")
    with torch.no_grad():
        last = m(torch.tensor([ids]), mask=torch.ones(1, 1, len(ids), len(ids)).tril().bool())[0, -1].float()
    p = torch.softmax(last[[byte_tok.encode("+")[0], byte_tok.encode("-")[0]]], -1)[0]
    assert got[0][1] == pytest.approx(float(p), rel=1e-5)


def test_pipeline_end_to_end_counts_costs(byte_tok):
    """Untrained tiny models: the numbers are noise, but every method runs on the same rollouts,
    and the cost counters add up (sum and max of rollout NFEs, scorer forwards, solver tokens)."""
    diff = _tiny("aligned", byte_tok.vocab_size)
    ar = _tiny("shifted", byte_tok.vocab_size)
    its = T.items("countdown_chain", 3)
    complete = S.diffusion_completer(diff, byte_tok, "llada", 16, 8, block_size=16, steps=4, temperature=1.0)
    rolls = S.sample_rollouts(its, complete, 4, ",", seed=1)
    assert [len(rs) for rs in rolls] == [4, 4, 4]
    assert len({r.text for rs in rolls for r in rs}) > 1  # different random streams per row
    again = S.sample_rollouts(its, complete, 4, ",", seed=1)
    assert [r.text for rs in again for r in rs] == [r.text for rs in rolls for r in rs]  # reproducible
    scorers = [Sc.OracleScorer("countdown_chain"), Sc.LogProbScorer(ar, byte_tok), Sc.PRMScorer(ar, byte_tok)]
    long = ([rs[0] for rs in rolls], 3.0)
    res = S.evaluate_stitching(
        "countdown_chain", its, rolls, scorers, (ar, byte_tok), ",", solver_tokens=8, long=long
    )
    assert set(res) == {
        "single rollout", "majority vote", "AR model alone", "one long rollout",
        *(f"{k}, {s.name}" for s in scorers for k in ("best-of-N", "stitch")),
    }  # fmt: skip
    for q, rs in enumerate(rolls):
        assert res["majority vote"][q].cost.rollout_nfe == sum(r.nfe for r in rs) > 4
        assert res["majority vote"][q].cost.rollout_nfe_max == max(r.nfe for r in rs) <= 4
        assert res["single rollout"][q].cost.rollout_nfe == rs[0].nfe
        steps = sum(len(r.steps) for r in rs)
        assert res["stitch, learned PRM"][q].cost.scorer_forwards == steps
        assert res["stitch, AR log-prob"][q].cost.scorer_forwards == 4 * bool(steps) or steps == 0
        assert res["stitch, learned PRM"][q].cost.solver_tokens <= 8
        assert res["AR model alone"][q].cost.rollout_nfe == 0
        assert (
            res["one long rollout"][q].cost.rollout_nfe == rs[0].nfe
            and res["one long rollout"][q].cost.seconds == 1.0
        )
    rows = {r["method"]: r for r in S.summary(res)}
    want = round(sum(r.nfe for rs in rolls for r in rs) / 3, 5)
    assert rows["majority vote"]["rollout_nfe"] == want and rows["single rollout"]["n"] == 3


def test_reason_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    from blockdiff.cli import main

    cases = [
        (
            ["stitch", "--task", "countdown_chain", "--scorer", "oracle", "--n", "0", "--model", "x"],
            "--n must be >= 1",
        ),
        (["stitch", "--task", "countdwn", "--scorer", "oracle", "--model", "x"], "did you mean"),
        (["stitch", "--task", "countdown_chain", "--scorer", "oracle"], "--model: the diffusion model"),
        (
            [
                "prm-data",
                "--task",
                "countdown_chain",
                "--model",
                "x",
                "--questions",
                "2",
                "--k",
                "0",
                "--out",
                "o",
            ],
            "--k",
        ),
    ]
    for args, msg in cases:
        assert main(["reason", *args]) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown scorer"):
        Sc.make_scorer("prm", "countdown_chain", lambda p: (None, None))
    with pytest.raises(ValueError, match="no checkable intermediate steps"):
        Sc.make_scorer("oracle", "gsm_symbolic", lambda p: (None, None))


def test_a_base_models_context_may_grow_in_a_recipe_but_not_its_width():
    from blockdiff.config import ConfigError
    from blockdiff.recipe import from_dict

    base = {"model": {"base": "x", "max_position_embeddings": 224}, "data": {"corpus": "c", "seq_len": 224}}
    assert from_dict(base).model["max_position_embeddings"] == 224
    with pytest.raises(ConfigError, match="settable: layout, logits, max_position_embeddings"):
        from_dict({**base, "model": {"base": "x", "num_hidden_layers": 2}})


def test_a_rollout_does_not_depend_on_the_other_rows(byte_tok):
    diff = _tiny("aligned", byte_tok.vocab_size)
    complete = S.diffusion_completer(diff, byte_tok, "llada", 16, 3, block_size=16, steps=4, temperature=1.0)
    prompts = ["12,3,4,5,6=", "1,2,3,4,10=", "7,7,7,7,28=", "12,3,4,5,6="]
    both = complete(prompts, 5)
    alone = [complete(["x"] * j + [p], 5)[j] for j, p in enumerate(prompts)]
    assert alone == both and both[0] != both[3]  # same prompt, other index: another sample


def test_reason_cli_end_to_end_on_saved_tiny_models(tmp_path, byte_tok, capsys):
    """prm-data -> solver-data -> stitch from the command line on untrained saved models: the
    files and the table come out, with every method's row."""
    import json

    from blockdiff.checkpoint import save_model
    from blockdiff.cli import main

    diff, ar = tmp_path / "diff", tmp_path / "ar"
    for d, m in ((diff, _tiny("aligned", byte_tok.vocab_size)), (ar, _tiny("shifted", byte_tok.vocab_size))):
        d.mkdir()
        save_model(d, m, byte_tok)
    roll = ["--task", "countdown_chain", "--model", str(diff), "--sampler", "llada"]  # one block by default
    roll += ["--steps", "4", "--temperature", "1.0", "--sep", ",", "--new-tokens", "16", "--rollouts", "2"]
    prm = tmp_path / "prm.jsonl"
    assert main(["reason", "prm-data", *roll, "--questions", "3", "--k", "2", "--out", str(prm)]) == 0
    rows = [json.loads(x) for x in prm.read_text().splitlines()]
    assert all(r["answer"] in "+-" and r["prompt"].endswith("?") for r in rows)
    sol = tmp_path / "solver.jsonl"
    args = ["reason", "solver-data", *roll, "--scorer", f"prm:{ar}", "--questions", "3", "--out", str(sol)]
    assert main([*args, "--max-prompt-tokens", "60"]) == 0
    pairs = [json.loads(x) for x in sol.read_text().splitlines()]
    assert len(pairs) == 3 and all(len(byte_tok.encode(p["prompt"])) <= 60 for p in pairs)
    capsys.readouterr()
    out = tmp_path / "res.json"
    st = ["reason", "stitch", *roll, "--n", "3", "--scorer", "oracle", "--scorer", f"logprob:{ar}"]
    st += ["--solver", str(ar), "--solver-tokens", "8", "--long-steps", "8", "--cap", "4", "--out", str(out)]
    assert main(st) == 0
    table = capsys.readouterr().out
    for method in (
        "single rollout",
        "majority vote",
        "one long rollout",
        "stitch, AR log-prob",
        "AR model alone",
    ):
        assert f"| {method} |" in table
    res = json.loads(out.read_text())
    assert len(res["records"]["single rollout"]) == 3 and res["summary"][0]["method"] == "single rollout"
