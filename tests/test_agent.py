"""The agent: world and held-out split, toolbox (calculator refusals included), parser, loop
limits, the scripted solver through the real tools and loop, and a tiny model end to end."""

import builtins
import json

import pytest

from blockdiff.agent import (
    Call,
    CallError,
    ContextLimit,
    ModelPolicy,
    Reply,
    Toolbox,
    calculate,
    eval_tasks,
    is_held_out,
    make_task,
    parse_call,
    render,
    replay_policy,
    run_agent,
    scripted_trajectory,
    train_tasks,
    write_sft_data,
)
from blockdiff.agent import tasks as tasks_mod
from blockdiff.agent import world as world_mod
from blockdiff.agent.tools import CalcError
from blockdiff.agent.trajectory import call_error_at, format_call, sft_pairs, start_messages
from blockdiff.agent.world import search_query


@pytest.fixture(scope="module")
def task():
    return make_task("eval", 3)


@pytest.fixture(scope="module")
def box(task):
    return Toolbox(task.world)


# ---- world and split ---------------------------------------------------------------------------


def test_tasks_are_a_function_of_split_and_seed():
    a, b = make_task("train", "0:5"), make_task("train", "0:5")
    assert a.question == b.question
    assert [e.fields for e in a.world.entities] == [e.fields for e in b.world.entities]
    assert make_task("train", "0:6").question != a.question
    with pytest.raises(ValueError, match="unknown split"):
        make_task("test", 0)


def test_question_has_one_answer_and_its_checker(task):
    q = task.question
    kind_matches = [
        e
        for e in task.world.entities
        if e.kind == q.kind and all(str(e.fields[f]) == v for f, v in q.constraints.items())
    ]
    assert [e.name for e in kind_matches] == [q.entity]
    e = kind_matches[0]
    assert q.value == e.fields[q.product[0]] * e.fields[q.product[1]]
    assert q.check({"entity": q.entity.upper(), "value": q.value})
    assert q.check({"entity": q.entity, "value": float(q.value)})
    assert not q.check({"entity": q.entity, "value": q.value + 1})
    assert not q.check({"entity": "Nobody", "value": q.value})
    assert not q.check(f"{q.entity} {q.value}")
    assert not q.check({"entity": q.entity, "value": True})


def test_held_out_questions_never_in_training_data(tmp_path, monkeypatch):
    held_out = eval_tasks(world_mod.EVAL_POOL)
    texts = {t.question.text for t in held_out}
    train = train_tasks(200, seed=0)
    assert all(t.split == "train" for t in train) and not texts & {t.question.text for t in train}
    assert all(is_held_out(t) for t in held_out[:5])
    # the guard: a training task that asks a held-out question is skipped
    first = make_task("train", "0:0")
    monkeypatch.setattr(tasks_mod, "_held_out_questions", lambda: frozenset({first.question.text}))
    assert [t.seed for t in train_tasks(2, seed=0)] == ["0:1", "0:2"]
    monkeypatch.undo()
    out = tmp_path / "sft.jsonl"
    assert write_sft_data(20, out, seed=1) == 120
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["task"].startswith("train:") for r in rows)
    assert not any(text in r["prompt"] for r in rows for text in texts)


# ---- tools -------------------------------------------------------------------------------------


def test_search_finds_the_entity(box, task):
    q = task.question
    hits = box.search(search_query(q.kind, q.constraints))["results"]
    assert q.entity in [h["source"] for h in hits] and len(hits) <= 5
    assert box.search(q.entity)["results"][0]["source"] == q.entity
    assert "error" in box.search("  ?! ")
    assert box.search("zzzqqq") == {"results": []}


def test_lookup(box, task):
    q = task.question
    e = task.world.get(q.entity)
    field = q.product[0]
    assert box.lookup(q.entity.lower(), field) == {"source": e.name, "field": field, "value": e.fields[field]}
    assert "no source named" in box.lookup("Atlantis", field)["error"]
    assert "has no field 'mayor'" in box.lookup(q.entity, "mayor")["error"]


