"""Constrained decoding: a regular language (a regex, or a JSON schema compiled to one) as a token
automaton, and the policy that commits a token only if the canvas, holes and all, can still be
completed into a text of the language.

A diffusion canvas is not a prefix: committed tokens stand anywhere, masked holes between them.
The canvas can be completed iff some path of the automaton reads it, each hole standing for any
one token. Forward sets F_i (states the automaton can be in before column i; a hole steps to
every successor) and backward sets G_i (states from which columns i.. can still end accepting)
decide it exactly: a token t fits hole i iff trans(s, t) is in G_{i+1} for some s in F_i. EOS
ends the text (allowed only where the automaton accepts; only EOS may follow it), and a canvas
that runs out must end accepting. One commit that fits keeps the canvas completable; the commits
of one step are admitted together when they are jointly completable, else one by one by
confidence (the most confident always fits), so a step never commits a dead end.

The character automaton comes from `interegular` (regex parsing) and JSON schemas are compiled to
regexes by `outlines_core`; the token table is walked here for every state at once in numpy.
outlines-core's own token index is not used: it drops transitions out of accepting states
(docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

INSTALL = "structured output needs `pip install 'blockdiff[structured]'` (interegular, outlines-core)"
JSON_WHITESPACE = r"[ ]?"  # between JSON tokens: what a chat model writes, and no runaway padding
JSON_DEPTH = 2  # nesting of a free-form `json_object`: deeper makes the automaton slow to build
VERSION = 2  # of the on-disk automata: bump when the table's rules change


def _libs():
    try:
        import interegular
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ValueError(INSTALL) from e
    return interegular, build_regex_from_schema


def schema_text(schema: Any) -> str:
    """A JSON schema (a dict or JSON text) as JSON text, checked to be an object; the key order
    kept (it is the order the answer must follow). Hashable: a `DecodeSpec` option."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e.msg} at character {e.pos}") from e
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}")
    return json.dumps(schema)


def schema_regex(schema: dict | str) -> str:
    """The regex of a JSON schema (`{"type": "object"}` alone: any JSON object, nested to
    `JSON_DEPTH`)."""
    _, build = _libs()
    text = schema_text(schema)
    try:
        return build(text, JSON_WHITESPACE, JSON_DEPTH)
    except Exception as e:  # outlines-core raises its own error types
        raise ValueError(f"json_schema cannot be compiled: {e}") from e


@functools.lru_cache(maxsize=32)
def char_fsm(pattern: str):
    """interegular's minimal character automaton of `pattern` (a ValueError if it does not parse)."""
    interegular, _ = _libs()
    try:
        return interegular.parse_pattern(pattern).to_fsm().reduce()
    except Exception as e:
        raise ValueError(f"regex {pattern!r} cannot be compiled: {e or type(e).__name__}") from e


@functools.lru_cache(maxsize=4)
def token_texts(tokenizer) -> list[str | None]:
    """Each token's text (None: a special token, or bytes that are not whole UTF-8 characters,
    which a constraint never allows)."""
    hf = tokenizer.hf
    special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    texts: list[str | None] = []
    for i in range(tokenizer.vocab_size):
        t = None if i in special else hf.decode([i], skip_special_tokens=False)
        texts.append(None if not t or "\ufffd" in t else t)
    return texts


