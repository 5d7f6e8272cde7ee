"""Constrained decoding: the token automaton against Python's `re`, the hole-aware masks and
admissions against brute-force enumeration of every valid answer, every sampler's output in the
language over many seeds, and clear errors for constraints that cannot be met."""

import itertools
import json
import random
import re

import numpy as np
import pytest
import torch

from blockdiff.decoding import generate
from blockdiff.decoding.canvas import Canvas
from blockdiff.decoding.constraint import Constrain, TokenAutomaton, schema_regex

SAMPLERS = ["ar", "bd3", "mdlm", "llada", "fastdllm", "dcd", "structural"]  # spec: tests/test_spec.py
CASES = [(r"(ab|ba)+c?", "abc"), (r"a[bc]{1,3}d?", "abcd"), (r"(x|yz)*y", "xyz")]


def _accepts(auto: TokenAutomaton, ids: list[int]) -> bool:
    s = auto.start
    for k in auto.classes(np.array(ids, dtype=np.int64)).tolist():
        s = int(auto.trans[s, k])
    return bool(auto.accept_end[s])


def test_automaton_accepts_what_re_fullmatches(tok):
    """Byte tokens, random strings over the regex's characters: accepted iff re.fullmatch —
    including the transitions out of accepting states that outlines-core's index drops."""
    rng = random.Random(0)
    for pattern, alphabet in [*CASES, (r"[0-9]{1,4}( [+*-] [0-9]{1,4}){0,3}", "0123 +*-x")]:
        auto = TokenAutomaton.build(pattern, tok)
        for _ in range(400):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
            assert _accepts(auto, tok.encode(s)) == bool(re.fullmatch(pattern, s)), (pattern, s)
    auto = TokenAutomaton.build("(ab)+", tok)
    assert _accepts(auto, tok.encode("abab"))  # "a" after the accepting "ab" is kept


def test_schema_automaton_on_real_tokens_agrees_with_re():
    """SmolLM2's BPE tokens (multi-character, leading spaces) over a JSON schema's regex: a text's
    tokens are accepted iff the regex fullmatches the text; EOS only where it accepts."""
    from blockdiff.models import bundled_path
    from blockdiff.tokenizer import Tokenizer

    tok = Tokenizer.load(bundled_path("smollm2-nbdiff"))
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    pattern = schema_regex(schema)
    auto = TokenAutomaton.build(pattern, tok)
    rng = random.Random(1)
    texts = ['{"name": "Anna", "age": 31}', '{ "name":"Bo b","age":-7 }', '{"name": "x\\"y", "age": 0}']
    for _ in range(300):
        t = rng.choice(texts)
        i = rng.randrange(len(t) + 1)
        texts.append(t[:i] + rng.choice(['"', " ", "1", "}", "", "a", ","]) + t[i + 1 :])
    for t in texts:
        ok = bool(re.fullmatch(pattern, t))
        assert _accepts(auto, tok.encode(t)) == ok, t
        assert _accepts(auto, tok.encode(t) + [tok.eos_id]) == ok
    digits = TokenAutomaton.build(r"[0-9]{1,4}( [+*-] [0-9]{1,4}){0,3}", tok)
    assert _accepts(digits, tok.encode("12 + 7"))  # " " after the accepting "12" (outlines-core drops it)