@pytest.mark.parametrize(
    "expr, value",
    [("2 + 3 * 4", 14), ("(1 + 2) ** 3", 27), ("-5 + 2", -3), ("7 / 2", 3.5), ("2 ** -1", 0.5), ("+4", 4)],
)
def test_calculator(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize(
    "expr, why",
    [
        ("__import__('os')", "function calls are not allowed"),
        ("abs(-1)", "function calls are not allowed"),
        ("(1).real", "attribute access is not allowed"),
        ("x + 1", "names are not allowed"),
        ("2 ** 1000", "exponent 1000 too large"),
        ("9 ** 9 ** 9", "too large"),
        ("(10 ** 100) ** 4", "larger than"),
        ("1e300 * 1e300", "larger than"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("[1, 2]", "'List' is not allowed"),
        ("1 if 1 else 2", "not allowed"),
        ("lambda: 1", "not allowed"),
        ("1 +", "not an arithmetic expression"),
        ("1 / 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("1" * 300, "longer than"),
    ],
)
def test_calculator_refuses(expr, why):
    with pytest.raises(CalcError, match=why):
        calculate(expr)


def test_calculator_never_evals(monkeypatch, box):
    def forbidden(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert calculate("(3 + 4) * 2 ** 3 - -1") == 57
    assert box.calculate("6 / 3") == {"result": 2}
    assert box.calculate("__import__('os').system('true')")["error"].startswith("calculate refused")


def test_verify_and_finish(box, task):
    q = task.question
    assert box.verify({"source": q.entity, **q.constraints}) == {"verified": True}
    field = next(iter(q.constraints))
    res = box.verify({"source": q.entity, field: "elsewhere"})
    assert res["verified"] is False and res["actual"] == {field: q.constraints[field]}
    n = q.product[0]
    assert box.verify({"source": q.entity, n: str(task.world.get(q.entity).fields[n])})["verified"]
    assert "error" in box.verify({"source": q.entity})
    assert "error" in box.verify({"source": q.entity, "mayor": "x"})
    assert "error" in box.verify({"city": q.entity})
    assert box.finish({"entity": "x", "value": 1}) == {"done": True, "answer": {"entity": "x", "value": 1}}


# ---- parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"tool": "search", "args": {"query": "city Velmora"}}',
        '  ```json\n{"tool": "search", "args": {"query": "city Velmora"}}\n```',
        '{"tool": "search", "args": {"query": "city Velmora"}}<|endoftext|> trailing',
    ],
)
def test_parser_accepts_good_calls(text):
    assert parse_call(text) == Call("search", {"query": "city Velmora"})


@pytest.mark.parametrize(
    "text, at",
    [
        ('{"tool": "search", "args": {"query": "x"}}', None),
        ("KING. Enter.", 12),  # no object: the end
        ('{"tool": "search", "args": {"query": ', 37),  # where the JSON stops
        ('{"tool": "search", "args": {"query": "x"}', 41),
        ('{"tool": "fly", "args": {}}', 1),  # the tool
        ('ok {"tool": "search", "args": {"q": "x"}}', 22),  # the arguments
    ],
)
def test_call_error_at_points_at_the_error(text, at):
    assert call_error_at(text) == at


@pytest.mark.parametrize(
    "text, kind, says",
    [
        ("", "unparsable", "no JSON object"),
        ("KING. Enter.", "unparsable", "no JSON object"),
        ('{"tool": "search", "args": {"query": ', "unparsable", "not valid JSON"),
        ('{"tool": "search"}', "unparsable", 'a call is {"tool"'),
        ('{"tool": "fly", "args": {}}', "unknown_tool", "unknown tool 'fly'"),
        ('{"tool": "search", "args": {"q": "x"}}', "bad_args", "search takes arguments ['query']"),
        ('{"tool": "search", "args": "x"}', "bad_args", "got str"),
        ('{"tool": "lookup", "args": {"source": "x", "field": 3}}', "bad_args", "'field' must be a str"),
        ('{"tool": "finish", "args": {"answer": 12}}', "bad_args", "'answer' must be a dict"),
    ],
)
def test_parser_records_broken_calls(text, kind, says):
    err = parse_call(text)
    assert isinstance(err, CallError) and err.kind == kind and says in err.message and err.text == text


# ---- loop --------------------------------------------------------------------------------------


def test_round_limit(task):
    res = run_agent(task, lambda m: format_call("search", {"query": "city"}), max_rounds=4)
    assert (res.success, res.failure, res.rounds, res.tool_calls) == (False, "round_limit", 4, 4)
    assert [m["role"] for m in res.messages[2:4]] == ["assistant", "tool"]


def test_garbage_gets_a_failure_record(task):
    res = run_agent(task, lambda m: "To be, or not to be")
    assert not res.success and res.failure.startswith("unparsable") and res.rounds == 1
    assert res.tool_calls == 0 and res.steps[0].error["kind"] == "unparsable"
    # tolerated errors come back as observations, then the record
    seen = []
    res = run_agent(task, lambda m: seen.append(m[-1]) or '{"tool": "fly", "args": {}}', max_errors=2)
    assert res.failure.startswith("unknown_tool") and res.rounds == 3
    assert seen[1]["role"] == "tool" and "unknown tool" in seen[1]["content"]


def test_token_limit_wrong_answer_and_context_limit(task):
    res = run_agent(
        task, lambda m: Reply(format_call("search", {"query": "x"}), tokens=40, nfe=5), max_tokens=100
    )
    assert (res.failure, res.rounds, res.tokens, res.nfe) == ("token_limit", 3, 120, 15)
    res = run_agent(task, lambda m: format_call("finish", {"answer": {"entity": "Nobody", "value": 1}}))
    assert (res.success, res.failure, res.answer) == (False, "wrong_answer", {"entity": "Nobody", "value": 1})

    def too_long(m):
        raise ContextLimit("prompt too long")

    assert run_agent(task, too_long).failure == "context_limit: prompt too long"
    with pytest.raises(ValueError, match="max_rounds must be >= 1"):
        run_agent(task, too_long, max_rounds=0)


def test_scripted_solver_solves_every_question():
    for t in eval_tasks(25) + train_tasks(25, seed=3):
        script = scripted_trajectory(t)
        steps = []
        res = run_agent(t, replay_policy(script), on_step=steps.append)
        assert res.success and res.failure is None, (t.id, res.failure)
        assert (res.rounds, res.tool_calls) == (6, 6)
        assert [s.call["tool"] for s in steps] == [
            "search",
            "lookup",
            "lookup",
            "calculate",
            "verify",
            "finish",
        ]
        assert res.messages == script  # the script's observations are the loop's


def test_sft_rows_continue_each_other(tmp_path, task):
    from blockdiff.data.corpus import pack_pairs, read_pairs
    from blockdiff.models import bundled_path
    from blockdiff.tokenizer import Tokenizer, byte_tokenizer

    chat = Tokenizer.load(bundled_path("smollm2-nbdiff"))
    for tok in (None, chat):
        rows = sft_pairs(task, tok)
        assert len(rows) == 6 and all(parse_call(r["answer"]) for r in rows)
        for a, b in zip(rows, rows[1:], strict=False):  # training prompt + call = the next prompt's start
            assert b["prompt"].startswith(a["prompt"] + a["answer"])
    assert rows[0]["prompt"] == chat.chat(start_messages(task.question.text))
    assert "<|im_start|>tool" in rows[1]["prompt"]
    out = tmp_path / "sft.jsonl"
    write_sft_data(2, out, tok=chat)
    pairs = read_pairs(out)
    assert len(pairs) == 12
    ids, mask = pack_pairs(byte_tokenizer(), pairs[:2], seq_len=2048)
    assert mask.any(axis=1).all()


def test_render_without_a_template_or_a_tool_role(task):
    from blockdiff.tokenizer import byte_tokenizer

    text = render(start_messages(task.question.text))
    assert text.startswith("### system\n") and text.endswith(f"{task.question.text}\n### assistant\n")
    tok = byte_tokenizer()  # a template that refuses any role but user/assistant
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('role') }}"
        "{% endif %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}]
    assert render([*msgs, {"role": "tool", "content": "o"}], tok) == "[user]q[assistant]c[user]Observation: o"


