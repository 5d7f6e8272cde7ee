"""One trajectory format, its parser, the scripted solver and the SFT data it writes.

Format: a dialogue of {role, content} messages. The system turn lists the tools, the user turn
asks the question; then each assistant turn is exactly one JSON tool call

    {"tool": "lookup", "args": {"source": "Velmora", "field": "area"}}

and the tool's result comes back as a "tool" turn holding its JSON. The dialogue is rendered with
the model's chat template where it has one (`Tokenizer.chat`), else as plain "### role" blocks.
A model decodes one call per round, so SFT rows are (dialogue so far, next call) pairs: the
format `blockdiff train` reads (`data/corpus.py: read_pairs`), loss on the call and its EOS only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import atomic_file
from ..tokenizer import Tokenizer
from .tasks import train_tasks
from .tools import SIGNATURES, TOOLS, Toolbox
from .world import Task, search_query

SYSTEM = (
    "You answer questions about an invented world by calling tools. Each turn, reply with exactly "
    'one JSON object {"tool": NAME, "args": {...}}. Tools: search(query), lookup(source, field), '
    "calculate(expression), verify(claim: {source, FIELD: VALUE}), finish(answer: {entity, value})."
)
OBSERVATION = "tool"  # the role of a tool's result (as "user" for templates that refuse it)


@dataclass
class Call:
    tool: str
    args: dict


@dataclass
class CallError:
    """Why a model's turn is not a usable call: `kind` is unparsable, unknown_tool or bad_args."""

    kind: str
    message: str
    text: str


def format_call(tool: str, args: dict) -> str:
    return json.dumps({"tool": tool, "args": args}, ensure_ascii=False)


def format_observation(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False)


def start_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def render(messages: list[dict[str, str]], tok: Tokenizer | None = None) -> str:
    """The dialogue as the prompt a model continues (ending where the assistant speaks)."""
    if tok is not None and tok.chat_template:
        from jinja2 import TemplateError

        try:
            return tok.chat(messages)
        except TemplateError:  # a template that allows only user/assistant turns: observations as user
            as_user = [
                {"role": "user", "content": f"Observation: {m['content']}"} if m["role"] == OBSERVATION else m
                for m in messages
            ]
            return tok.chat(as_user)
    return "".join(f"### {m['role']}\n{m['content']}\n" for m in messages) + "### assistant\n"


def call_schema() -> dict:
    """The JSON schema of one call (what constrained decoding enforces): one of the tools with its
    arguments, in the format's order. A claim is any object ({source, FIELD: VALUE}: its fields
    vary), an answer {entity, value}; `parse_call` still checks the rest."""
    text = {"type": "string"}
    kinds = {str: text, dict: {"type": "object"}}
    args = {name: {k: kinds[t] for k, t in sig.items()} for name, sig in SIGNATURES.items()}
    args["finish"] = {
        "answer": {
            "type": "object",
            "properties": {"entity": text, "value": {"type": "number"}},
            "required": ["entity", "value"],
        }
    }
    one = [
        {
            "type": "object",
            "required": ["tool", "args"],
            "properties": {
                "tool": {"const": name},
                "args": {"type": "object", "properties": a, "required": list(a)},
            },
        }
        for name, a in args.items()
    ]
    return {"anyOf": one}