class Brute:
    """The same policy read off every valid answer of n tokens, enumerated (the oracle): a hole
    may hold a token iff some valid answer agrees with the canvas and holds it there."""

    def __init__(self, pattern: str, alphabet: str, tok, n: int):
        ids = [tok.encode(ch)[0] for ch in alphabet] + [tok.eos_id]
        self.n, self.eos = n, tok.eos_id
        seqs = []
        for s in itertools.product(ids, repeat=n):
            j = s.index(tok.eos_id) if tok.eos_id in s else n
            if all(x == tok.eos_id for x in s[j:]) and re.fullmatch(pattern, tok.decode(s[:j])):
                seqs.append(s)
        self.seqs = np.array(seqs, dtype=np.int64).reshape(-1, n)

    def check_fits(self, length):
        if len(self.seqs) == 0:
            raise ValueError("no text fits")

    def _agree(self, c, r, fixed=()):
        g = int(c.start[r])
        toks, held = c.tokens[r, g : g + self.n].numpy().copy(), ~c.masked[r, g : g + self.n].numpy()
        for col, t in fixed:
            if col - g < self.n:  # a draft past the canvas end is never committed
                toks[col - g], held[col - g] = t, True
        return self.seqs[(self.seqs[:, held] == toks[held]).all(1)], g

    def _masked(self, logits, cands):
        out = torch.full_like(logits, float("-inf"))
        for j, vs in enumerate(cands):
            vs = torch.tensor(sorted(set(vs)), dtype=torch.long)
            out[j, vs] = logits[j, vs]
        return out

    def mask(self, c, r, cols, logits):
        seqs, g = self._agree(c, r)
        return self._masked(logits, [seqs[:, k - g].tolist() for k in cols.tolist()])

    def admit(self, c, r, cols, toks, conf):
        props = list(zip(cols.tolist(), toks.tolist(), strict=True))
        if len(self._agree(c, r, props)[0]):
            return torch.arange(len(props))
        keep = []
        for j in conf.argsort(descending=True).tolist():
            if len(self._agree(c, r, [props[i] for i in keep] + [props[j]])[0]):
                keep.append(j)
        return torch.tensor(sorted(keep), dtype=torch.long)

    def cursor(self, c, r, col):
        return BruteCursor(self, c, r, col)


class BruteCursor:
    def __init__(self, brute, c, r, col):
        self.b, self.c, self.r, self.col, self.fed = brute, c, r, col, []

    def mask(self, logits):
        seqs, g = self.b._agree(self.c, self.r, self.fed)
        k = self.col + len(self.fed) - g
        if len(seqs) == 0 or k >= self.b.n:
            return logits
        return self.b._masked(logits[None], [seqs[:, k].tolist()])[0]

    def feed(self, tok):
        self.fed.append((self.col + len(self.fed), tok))


def _canvas(tok, n, rng):
    c = Canvas.build([tok.encode("ab")], n, tok.mask_id, tok.eos_id, tok.pad_id)
    return c


@pytest.mark.parametrize("pattern,alphabet", CASES)
def test_masks_and_admissions_equal_brute_force(tok, pattern, alphabet):
    """Random canvases (committed tokens anywhere, holes between): the mask at every hole and
    the admitted subset of random proposals equal the enumeration's."""
    n, rng = 6, random.Random(2)
    brute = Brute(pattern, alphabet, tok, n)
    con = Constrain(pattern).bind(tok)
    V = tok.vocab_size
    checked = 0
    for _ in range(150):
        c = _canvas(tok, n, rng)
        g = c.G
        seq = brute.seqs[rng.randrange(len(brute.seqs))]  # commit a valid answer's tokens: stay completable
        for i in range(n):
            if rng.random() < 0.4:
                c.tokens[0, g + i], c.masked[0, g + i] = int(seq[i]), False
        cols = c.masked[0].nonzero().flatten()
        if len(cols) == 0:
            continue
        logits = torch.randn(len(cols), V)
        want, got = brute.mask(c, 0, cols, logits), con.mask(c, 0, cols, logits)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (pattern, c.tokens[0, g:].tolist())
        prop = torch.stack(
            [torch.multinomial(torch.isfinite(want[j]).float(), 1)[0] for j in range(len(cols))]
        )
        conf = torch.rand(len(cols), dtype=torch.float64)
        assert torch.equal(con.admit(c, 0, cols, prop, conf), brute.admit(c, 0, cols, prop, conf))
        checked += 1
    assert checked > 100