# ---- a real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from blockdiff.models import load_model

    return load_model("shakespeare-5m")


@pytest.mark.parametrize("sampler", ["ar", "fastdllm"])
def test_tiny_model_ends_in_a_failure_record(tiny, task, sampler):
    model, tok = tiny
    res = run_agent(task, ModelPolicy(model, tok, sampler, max_new_tokens=8), max_rounds=2, max_errors=1)
    assert not res.success and res.failure and res.rounds >= 1
    assert res.tokens > 0 and res.nfe > 0 and res.seconds > 0
    json.dumps(res.as_dict(dialogue=True))  # the record serialises (for eval tables, the page)


@pytest.mark.parametrize("sampler", ["ar", "fastdllm", "bd3"])
def test_constrained_calls_always_parse(tiny, task, sampler):
    """A model that has never seen JSON, decoding under the call schema: every call parses
    (the failure, if any, is the task's, never an unparsable call)."""
    from blockdiff.agent.trajectory import call_schema

    model, tok = tiny
    policy = ModelPolicy(model, tok, sampler, max_new_tokens=48, json_schema=call_schema())
    res = run_agent(task, policy, max_rounds=3)
    calls = [s for s in res.steps if s.round]
    assert calls and all(s.call is not None for s in calls), [s.text for s in calls]
    assert not (res.failure or "").startswith(("unparsable", "unknown_tool", "bad_args")), res.failure


