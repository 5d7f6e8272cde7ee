"""Grammars (Lark EBNF) as constraints: the translation against Lark's own parser on every short
string, recursion bounded to the stated depth, every sampler's answers parse, clear errors."""

import itertools
import re

import pytest

from blockdiff.decoding import generate
from blockdiff.decoding.constraint import char_fsm
from blockdiff.decoding.grammar import grammar_regex

lark = pytest.importorskip("lark")

LIST = r"""
start: item ("," item)*
item: WORD | NUMBER | "[" [start] "]"
WORD: /[ab]+/
NUMBER: "1"
%ignore " "
"""


def strings(alphabet: str, n: int):
    for k in range(n + 1):
        yield from ("".join(t) for t in itertools.product(alphabet, repeat=k))


def entries(tree, rule: str = "start") -> int:
    """How many times `rule` is entered along the deepest path of a parse tree."""
    kids = [entries(k, rule) for k in tree.children if isinstance(k, lark.Tree)]
    return (tree.data == rule) + max(kids, default=0)


def parse(parser, text: str):
    try:
        return parser.parse(text)
    except lark.exceptions.LarkError:
        return None


def parses(parser, text: str) -> bool:
    return parse(parser, text) is not None


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_language_equals_larks_within_the_depth(depth):
    """Every string of up to 6 characters over the grammar's alphabet: in the regex (and in the
    character automaton the constraint builds) exactly when Lark parses it and its parse tree
    enters `start` at most `depth` times along any path."""
    pattern = grammar_regex(LIST, depth)
    fsm, parser = char_fsm(pattern), lark.Lark(LIST, parser="lalr")
    seen = 0
    for s in strings("ab1,[] ", 6):
        tree = parse(parser, s)
        want = tree is not None and entries(tree) <= depth
        assert bool(re.fullmatch(pattern, s)) == want, (s, depth)
        assert fsm.accepts(s) == want, (s, depth)
        seen += want
    assert seen > 100  # the test has power: many strings are in the language


def test_repetition_is_unbounded_and_recursion_is_not():
    pattern = grammar_regex('start: "a" start "b" | "c"', 3)  # a^n c b^n, n < 3
    assert [n for n in range(6) if re.fullmatch(pattern, "a" * n + "c" + "b" * n)] == [0, 1, 2]
    assert re.fullmatch(grammar_regex(LIST, 1), ",".join(["ab"] * 40))
    cases = [('start: "a" ~ 2..3', [2, 3]), ('start: "a" ~ 2', [2]), ('start: ("a" "b"?) ~ 0..1', [0, 1])]
    for g, lengths in cases:
        pattern = grammar_regex(g)
        assert [n for n in range(6) if re.fullmatch(pattern, "a" * n)] == lengths, g


def test_overlapping_terminals_follow_the_grammar_not_a_greedy_lexer():
    """Terminals are the strings their patterns match: `ab` is NAME NAME, as Lark's Earley parser
    with the complete dynamic lexer finds (its greedy lexers reject it)."""
    g = 'start: NAME NAME\nNAME: /[ab]+/\n%ignore " "'
    pattern, parser = grammar_regex(g), lark.Lark(g, lexer="dynamic_complete")
    for s in strings("ab ", 5):
        assert bool(re.fullmatch(pattern, s)) == parses(parser, s), s
    assert re.fullmatch(pattern, "ab")


def test_larks_escaped_string_is_the_same_language_without_its_lookbehind():
    """`common.ESCAPED_STRING` (written with a lookbehind): every string of up to 6 characters
    over quote, backslash, a letter and a newline, against Lark's own parser."""
    g = "start: ESCAPED_STRING\n%import common.ESCAPED_STRING\n"
    pattern, parser = grammar_regex(g), lark.Lark(g, lexer="dynamic_complete")
    fsm, seen = char_fsm(pattern), 0
    for s in strings('"\\a\n', 6):
        want = parses(parser, s)
        assert bool(re.fullmatch(pattern, s)) == want and fsm.accepts(s) == want, s
        seen += want
    assert seen > 20 and re.fullmatch(pattern, r'"a\"b\\"') and not re.fullmatch(pattern, '"a\\"')


@pytest.mark.parametrize("sampler", ["ar", "bd3", "mdlm", "llada", "fastdllm", "dcd", "structural"])
def test_every_sampler_answers_parse(make_model, tok, sampler):
    """256 sampled answers per sampler under a recursive grammar (a tiny model that never saw it)."""
    model = make_model(tok).eval()
    grammar = r"""
start: call
call: NAME "(" [arg ("," arg)*] ")"
arg: NUMBER | call
NAME: "f" | "g"
NUMBER: /[0-9]/
"""
    parser = lark.Lark(grammar, lexer="dynamic_complete")
    kw = {"block_size": 4} if sampler in ("bd3", "llada", "fastdllm", "dcd") else {}
    if sampler not in ("dcd", "structural"):
        kw["temperature"] = 1.0
    bad = []
    for seed in range(4):
        out = generate(model, tok, ["O"] * 64, sampler, max_new_tokens=16, seed=seed, grammar=grammar, **kw)
        bad += [t for t in out.texts if not parses(parser, t)]
    assert not bad, bad[:5]


@pytest.mark.parametrize(
    "grammar, words",
    [
        ('start: "a" (', "cannot be read"),
        ('item: "a"', "no `start` rule"),
        ('start: "a" start', "derives no text within nesting depth"),
        ('start: "a"i', "string flags"),
        ("start: /a/i", "regex flags"),
        ('start: x{"a"}\n_x{t}: t', "cannot be read|templates"),
    ],
)
def test_clear_errors(make_model, tok, grammar, words):
    with pytest.raises(ValueError, match=words):
        generate(make_model(tok).eval(), tok, ["O"], "ar", max_new_tokens=4, grammar=grammar)
