"""What a constraint costs and what it buys: every left-to-right and block sampler on the shipped
model, with and without a JSON schema, on the same prompts in one run (interleaved).

For each row: answers that parse and fit the schema, NFEs, wall time, and the time spent inside
the constraint policy (masks, admissions, cursors) per forward, as a share of the step.

    python benchmarks/constraint.py [--repeats 2] [--max-new-tokens 64] [--extract 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from blockdiff.agent import make_task
from blockdiff.agent.trajectory import SYSTEM, call_schema, parse_call
from blockdiff.decoding import constraint as con_mod
from blockdiff.decoding import generate
from blockdiff.models import load_model

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
}
PEOPLE = [("Anna", 31, "Lyon"), ("Tomas", 45, "Brno"), ("Keiko", 27, "Osaka"), ("Ruth", 62, "Leeds")]
QUESTIONS = ["Which company has the largest area?", "What is the population of Velmora times its area?"]
SAMPLERS = [("ar", {}), ("spec", {}), ("fastdllm B=4", {"block_size": 4}), ("bd3 B=4", {"block_size": 4})]

SPENT = {"s": 0.0}


def timed(fn):
    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            SPENT["s"] += time.perf_counter() - t

    return wrap


def _obj(text: str) -> dict | None:
    try:
        o = json.loads(text)
    except json.JSONDecodeError:
        return None
    return o if isinstance(o, dict) else None


def fits_person(text: str) -> tuple[bool, float | None]:
    o = _obj(text)
    ok = o is not None and all(
        isinstance(o.get(k), t) for k, t in (("name", str), ("age", int), ("city", str))
    )
    return ok, None


def extraction(n: int) -> list[tuple[str, dict, dict]]:
    """(text, schema, truth) from the agent's held-out worlds: an entity's description and its
    numbers in words, to be extracted into {name, every field}."""
    out = []
    for k in range(n):
        e = make_task("eval", k).world.entities[(7 * k) % 30]
        facts = " ".join(f"Its {f} is {v}." for f, v in e.fields.items() if isinstance(v, int))
        truth = {"name": e.name, **e.fields}
        props = {f: {"type": "integer" if isinstance(v, int) else "string"} for f, v in truth.items()}
        schema = {"type": "object", "properties": props, "required": list(props)}
        out.append((f"{e.description()} {facts}", schema, truth))
    return out


def field_accuracy(truth: dict):
    def score(text: str) -> tuple[bool, float]:
        o = _obj(text)
        if o is None:
            return False, 0.0
        same = [str(o.get(f, "")).strip().casefold() == str(v).casefold() for f, v in truth.items()]
        return set(o) == set(truth), sum(same) / len(same)

    return score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--extract", type=int, default=8, help="extraction items (held-out worlds)")
    ap.add_argument(
        "--json-whitespace", default=None, help="JSON whitespace regex [constraint.JSON_WHITESPACE]"
    )
    a = ap.parse_args()
    if a.json_whitespace is not None:  # the decision it measures: docs/decisions.md
        con_mod.JSON_WHITESPACE = a.json_whitespace
    for name in ("mask", "admit"):
        setattr(con_mod.Constrain, name, timed(getattr(con_mod.Constrain, name)))
    con_mod.Cursor.mask = timed(con_mod.Cursor.mask)
    model, tok = load_model("smollm2-nbdiff", a.dtype)
    # (task, [(prompt, schema, scorer)]): a scorer returns (valid, field accuracy or None)
    tasks = [
        (
            "person",
            [
                (
                    tok.chat(
                        f"Write {n}'s details as JSON with keys name, age, city: {n} is {y} and lives in {c}."
                    ),
                    PERSON,
                    fits_person,
                )
                for n, y, c in PEOPLE
            ],
        ),
        (
            "tool call",
            [
                (
                    tok.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]),
                    call_schema(),
                    lambda t: (not hasattr(parse_call(t), "kind"), None),
                )
                for q in QUESTIONS
            ],
        ),
        (
            "extraction",
            [
                (
                    tok.chat(f"Extract the facts as JSON with keys {', '.join(sc['properties'])}: {text}"),
                    sc,
                    field_accuracy(truth),
                )
                for text, sc, truth in extraction(a.extract)
            ],
        ),
    ]
    t0 = time.perf_counter()
    for _, items in tasks:  # build (and cache) the automata before timing
        for _, schema, _ in items:
            generate(model, tok, ["x"], "ar", max_new_tokens=a.max_new_tokens, json_schema=schema)
    print(f"automata built in {time.perf_counter() - t0:.1f} s (cached afterwards)")
    rows: dict[tuple, list] = {}
    for _ in range(a.repeats):
        for task, items in tasks:
            for label, kw in SAMPLERS:
                for p, schema, score in items:
                    for constrained in (False, True):
                        extra = {"json_schema": schema} if constrained else {}
                        SPENT["s"] = 0.0
                        t = time.perf_counter()
                        out = generate(
                            model, tok, [p], label.split()[0], max_new_tokens=a.max_new_tokens, **kw, **extra
                        )
                        wall = time.perf_counter() - t
                        r = rows.setdefault((task, label, constrained), [])
                        r.append((*score(out.texts[0]), out.rows[0].nfe, wall, SPENT["s"]))
    load = os.getloadavg()
    print(
        f"command: python benchmarks/constraint.py --repeats {a.repeats} --max-new-tokens {a.max_new_tokens} "
        f"--dtype {a.dtype} --extract {a.extract}"
        + (f" --json-whitespace '{a.json_whitespace}'" if a.json_whitespace is not None else "")
    )
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average {load}")
    print(
        "| task | sampler | constraint | valid | field accuracy | NFEs (mean) | wall s (median) "
        "| constraint ms / forward | share of the step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (task, label, constrained), r in rows.items():  # r: (valid, accuracy, nfe, wall, spent)
        nfe = sum(x[2] for x in r)
        spent, wall = sum(x[4] for x in r), sum(x[3] for x in r)
        acc = "–" if r[0][1] is None else f"{100 * sum(x[1] for x in r) / len(r):.1f} %"
        print(
            f"| {task} | {label} | {'schema' if constrained else '–'} | {sum(x[0] for x in r)}/{len(r)} | "
            f"{acc} | {nfe / len(r):.1f} | {statistics.median(x[3] for x in r):.2f} | "
            f"{1000 * spent / nfe:.2f} | {100 * spent / wall:.1f} % |"
        )


if __name__ == "__main__":
    main()