def test_tiny_model_context_limit(tiny, task):
    model, tok = tiny
    res = run_agent(task, ModelPolicy(model, tok, "ar", max_new_tokens=200))
    assert res.failure.startswith("context_limit") and res.rounds == 0


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_agent_data_and_run(tmp_path, capsys):
    from blockdiff.cli import main

    out = tmp_path / "d.jsonl"
    assert main(["agent", "data", "--n", "2", "--out", str(out), "--seed", "4"]) == 0
    assert "12 prompt/answer rows" in capsys.readouterr().out and len(out.read_text().splitlines()) == 12
    argv = ["agent", "run", "--model", "shakespeare-5m", "--sampler", "ar", "--task-seed", "3"]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("task eval:3: Which") and "[1] " in text and "failed: " in text
    assert main(["agent", "data", "--n", "0", "--out", str(out)]) == 2
    # --constrain: the call schema, refused up front when no call fits the budget; with --revise
    assert main([*argv, "--max-new-tokens", "4", "--constrain"]) == 2
    assert "no text of at most 4 tokens" in capsys.readouterr().err
    assert main([*argv, "--max-new-tokens", "40", "--constrain", "--revise", "1", "--max-rounds", "1"]) == 0
    assert '[1] {"tool": "' in capsys.readouterr().out  # the call parsed (it is shown as a call)


def test_revise_redecodes_a_reply_that_is_not_a_call(tiny):
    """ModelPolicy(revise=N): a reply `call_error_at` rejects is remasked and decoded again (more
    forwards than without; what a revision keeps: tests/test_constraint.py)."""
    model, tok = tiny
    plain = ModelPolicy(model, tok, "fastdllm", max_new_tokens=16).decode("ROMEO:", 0)
    again = ModelPolicy(model, tok, "fastdllm", max_new_tokens=16, revise=2).decode("ROMEO:", 0)
    assert call_error_at(plain.text) is not None  # the toy model writes no call
    assert again.nfe > plain.nfe


