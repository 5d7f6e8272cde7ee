"""The shared toolbox: plain Python functions over one task's world.

Both agents (AR and diffusion) call exactly these, so any difference between them is the
model's, not the tools'. Every tool returns a JSON-able dict; a tool that cannot do what it was
asked returns {"error": "..."} saying what was wrong and what to do, which the agent sees as its
observation (a tool error is part of the task, not a crash).

* `search(query)` — BM25 (the `bm25s` library) over the entities' descriptions; top 5 hits.
* `lookup(source, field)` — one attribute of one entity.
* `calculate(expression)` — arithmetic through an AST whitelist; never `eval`/`exec`.
* `verify(claim)` — checks {"source": name, field: value, ...} against the world.
* `finish(answer)` — the final answer {"entity": name, "value": number}; the loop checks it.
"""

from __future__ import annotations

import ast
import operator
import re

from ..config import ConfigError
from .world import World

TOP_K = 5
MAX_EXPRESSION = 200  # characters
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10**300

# tool name -> {argument: type}; every argument is required and no other is accepted
SIGNATURES: dict[str, dict[str, type]] = {
    "search": {"query": str},
    "lookup": {"source": str, "field": str},
    "calculate": {"expression": str},
    "verify": {"claim": dict},
    "finish": {"answer": dict},
}
TOOLS = tuple(SIGNATURES)


def words(text: str) -> list[str]:
    """BM25 terms: lower-case alphanumeric runs (names are single invented words)."""
    return re.findall(r"[a-z0-9]+", text.casefold())


class CalcError(ValueError):
    """An expression the calculator refuses, with the reason."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expression: str) -> int | float:
    """Evaluate numbers, + - * / **, parentheses and unary minus; refuse everything else.

    The expression is parsed with `ast` and walked node by node: only the whitelisted node types
    are evaluated, so names, calls, attributes, subscripts or strings can never run. Exponents
    are bounded (|e| <= MAX_EXPONENT) and so is every intermediate result, so no input can make
    the calculator hang or exhaust memory."""
    if not isinstance(expression, str):
        raise CalcError('the expression must be a string, e.g. "12 * 34"')
    if len(expression) > MAX_EXPRESSION:
        raise CalcError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalcError(f"not an arithmetic expression: {expression!r}") from None
    try:
        return _value(tree.body)
    except OverflowError:
        raise CalcError(f"result larger than 1e{len(str(MAX_MAGNITUDE)) - 1}") from None


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalcError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (*_BINOPS, ast.Pow)):
        a, b = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(b) > MAX_EXPONENT:
                raise CalcError(f"exponent {b} too large (at most {MAX_EXPONENT} in absolute value)")
            if a == 0 and b < 0:
                raise CalcError("division by zero (0 to a negative power)")
            r = a**b
            if isinstance(r, complex):
                raise CalcError("a negative number to a fractional power has no real value")
        elif isinstance(node.op, ast.Div) and b == 0:
            raise CalcError("division by zero")
        else:
            r = _BINOPS[type(node.op)](a, b)
        if abs(r) > MAX_MAGNITUDE:
            raise CalcError(f"result larger than 1e{len(str(MAX_MAGNITUDE)) - 1}")
        return r
    what = {
        ast.Call: "function calls are not allowed",
        ast.Attribute: "attribute access is not allowed",
        ast.Name: f"names are not allowed (got '{getattr(node, 'id', '')}'): use numbers only",
    }.get(type(node), f"'{type(node).__name__}' is not allowed: use numbers, + - * / ** and parentheses")
    raise CalcError(what)


def _number(v: int | float) -> int | float:
    """Integral floats as ints (6000.0 -> 6000); others rounded to 10 significant digits."""
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 2**53:
            return int(v)
        return float(f"{v:.10g}")
    return v


class Toolbox:
    """The five tools over one world. `call(name, args)` runs one with checked arguments."""

    def __init__(self, world: World):
        try:
            import bm25s
        except ImportError:
            raise ConfigError("the agent's search tool needs bm25s: pip install 'blockdiff[agent]'") from None

        self.world = world
        self._bm25 = bm25s.BM25()
        self._bm25.index([words(e.name + " " + e.description()) for e in world.entities], show_progress=False)

    def search(self, query: str) -> dict:
        terms = words(query)
        if not terms:
            return {"error": "empty query: search for words, e.g. a kind and the values you know"}
        k = min(TOP_K, len(self.world.entities))
        docs, scores = self._bm25.retrieve([terms], k=k, show_progress=False)
        hits = [self.world.entities[int(i)] for i, s in zip(docs[0], scores[0], strict=True) if s > 0]
        return {"results": [{"source": e.name, "text": e.description()} for e in hits]}

    def finds(self, query: str, name: str) -> bool:
        """Whether `search(query)` returns the entity `name` (used to keep questions solvable)."""
        return any(r["source"] == name for r in self.search(query).get("results", []))

    def lookup(self, source: str, field: str) -> dict:
        e = self.world.get(source)
        if e is None:
            return {"error": f"no source named '{source}': use a name exactly as search returned it"}
        if field not in e.fields:
            return {"error": f"{e.name} has no field '{field}'; its fields: {', '.join(e.fields)}"}
        return {"source": e.name, "field": field, "value": e.fields[field]}

    def calculate(self, expression: str) -> dict:
        try:
            return {"result": _number(calculate(expression))}
        except CalcError as err:
            return {"error": f"calculate refused: {err}"}

    def verify(self, claim: dict) -> dict:
        source = claim.get("source")
        e = self.world.get(source) if isinstance(source, str) else None
        if e is None:
            return {"error": 'a claim names its entity: {"source": NAME, FIELD: VALUE, ...}'}
        facts = {k: v for k, v in claim.items() if k != "source"}
        if not facts:
            return {"error": 'the claim states no field: {"source": NAME, FIELD: VALUE, ...}'}
        unknown = [k for k in facts if k not in e.fields]
        if unknown:
            return {"error": f"{e.name} has no field {unknown[0]!r}; its fields: {', '.join(e.fields)}"}
        wrong = {k: e.fields[k] for k, v in facts.items() if not _same(v, e.fields[k])}
        return {"verified": not wrong, **({"actual": wrong} if wrong else {})}

    def finish(self, answer: dict) -> dict:
        return {"done": True, "answer": answer}

    def call(self, tool: str, args: dict) -> dict:
        """Run a tool whose name and arguments `trajectory.check_call` accepted."""
        return getattr(self, tool)(**args)


def _same(claimed: object, actual: str | int) -> bool:
    if isinstance(actual, int):
        try:
            return not isinstance(claimed, bool) and float(claimed) == actual  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
    return isinstance(claimed, str) and " ".join(claimed.split()).casefold() == actual.casefold()