def parse_call(text: str) -> Call | CallError:
    """A model's turn as a checked call, or a record of why not.

    Lenient where it costs nothing (surrounding whitespace, a ```json fence, text after the
    object: decoding may run past the call), strict about the call itself: a JSON object with
    a known "tool" and exactly that tool's arguments of the right types."""
    s = text.strip()
    start = s.find("{")  # skips a ```json fence or a lead-in
    if start < 0:
        return CallError("unparsable", "no JSON object in the reply", text)
    try:
        obj, _ = json.JSONDecoder().raw_decode(s[start:])
    except json.JSONDecodeError as e:
        return CallError("unparsable", f"not valid JSON ({e.msg} at character {e.pos})", text)
    if not isinstance(obj, dict) or set(obj) != {"tool", "args"}:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        return CallError("unparsable", f'a call is {{"tool": NAME, "args": {{...}}}}, got {got}', text)
    tool, args = obj["tool"], obj["args"]
    if tool not in TOOLS:
        return CallError("unknown_tool", f"unknown tool {tool!r}; tools: {', '.join(TOOLS)}", text)
    sig = SIGNATURES[tool]
    if not isinstance(args, dict) or set(args) != set(sig):
        got = sorted(args) if isinstance(args, dict) else type(args).__name__
        return CallError("bad_args", f"{tool} takes arguments {sorted(sig)}, got {got}", text)
    for name, typ in sig.items():
        if not isinstance(args[name], typ):
            return CallError("bad_args", f"{tool}: '{name}' must be a {typ.__name__}", text)
    return Call(tool, args)


def call_error_at(text: str) -> int | None:
    """Where a reply stops being a usable call (a character offset for `generate(check=...)`),
    None when it parses: the JSON error's position, or the start of the tool name or arguments
    that are wrong, or the end when there is no object at all."""
    got = parse_call(text)
    if isinstance(got, Call):
        return None
    start = text.find("{")
    if start < 0:
        return len(text)
    if got.kind == "unparsable":
        try:
            json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError as e:
            return start + e.pos
        return start
    at = text.find('"args"' if got.kind == "bad_args" else '"tool"', start)
    return at if at >= 0 else start


def scripted_calls(task: Task) -> list[Call]:
    """A correct solution's calls: search, lookup C, lookup D, calculate, verify, finish.

    The values come from the world (the script knows it); `replay` checks that the tools give
    the same, so the trajectory is exactly what an agent reading the observations would write."""
    q = task.question
    e = task.world.get(q.entity)
    assert e is not None
    c, d = q.product
    return [
        Call("search", {"query": search_query(q.kind, q.constraints)}),
        Call("lookup", {"source": e.name, "field": c}),
        Call("lookup", {"source": e.name, "field": d}),
        Call("calculate", {"expression": f"{e.fields[c]} * {e.fields[d]}"}),
        Call("verify", {"claim": {"source": e.name, **q.constraints}}),
        Call("finish", {"answer": {"entity": e.name, "value": q.value}}),
    ]


def scripted_trajectory(task: Task, box: Toolbox | None = None) -> list[dict[str, str]]:
    """The whole dialogue of the scripted solver, observations produced by the real tools."""
    box = box or Toolbox(task.world)
    msgs = start_messages(task.question.text)
    for call in scripted_calls(task):
        msgs.append({"role": "assistant", "content": format_call(call.tool, call.args)})
        if call.tool != "finish":
            msgs.append({"role": OBSERVATION, "content": format_observation(box.call(call.tool, call.args))})
    return msgs


def sft_pairs(task: Task, tok: Tokenizer | None = None) -> list[dict[str, str]]:
    """One {prompt, answer} row per assistant turn: the dialogue before it, rendered, and the call."""
    msgs = scripted_trajectory(task)
    return [
        {"prompt": render(msgs[:i], tok), "answer": m["content"]}
        for i, m in enumerate(msgs)
        if m["role"] == "assistant"
    ]


def write_sft_data(n: int, out: str | Path, seed: int = 0, tok: Tokenizer | None = None) -> int:
    """SFT JSONL from n training tasks (6 rows each), held-out evaluation tasks excluded.
    Render with the tokenizer of the model to be trained (its chat template). Returns the rows."""
    if n < 1:
        raise ValueError(f"n must be >= 1 (the number of tasks), got {n}")
    out = Path(out)
    rows = 0
    with atomic_file(out) as f:
        for task in train_tasks(n, seed):
            for row in sft_pairs(task, tok):
                f.write(json.dumps({**row, "task": task.id}, ensure_ascii=False) + "\n")
                rows += 1
    return rows