class TokenAutomaton:
    """A regular language over a tokenizer's tokens: states 0..n-3 of the character automaton,
    then DONE (after EOS) and DEAD; tokens grouped into classes with equal transitions."""

    def __init__(self, trans: np.ndarray, token_class: np.ndarray, finals: np.ndarray, start: int):
        self.trans, self.token_class, self.start = trans, token_class, start
        self.n = trans.shape[0]
        self.done, self.dead = self.n - 2, self.n - 1
        self.accept_end = finals.copy()
        self.accept_end[self.done] = True
        reach = np.zeros((self.n, self.n), dtype=bool)
        reach[np.repeat(np.arange(self.n), trans.shape[1]), trans.ravel()] = True
        reach[:, self.dead] = False  # sets never hold DEAD
        self.reach = reach.astype(np.float32)
        self._tail: list[np.ndarray] = [self.accept_end]  # G after m trailing holes
        self.class_t = torch.from_numpy(token_class.astype(np.int64))

    @classmethod
    def build(cls, pattern: str, tokenizer) -> TokenAutomaton:
        """Once per (pattern, tokenizer) in a process, and cached on disk across processes (a
        nested object's character automaton takes interegular seconds)."""
        return _cached(pattern, tokenizer)

    def arrays(self) -> dict[str, np.ndarray]:
        finals = self.accept_end[:-2]  # the character automaton's (DONE is added on load)
        return {
            "trans": self.trans,
            "token_class": self.token_class,
            "finals": finals,
            "start": np.array(self.start),
        }

    def classes(self, toks: np.ndarray) -> np.ndarray:
        """Token ids to classes (ids past the tokenizer's vocabulary: never allowed)."""
        V, never = len(self.token_class), self.trans.shape[1] - 1
        return np.where(toks < V, self.token_class[np.minimum(toks, V - 1)], never)

    def tail(self, m: int) -> np.ndarray:
        """G before m trailing holes: the states from which m tokens can end accepting."""
        while len(self._tail) <= m:
            self._tail.append((self.reach @ self._tail[-1]) > 0)
        return self._tail[m]

    def fits(self, length: int) -> bool:
        """Some text of at most `length` tokens (then EOS or the canvas end) is in the language."""
        return bool(self.tail(length)[self.start])


@functools.lru_cache(maxsize=4)
def _fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()


@functools.lru_cache(maxsize=16)
def _cached(pattern: str, tokenizer) -> TokenAutomaton:
    from ..data.cache import cache_dir

    key = hashlib.sha256(f"{VERSION}\0{pattern}\0{_fingerprint(tokenizer)}".encode()).hexdigest()
    f = cache_dir() / "automata" / f"{key}.npz"
    try:
        z = np.load(f)
        finals = np.concatenate([z["finals"], [False, False]])
        return TokenAutomaton(z["trans"], z["token_class"], finals, int(z["start"]))
    except (OSError, KeyError, ValueError, EOFError):  # absent or damaged: build it again
        pass
    auto = _build(pattern, tokenizer)
    with contextlib.suppress(OSError):  # a read-only cache only costs the time to rebuild
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **auto.arrays())
        os.replace(tmp, f)
    return auto


def _build(pattern: str, tokenizer) -> TokenAutomaton:
    fsm = char_fsm(pattern)
    states = sorted(fsm.states)
    idx = {s: i for i, s in enumerate(states)}
    S = len(states)
    K = len(fsm.alphabet.by_transition)
    sink, stay, bad = S, K, K + 1  # char-level: sink state, padding symbol, unknown character
    D = np.full((S + 1, K + 2), sink, dtype=np.int32)
    for s, row in fsm.map.items():
        for sym, nxt in row.items():
            D[idx[s], sym] = idx[nxt]
    D[:, stay] = np.arange(S + 1)
    texts = token_texts(tokenizer)
    V = len(texts)
    chars = sorted({ch for t in texts if t for ch in t})
    sym = {ch: (s if (s := fsm.alphabet[ch]) is not None else bad) for ch in chars}
    ok = [i for i, t in enumerate(texts) if t]
    first: dict[tuple, int] = {}  # distinct symbol sequences (tokens that read alike)
    inv = np.array(
        [first.setdefault(tuple(sym[ch] for ch in texts[i]), len(first)) for i in ok], dtype=np.int64
    )
    lens = np.array([len(q) for q in first], dtype=np.int64)
    width = int(lens.max(initial=1))
    useqs = np.full((len(first), width), stay, dtype=np.int32)
    for row, q in enumerate(first):
        useqs[row, : len(q)] = q
    order = np.argsort(-lens, kind="stable")  # longest first: step only those still reading
    lens = lens[order]
    ends = np.empty((S, len(useqs)), dtype=np.int32)  # state after each distinct symbol sequence
    cur = np.repeat(np.arange(S, dtype=np.int32)[:, None], len(useqs), 1)
    for p in range(width):
        m = int((lens > p).sum())
        cur[:, :m] = D[cur[:, :m], useqs[order[:m], p][None, :]]
    ends[:, order] = cur
    # classes: distinct columns of the token table; then EOS, then every token never allowed
    cols, col_class = _unique_columns(ends)
    C = cols.shape[1]
    eos_c, never_c = C, C + 1
    token_class = np.full(V, never_c, dtype=np.int32)
    token_class[np.array(ok, dtype=np.int64)] = col_class[inv]
    token_class[tokenizer.eos_id] = eos_c
    n = S + 2
    done, dead = S, S + 1
    trans = np.full((n, C + 2), dead, dtype=np.int32)
    trans[:S, :C] = np.where(cols == sink, dead, cols)
    finals = np.zeros(n, dtype=bool)
    finals[[idx[f] for f in fsm.finals]] = True
    trans[:S, eos_c] = np.where(finals[:S], done, dead)
    trans[done, eos_c] = done
    return TokenAutomaton(trans, token_class, finals, idx[fsm.initial])