def _tiny(make_model, tok):
    model = make_model(tok)
    model.eval()
    return model


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("pattern,alphabet", CASES[:2])
def test_every_sampler_equals_the_brute_force_policy(
    make_model, tok, monkeypatch, sampler, pattern, alphabet
):
    """The engine with the constraint decodes exactly as with the enumeration in its place
    (greedy and sampled, several prompts in one batch), and every answer is in the language."""
    model, n = _tiny(make_model, tok), 6
    prompts = ["Shall I", "To be, or not", "O"]
    kw = {"block_size": 2} if sampler in ("bd3", "llada", "fastdllm", "dcd") else {}
    for temp in (0.0, 1.0):
        if sampler not in ("dcd", "structural"):
            kw["temperature"] = temp
        real = generate(model, tok, prompts, sampler, max_new_tokens=n, seed=3, regex=pattern, **kw)
        monkeypatch.setattr(Constrain, "bind", lambda self, t: Brute(pattern, alphabet, t, n))
        brute = generate(model, tok, prompts, sampler, max_new_tokens=n, seed=3, regex=pattern, **kw)
        monkeypatch.undo()
        assert real.tokens == brute.tokens, (sampler, temp)
        assert all(re.fullmatch(pattern, t) for t in real.texts), real.texts


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_many_seeds_every_output_in_the_language(make_model, tok, sampler):
    """512 sampled answers per sampler (batches of 64 rows, each its own seed): all match."""
    model = _tiny(make_model, tok)
    pattern = r"(the|a) (king|sea)( is (dead|here))?\."
    kw = {"block_size": 4} if sampler in ("bd3", "llada", "fastdllm", "dcd") else {}
    if sampler not in ("dcd", "structural"):
        kw["temperature"] = 1.0
    bad = []
    for seed in range(8):
        out = generate(
            model, tok, ["The king is"] * 64, sampler, max_new_tokens=24, seed=seed, regex=pattern, **kw
        )
        bad += [t for t in out.texts if not re.fullmatch(pattern, t)]
    assert not bad, bad[:5]


def test_batched_equals_alone(make_model, tok):
    model = _tiny(make_model, tok)
    prompts = ["Shall I compare", "O", "Rough winds"]
    kw = dict(max_new_tokens=12, regex=r"[a-z ]{3,10}\.", temperature=1.0, seed=[5, 6, 7])
    both = generate(model, tok, prompts, "fastdllm", block_size=4, **kw)
    for r, p in enumerate(prompts):
        one = generate(model, tok, [p], "fastdllm", block_size=4, **{**kw, "seed": [kw["seed"][r]]})
        assert one.tokens[0] == both.tokens[r]


def test_clear_errors(make_model, tok):
    model = _tiny(make_model, tok)
    with pytest.raises(ValueError, match="no text of at most 8 tokens"):
        generate(model, tok, ["O"], "ar", max_new_tokens=8, regex="a{20}")
    with pytest.raises(ValueError, match="cannot be compiled"):
        generate(model, tok, ["O"], "ar", max_new_tokens=8, regex="a(")
    with pytest.raises(ValueError, match="give one constraint"):
        generate(model, tok, ["O"], "ar", max_new_tokens=8, regex="a", json_schema={"type": "string"})
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        generate(model, tok, ["O"], "ar", max_new_tokens=8, json_schema="{nope")
    with pytest.raises(ValueError, match="blanks"):
        generate(model, tok, ["O <|mask|> x"], "llada", max_new_tokens=8, regex="a+")
    with pytest.raises(ValueError, match="regex must be a non-empty string"):
        generate(model, tok, ["O"], "ar", max_new_tokens=8, regex="")


def test_json_schema_output_parses(make_model, tok):
    """A schema on a model that never saw JSON: the answer still parses and has the fields."""
    model = _tiny(make_model, tok)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 3}},
        "required": ["n", "s"],
    }
    out = generate(model, tok, ["O"] * 8, "fastdllm", max_new_tokens=40, json_schema=schema, temperature=1.0)
    for t in out.texts:
        obj = json.loads(t)
        assert isinstance(obj["n"], int) and isinstance(obj["s"], str) and len(obj["s"]) <= 3


# ---- revision on a checker's rejection ---------------------------------------------------------


