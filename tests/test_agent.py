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
from blockdiff.agent import world as world_mod
from blockdiff.agent.tools import CalcError
from blockdiff.agent.trajectory import format_call, sft_pairs, start_messages
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
    monkeypatch.setattr(world_mod, "_held_out_questions", lambda: frozenset({first.question.text}))
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
    from blockdiff.checkpoint import load_model

    return load_model("shakespeare-5m")


@pytest.mark.parametrize("sampler", ["ar", "fastdllm"])
def test_tiny_model_ends_in_a_failure_record(tiny, task, sampler):
    model, tok = tiny
    res = run_agent(task, ModelPolicy(model, tok, sampler, max_new_tokens=8), max_rounds=2, max_errors=1)
    assert not res.success and res.failure and res.rounds >= 1
    assert res.tokens > 0 and res.nfe > 0 and res.seconds > 0
    json.dumps(res.as_dict(dialogue=True))  # the record serialises (for eval tables, the page)


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