def _unique_columns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct columns, index of each column's), by hashing: numpy's sort of wide rows is slow."""
    first: dict[bytes, int] = {}
    t = np.ascontiguousarray(a.T)
    inv = np.array([first.setdefault(row.tobytes(), len(first)) for row in t], dtype=np.int64)
    keep = np.zeros(len(first), dtype=np.int64)
    keep[inv] = np.arange(len(inv))
    return a[:, keep], inv


@dataclass
class Constrain:
    """The constraint policy of a plan: masks what cannot be completed, admits commits that keep
    the canvas completable. `pattern` is the regex; `bind` builds its token automaton."""

    pattern: str
    source: str = "regex"  # what the user gave: regex or json_schema (for messages)
    auto: TokenAutomaton | None = field(default=None, repr=False)

    def bind(self, tokenizer) -> Constrain:
        return Constrain(self.pattern, self.source, TokenAutomaton.build(self.pattern, tokenizer))

    def check_fits(self, length: int) -> None:
        if not self.auto.fits(length):
            raise ValueError(f"no text of at most {length} tokens matches the {self.source} constraint")

    # ---- the canvas row as the automaton reads it ----

    def _row(self, c, r: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(first generation column, token classes, holes) of row r's answer."""
        g = int(c.start[r])
        e = int(c.valid[r].nonzero()[-1]) + 1 if bool(c.valid[r].any()) else g
        e = max(e, g)
        toks = c.tokens[r, g:e].numpy()
        return g, self.auto.classes(toks), c.masked[r, g:e].numpy()

    def _prefix(self, cls: np.ndarray, holes: np.ndarray) -> tuple[int, int]:
        """(first hole f, the one state before it): the committed prefix is read deterministically."""
        a, s = self.auto, self.auto.start
        f = int(np.argmax(holes)) if holes.any() else len(holes)
        for k in cls[:f].tolist():
            s = int(a.trans[s, k])
        return f, s

    def _backward(self, cls: np.ndarray, holes: np.ndarray, lo: int) -> list[np.ndarray]:
        """G_lo .. G_n (index i - lo): trailing holes from the cache, the rest column by column."""
        a, n = self.auto, len(cls)
        last = np.flatnonzero(~holes)
        h = max(int(last[-1]) + 1 if len(last) else 0, lo)
        back = [a.tail(n - h)]  # G_h, then G_{h-1} .. G_lo
        for i in range(h - 1, lo - 1, -1):
            nxt = back[-1]
            back.append((a.reach @ nxt) > 0 if holes[i] else nxt[a.trans[:, cls[i]]])
        return back[::-1] + [a.tail(n - i) for i in range(h + 1, n + 1)]

    def _completable(self, cls: np.ndarray, holes: np.ndarray) -> bool:
        f, s = self._prefix(cls, holes)
        return s != self.auto.dead and bool(self._backward(cls, holes, f)[0][s])

    # ---- the policy ----

    def mask(self, c, r: int, cols: Tensor, logits: Tensor) -> Tensor:
        """Logits [n, V] of row r at canvas columns `cols` (holes), with every token that no
        completion of the canvas keeps set to -inf."""
        a = self.auto
        g, cls, holes = self._row(c, r)
        at = (cols - g).tolist()
        f, s = self._prefix(cls, holes)
        G = self._backward(cls, holes, f)
        F = np.zeros(a.n, dtype=np.float32)
        F[s] = 1.0
        allowed = np.zeros((len(at), a.trans.shape[1]), dtype=bool)
        want = {p: j for j, p in enumerate(at)}
        for i in range(f, max(at) + 1):
            if i in want:
                states = np.flatnonzero(F)
                allowed[want[i]] = G[i + 1 - f][a.trans[states]].any(0)
            if holes[i]:
                F = ((F @ a.reach) > 0).astype(np.float32)
            else:
                nxt = np.zeros_like(F)
                nxt[a.trans[np.flatnonzero(F), cls[i]]] = 1.0
                nxt[a.dead] = 0.0
                F = nxt
        return _apply(logits, torch.from_numpy(allowed), a.class_t)

    def admit(self, c, r: int, cols: Tensor, toks: Tensor, conf: Tensor) -> Tensor:
        """Indices of the proposed commits (row r) to keep: all when jointly completable, else
        greedily by confidence, each kept only if the canvas stays completable."""
        g, cls, holes = self._row(c, r)
        at, k = (cols - g).numpy(), self.auto.classes(toks.numpy())
        cls, holes = cls.copy(), holes.copy()
        cls[at], holes[at] = k, False
        if len(at) <= 1 or self._completable(cls, holes):
            return torch.arange(len(at))
        cls[at], holes[at] = 0, True
        keep = []
        for j in conf.argsort(descending=True).tolist():
            cls[at[j]], holes[at[j]] = k[j], False
            if self._completable(cls, holes):
                keep.append(j)
            else:
                holes[at[j]] = True
        return torch.tensor(sorted(keep), dtype=torch.long)

    def cursor(self, c, r: int, col: int) -> Cursor:
        """Left to right from column `col` (everything before it committed, everything after it a
        hole): masks one column at a time, fed the token chosen for it."""
        g, cls, holes = self._row(c, r)
        _, s = self._prefix(cls[: col - g], holes[: col - g])
        return Cursor(self.auto, s, len(cls) - (col - g))


