"""A context-free grammar (Lark's EBNF) as a regular expression, recursion bounded to a depth.

Lark parses the grammar (rules, terminals, `%import common`, `%ignore`); this module only
translates its syntax tree into one regex that interegular turns into the automaton every
constraint uses (`constraint.py`), so a grammar gets the hole-aware commits of a regex. The
translation is exact for texts whose derivation re-enters no rule more than `depth` times along
any path (`a: "(" a ")" | "x"` at depth 3: up to three parentheses deep); repetition (`*`, `+`)
is unbounded, as in a regex. Deeper texts are outside the constraint, never wrongly inside.
The language is the grammar's own, terminals being the sets of strings their patterns match:
what Lark's Earley parser with `lexer="dynamic_complete"` parses. Lark's default lexers match
greedily, so where terminals overlap (`NAME NAME` with `NAME: /[ab]+/`) they reject texts of
the language (`ab`).
"""

from __future__ import annotations

import ast
import re

DEPTH = 4  # re-entries of one rule along a derivation path (nesting depth)
MAX_REGEX = 200_000  # characters: a deeper unrolling than this is refused, not built
# Lark's `common.ESCAPED_STRING` is written with a lookbehind, which no automaton library compiles.
# Its lazy pattern ends a string at the first quote no odd run of backslashes escapes, so Lark's
# lexers take as one ESCAPED_STRING exactly: a quote, then characters other than quote, backslash
# and newline or a backslash and any character but a newline, then a quote (tested against Lark).
SAME_WITHOUT_LOOKBEHIND = {r'"(?:.*?)(?:(?<!\\)(\\\\)*?)"': r'"(?:[^"\\\n]|\\[^\n])*"'}


def grammar_regex(text: str, depth: int = DEPTH) -> str:
    """The regex of the grammar's `start` rule at nesting `depth` (a ValueError naming what is
    wrong: Lark's syntax error, an unsupported construct, no text within the depth)."""
    try:
        from lark.load_grammar import GrammarBuilder
    except ImportError as e:  # pragma: no cover - in the structured extra
        raise ValueError("grammars need lark: pip install 'blockdiff[structured]'") from e
    gb = GrammarBuilder()
    try:
        gb.load_grammar(text)
        g = gb.build()
    except Exception as e:  # Lark's GrammarError / UnexpectedInput
        raise ValueError(f"grammar cannot be read: {e}") from None
    rules = {str(name): tree for name, params, tree, _ in g.rule_defs if not params}
    if len(rules) != len(g.rule_defs):
        raise ValueError("grammar templates (rules with parameters) are not supported")
    terms = {str(name): tree for name, (tree, _) in g.term_defs}
    if "start" not in rules:
        raise ValueError("the grammar has no `start` rule")
    tr = _Translate(rules, terms, [str(t) for t in g.ignore], depth)
    out = tr.rule("start", {})
    if out is None:
        raise ValueError(f"the grammar derives no text within nesting depth {depth}")
    ign = tr.ignored()
    return f"{ign}{out}{ign}"


class _Translate:
    def __init__(self, rules: dict, terms: dict, ignore: list[str], depth: int):
        self.rules, self.terms, self.depth = rules, terms, depth
        self.cache: dict[str, str] = {}
        self.ign = "|".join(self.term(t) for t in ignore)

    def ignored(self) -> str:
        return f"(?:{self.ign})*" if self.ign else ""

    def term(self, name: str) -> str:
        if name not in self.cache:
            if name not in self.terms:
                raise ValueError(f"unknown terminal {name}")
            body = self.tree(self.terms[name], {}, terminal=True)
            self.cache[name] = "(?:" + SAME_WITHOUT_LOOKBEHIND.get(body, body) + ")"
        return self.cache[name]

    def rule(self, name: str, seen: dict) -> str | None:
        if seen.get(name, 0) >= self.depth:
            return None
        if name not in self.rules:
            raise ValueError(f"unknown rule {name}")
        return self.tree(self.rules[name], {**seen, name: seen.get(name, 0) + 1}, terminal=False)

    def tree(self, t, seen: dict, terminal: bool) -> str | None:
        """The regex of a node (None: no text within the depth)."""
        from lark import Token
        from lark.grammar import NonTerminal, Terminal

        if isinstance(t, NonTerminal):
            return self.rule(t.name, seen)
        if isinstance(t, Terminal):
            return self.term(t.name)
        if isinstance(t, Token):
            return self.literal(t)
        kind, kids = t.data, t.children
        if kind == "expansions":
            alts = [a for a in (self.tree(k, seen, terminal) for k in kids) if a is not None]
            return None if not alts else alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if kind == "expansion":
            parts = [self.tree(k, seen, terminal) for k in kids]
            if any(p is None for p in parts):
                return None
            out = (self.ignored() if not terminal else "").join(parts)
            if len(out) > MAX_REGEX:
                why = f"unrolled to nesting depth {self.depth}, the grammar exceeds {MAX_REGEX} characters"
                raise ValueError(why)
            return out
        if kind in ("value", "alias"):
            return self.tree(kids[0], seen, terminal)
        if kind == "literal":
            return self.literal(kids[0])
        if kind == "maybe":
            inner = self.tree(kids[0], seen, terminal)
            return "" if inner is None else f"(?:{inner})?"
        if kind == "range":
            a, b = (ast.literal_eval(str(k)) for k in kids)
            return f"[{re.escape(a)}-{re.escape(b)}]"
        if kind == "expr":
            inner = self.tree(kids[0], seen, terminal)
            sep = self.ignored() if not terminal else ""
            if len(kids) == 2 and str(kids[1]) in "?*+":
                op = str(kids[1])
                if inner is None:
                    return "" if op in "?*" else None
                if op == "?":
                    return f"(?:{inner})?"
                return f"(?:{inner}(?:{sep}{inner})*)" + ("?" if op == "*" else "")
            lo, hi = int(kids[2]), int(kids[-1])  # [atom, "~", n] or [atom, "~", n, m]
            if inner is None:
                return "" if lo == 0 else None
            return f"(?:{inner}){{{lo},{hi}}}" if not sep else self._repeat(inner, sep, lo, hi)
        raise ValueError(f"grammar construct {kind!r} is not supported")

    def _repeat(self, inner: str, sep: str, lo: int, hi: int) -> str:
        one = f"{inner}(?:{sep}{inner}){{{max(lo - 1, 0)},{hi - 1}}}"
        return f"(?:{one})" if lo else f"(?:{one})?"

    def literal(self, tok) -> str:
        s = str(tok)
        if tok.type == "REGEXP":
            body, flags = s[1 : s.rindex("/")], s[s.rindex("/") + 1 :]
            if flags:
                raise ValueError(f"regex flags {flags!r} in {s} are not supported")
            return f"(?:{body})"
        flags = s[s.rindex('"') + 1 :]
        if flags:
            raise ValueError(f"string flags {flags!r} in {s} are not supported")
        return re.escape(ast.literal_eval(s[: s.rindex('"') + 1]))