def _first(ch):
    return lambda text: text.index(ch) if ch in text else None


@pytest.mark.parametrize("sampler", ["ar", "bd3", "fastdllm", "llada"])
def test_recheck_remasks_only_around_the_error_and_is_bounded(make_model, tok, sampler):
    """A checker that rejects an 'e': rows it accepts decode exactly as without it; a rejected
    row changes only the remasked tokens (the one at the error and `span` around it, NFEs
    counted), and at most `check_rounds` revisions run."""
    model = _tiny(make_model, tok)
    prompts = ["Shall I compare", "The king is", "O", "To be, or not"]
    kw = dict(max_new_tokens=16, seed=1, trace=True, stop_at_eos=False, temperature=1.0)
    kw |= {"block_size": 4} if sampler != "ar" else {}
    plain = generate(model, tok, prompts, sampler, **kw)
    out = generate(model, tok, prompts, sampler, check=_first("e"), check_rounds=2, **kw)
    rejected = 0
    for r, text in enumerate(plain.texts):
        if "e" not in text:
            assert out.tokens[r] == plain.tokens[r] and out.rows[r].nfe == plain.rows[r].nfe
            continue
        rejected += 1
        remasked = {k for e in out.canvas.trace for (row, k) in e.get("remasked", []) if row == r}
        assert 0 < len(remasked) <= 2 * (1 + 4)  # two rounds of (error token + span)
        g = int(out.canvas.start[r])
        same = [i for i in range(16) if g + i not in remasked]
        assert [out.tokens[r][i] for i in same] == [plain.tokens[r][i] for i in same]
        assert out.rows[r].nfe > plain.rows[r].nfe
    assert rejected  # the test has power: some drafts contain an 'e'
    never = generate(model, tok, prompts[:1], sampler, check=lambda t: 0, check_rounds=3, **kw)
    rounds = {e["step"] for e in never.canvas.trace if "remasked" in e}
    assert len(rounds) == 3


def test_recheck_keeps_the_constraint_and_extends_an_early_end(make_model, tok):
    """A checker asking for more than the regex's minimum: the EOS reopens, and the revised
    answer still matches the regex."""
    model = _tiny(make_model, tok)
    pattern = r"(the|a) (king|sea)( is (dead|here))?\."
    out = generate(
        model,
        tok,
        ["The king is"] * 6,
        "fastdllm",
        block_size=4,
        max_new_tokens=24,
        seed=2,
        temperature=1.0,
        regex=pattern,
        check=lambda t: None if " is " in t else len(t),
        check_rounds=3,
    )
    assert all(re.fullmatch(pattern, t) for t in out.texts), out.texts
    assert sum(" is " in t for t in out.texts) >= 4, out.texts


def test_recheck_bad_rounds(make_model, tok):
    with pytest.raises(ValueError, match="check_rounds"):
        generate(
            _tiny(make_model, tok), tok, ["O"], "ar", max_new_tokens=4, check=lambda t: None, check_rounds=0
        )


def test_automata_cached_on_disk_equal_a_fresh_build(tok, tmp_path, monkeypatch):
    """The on-disk copy loads as the same automaton; a damaged one is rebuilt, not trusted."""
    from blockdiff.decoding import constraint as cm

    monkeypatch.setenv("BLOCKDIFF_CACHE", str(tmp_path))
    cm._cached.cache_clear()
    fresh = cm._build(CASES[0][0], tok)
    first = TokenAutomaton.build(CASES[0][0], tok)
    (f,) = (tmp_path / "automata").glob("*.npz")
    cm._cached.cache_clear()
    again = TokenAutomaton.build(CASES[0][0], tok)
    for a in (first, again):
        for k, v in fresh.arrays().items():
            assert np.array_equal(a.arrays()[k], v), k
    f.write_bytes(b"not an npz")
    cm._cached.cache_clear()
    rebuilt = TokenAutomaton.build(CASES[0][0], tok)
    assert np.array_equal(rebuilt.trans, fresh.trans) and f.stat().st_size > 100
    cm._cached.cache_clear()