def test_cli_agent_data_on_a_full_disk_keeps_the_old_file(tmp_path):
    """A write that fails (a file-size limit: the failed write of a full disk) names the file,
    leaves the previous data as it was and no temp file."""
    import resource
    import subprocess
    import sys

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    out = tmp_path / "d.jsonl"
    out.write_text("earlier data\n")
    cmd = [sys.executable, "-m", "blockdiff.cli", "agent", "data", "--n", "40", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert p.returncode == 2 and f"cannot write {out}: File too large" in p.stderr, p.stderr
    assert out.read_text() == "earlier data\n" and sorted(tmp_path.iterdir()) == [out]


# ---- both agents side by side (`agent eval`) ---------------------------------------------------


def _result(task, failure, rounds, calls, tokens, nfe, seconds):
    from blockdiff.agent import AgentResult

    return AgentResult(task, "q", failure is None, failure, None, {}, rounds, calls, tokens, nfe, seconds)


def test_summary_arithmetic_by_hand():
    from blockdiff.agent.evaluate import failure_kind, markdown_table, records, summarize

    rs = [
        _result("eval:0", None, 6, 6, 120, 30, 2.0),
        _result("eval:1", "unparsable: no JSON object in the reply", 1, 0, 10, 10, 0.5),
        _result("eval:2", "bad_args: search takes arguments ['query'], got ['q']", 3, 2, 40, 12, 1.0),
        _result("eval:3", "wrong_answer", 6, 6, 100, 20, 1.5),
        _result("eval:4", "round_limit", 12, 12, 300, 90, 4.0),
    ]
    s = summarize(rs)
    assert s == {
        "tasks": 5,
        "solved": 1,
        "success_rate": 0.2,
        "mean_tool_calls": 5.2,  # (6 + 0 + 2 + 6 + 12) / 5
        "mean_rounds": 5.6,  # (6 + 1 + 3 + 6 + 12) / 5
        "mean_tokens": 114.0,  # 570 / 5
        "mean_nfe": 32.4,  # 162 / 5
        "mean_seconds": 1.8,  # 9 / 5
        "total_seconds": 9.0,
        "failures": {
            "unparsable_call": 2,
            "round_limit": 1,
            "token_limit": 0,
            "wrong_answer": 1,
            "context_limit": 0,
            "model_error": 0,
        },
    }
    kinds = ["token_limit", "context_limit: prompt too long", "model_error: x", "unknown_tool: fly", None]
    assert [failure_kind(f) for f in kinds] == [
        "token_limit",
        "context_limit",
        "model_error",
        "unparsable_call",
        None,
    ]
    table = markdown_table({"ar": s, "diffusion": s}, {"ar": "ar", "diffusion": "fastdllm"})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[1].count("|") == lines[0].count("|") == 12
    assert lines[3].startswith(
        "| diffusion | fastdllm | 1/5 | 20.0 % | 5.20 | 5.60 | 114.0 | 32.4 | 1.80 | 9.0 |"
    )
    assert lines[3].endswith("| unparsable_call 2, round_limit 1, wrong_answer 1 |")
    recs = records({"ar": rs[:2], "diffusion": rs[2:4]})
    assert [(r["agent"], r["task"]) for r in recs] == [
        ("ar", "eval:0"),
        ("diffusion", "eval:2"),
        ("ar", "eval:1"),
        ("diffusion", "eval:3"),
    ]
    with pytest.raises(ValueError, match="no results"):
        summarize([])


def test_evaluate_agents_interleaves_held_out_tasks():
    from blockdiff.agent.evaluate import evaluate_agents, summarize

    scripts = {t.question.text: scripted_trajectory(t) for t in eval_tasks(3)}

    def scripted(msgs):  # the scripted solver, on whichever task it is asked
        turns = [m["content"] for m in scripts[msgs[1]["content"]] if m["role"] == "assistant"]
        return turns[sum(m["role"] == "assistant" for m in msgs)]

    order = []
    out = evaluate_agents(
        {"ar": scripted, "diffusion": lambda m: "KING. Enter."},
        3,
        on_result=lambda name, r: order.append((name, r.task)),
    )
    assert order == [(a, f"eval:{k}") for k in range(3) for a in ("ar", "diffusion")]
    assert summarize(out["ar"])["success_rate"] == 1.0
    s = summarize(out["diffusion"])
    assert s["solved"] == 0 and s["failures"]["unparsable_call"] == 3
    for n in (0, world_mod.EVAL_POOL + 1):
        with pytest.raises(ValueError, match="n must be between 1 and 500"):
            evaluate_agents({"ar": scripted}, n)


def _timeless(d: dict) -> dict:
    """A record without its wall times (the only thing two runs of one task may differ in)."""
    return {**d, "seconds": None, "steps": [{**s, "seconds": None} for s in d["steps"]]}


def test_evaluate_agents_on_a_tiny_model_equals_run_agent(tiny):
    from blockdiff.agent.evaluate import evaluate_agents

    model, tok = tiny
    policies = {"ar": ModelPolicy(model, tok, "ar", 4), "diffusion": ModelPolicy(model, tok, "fastdllm", 4)}
    out = evaluate_agents(policies, 2, max_rounds=2, max_errors=1)
    for name, results in out.items():
        assert [r.task for r in results] == ["eval:0", "eval:1"]
        for k, r in enumerate(results):
            alone = run_agent(make_task("eval", k), policies[name], 2, 2048, 1)
            assert _timeless(r.as_dict()) == _timeless(alone.as_dict()), (name, k)
            assert r.tokens > 0 and r.nfe > 0 and r.seconds > 0


def test_cli_agent_eval(tmp_path, capsys):
    from blockdiff.agent.evaluate import summarize
    from blockdiff.cli import main

    out = tmp_path / "eval.json"
    argv = ["agent", "eval", "--model", "shakespeare-5m", "--n", "2", "--max-new-tokens", "4"]
    assert main([*argv, "--max-rounds", "2", "--threshold", "0.8", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "held-out tasks eval:0..1" in cap.out and "torch threads" in cap.out
    assert "| agent | sampler | solved |" in cap.out and "| ar | ar | 0/2 |" in cap.out
    assert "| diffusion | fastdllm | 0/2 |" in cap.out
    assert "[diffusion] eval:1: failed" in cap.err
    doc = json.loads(out.read_text())
    assert [(r["agent"], r["task"]) for r in doc["records"]] == [
        ("ar", "eval:0"),
        ("diffusion", "eval:0"),
        ("ar", "eval:1"),
        ("diffusion", "eval:1"),
    ]
    assert doc["agents"]["ar"] == {"model": "shakespeare-5m", "sampler": "ar", "options": {}}
    assert doc["agents"]["diffusion"]["options"] == {"threshold": 0.8}
    assert doc["machine"]["torch_threads"] >= 1 and doc["limits"]["max_rounds"] == 2
    for agent in ("ar", "diffusion"):
        from blockdiff.agent import AgentResult

        rs = [
            AgentResult(**{k: v for k, v in r.items() if k != "agent"})
            for r in doc["records"]
            if r["agent"] == agent
        ]
        assert doc["summary"][agent] == summarize(rs)
    assert main([*argv, "--json", "--max-rounds", "1"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {
        "tasks",
        "machine",
        "limits",
        "seed",
        "agents",
        "summary",
    }


@pytest.mark.parametrize(
    "args, says",
    [
        (["--n", "0"], "n must be between 1 and 500"),
        (["--n", "501"], "n must be between 1 and 500"),
        (["--n", "1", "--max-rounds", "0"], "max_rounds must be >= 1"),
        (["--n", "1", "--diffusion-sampler", "ar"], "needs a diffusion sampler"),
        (["--n", "1", "--diffusion-sampler", "bd4"], "unknown sampler 'bd4'"),
        (["--n", "1", "--steps", "3"], "does not take steps"),
    ],
)
def test_cli_agent_eval_refuses_clearly(args, says, capsys):
    from blockdiff.cli import main

    assert main(["agent", "eval", "--model", "shakespeare-5m", "--max-new-tokens", "4", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blockdiff agent: error: ") and says in err