class Cursor:
    """The automaton's one state on a left-to-right path, and the columns left after it."""

    def __init__(self, auto: TokenAutomaton, state: int, left: int):
        self.auto, self.state, self.left = auto, state, left

    def mask(self, logits: Tensor) -> Tensor:
        """Logits [V] of the next column, every token with no completion set to -inf."""
        a = self.auto
        if self.state == a.dead or self.left <= 0:  # past the canvas or a rejected branch: unread
            return logits
        ok = a.tail(self.left - 1)[a.trans[self.state]]
        return _apply(logits[None], torch.from_numpy(ok)[None], a.class_t)[0]

    def feed(self, tok: int) -> None:
        a = self.auto
        self.state, self.left = int(a.trans[self.state, a.classes(np.array(tok))]), self.left - 1


def _apply(logits: Tensor, allowed_cls: Tensor, class_t: Tensor) -> Tensor:
    V = logits.shape[-1]
    cls = (
        class_t if V == len(class_t) else torch.cat([class_t, class_t.new_full((V - len(class_t),), -1)])[:V]
    )
    never = allowed_cls.new_zeros((allowed_cls.shape[0], 1))
    ok = torch.cat([allowed_cls, never], 1)[:, cls]  # class -1 (beyond the tokenizer): never
    return logits.masked_fill(~ok, float("-inf"))


def constraint_of(options: dict[str, Any]) -> Constrain | None:
    """The `regex` / `json_schema` / `grammar` decode options as a constraint (None: none given)."""
    regex, schema = options.pop("regex", None), options.pop("json_schema", None)
    grammar = options.pop("grammar", None)
    if sum(x is not None for x in (regex, schema, grammar)) > 1:
        raise ValueError("give one constraint: regex, json_schema or grammar")
    if grammar is not None:
        from .grammar import grammar_regex

        pattern = grammar_regex(grammar)
        char_fsm(pattern)
        return Constrain(pattern, "grammar")
    if regex is not None:
        char_fsm(regex)
        return Constrain(regex, "regex")
    if schema is not None:
        pattern = schema_regex(schema)
        char_fsm(pattern)
        return Constrain(pattern, "json_schema")
    return None
