"""Decoding oracles: cache = recomputation, batched = unbatched, B=1 = greedy AR, NFE accounting."""

import math

import pytest
import torch

from blockdiff import masks
from blockdiff.decoding import generate
from blockdiff.decoding import runner as runner_mod
from blockdiff.model import token_logits

PROMPTS = ["The king", "O", "Shall I compare thee"]


def greedy_ar(model, tok, prompt, n):
    """Reference: greedy decoding by repeated full causal forwards, no cache, no engine."""
    ids = torch.tensor([tok.encode(prompt)])
    for _ in range(n):
        L = ids.shape[1]
        out = model(ids, mask=masks.block_causal(L, 1))
        pred = token_logits(out, model.config)  # shifted: row L-1 would be token L-1; need next
        nxt = out[0, -1] if model.config.shifted else None
        if nxt is None:  # aligned: append a mask and read its own row
            x = torch.cat([ids, torch.tensor([[tok.mask_id]])], 1)
            nxt = token_logits(model(x, mask=masks.block_causal(L + 1, 1)), model.config)[0, -1]
        else:
            nxt = nxt.clone()
            nxt[tok.mask_id] = float("-inf")
        del pred
        ids = torch.cat([ids, nxt.argmax().view(1, 1)], 1)
    return ids[0, -n:].tolist()


@pytest.mark.parametrize("logits", ["shifted", "aligned"])
def test_ar_equals_greedy_full_forward(make_model, tok, logits):
    m = make_model(tok, logits=logits, block_sizes=(1,))
    for p in PROMPTS:
        out = generate(m, tok, p, sampler="ar", max_new_tokens=12, stop_at_eos=False)
        assert out.tokens[0] == greedy_ar(m, tok, p, 12)
        assert out.rows[0].nfe == 12


class _Spy:
    """Compare every cached forward's logits with a fresh no-cache recomputation."""

    def __init__(self, monkeypatch):
        self.max_diff, self.calls = 0.0, 0
        orig = runner_mod.Runner.logits

        def spy(run, lo, hi, frontier=0, end=None):
            got = orig(run, lo, hi, frontier, end)
            if run.mode == "exact":
                ref = runner_mod.Runner(run.model, run.c, True, "none").logits(lo, hi, frontier, end)
                finite = torch.isfinite(ref)
                self.max_diff = max(self.max_diff, float((got[finite] - ref[finite]).abs().max()))
                self.calls += 1
            return got

        monkeypatch.setattr(runner_mod.Runner, "logits", spy)


@pytest.mark.parametrize("logits", ["aligned", "shifted"])
@pytest.mark.parametrize(
    "sampler,kw",
    [
        ("bd3", dict(block_size=4, order="confidence", temperature=0.0, steps=2)),
        ("dcd", dict(block_size=8, window=3, threshold=0.5)),
        ("ar", {}),
    ],
)
def test_exact_cache_equals_recomputation(make_model, tok, monkeypatch, sampler, kw, logits):
    sizes = (1,) if sampler == "ar" else (4, 8, "L")
    m = make_model(tok, logits=logits, block_sizes=sizes)
    nocache = generate(
        m, tok, PROMPTS, sampler=sampler, max_new_tokens=16, cache="none", stop_at_eos=False, **kw
    )
    spy = _Spy(monkeypatch)
    cached = generate(
        m, tok, PROMPTS, sampler=sampler, max_new_tokens=16, cache="exact", stop_at_eos=False, **kw
    )
    assert cached.tokens == nocache.tokens
    assert spy.calls > 0 and spy.max_diff <= 1e-5
    assert [r.nfe for r in cached.rows] == [r.nfe for r in nocache.rows]


@pytest.mark.parametrize(
    "sampler,kw",
    [
        ("bd3", dict(block_size=4, order="confidence", temperature=0.0)),
        ("llada", dict(block_size=8, steps=8)),
        ("fastdllm", dict(block_size=8, cache="dual")),
        ("dcd", dict(block_size=8)),
        ("mdlm", dict(temperature=0.0, steps=8)),
        ("structural", dict(block_size=4, order="confidence", temperature=0.0)),
    ],
)
def test_batched_equals_unbatched(make_model, tok, sampler, kw):
    m = make_model(tok)
    # Make one row stop early: declare as EOS a token the model emits often for the first prompt.
    probe = generate(m, tok, PROMPTS[0], sampler=sampler, max_new_tokens=16, stop_at_eos=False, **kw)
    eos_tok = tok.eos_id
    tok.eos_id = probe.tokens[0][5]
    try:
        batched = generate(m, tok, PROMPTS, sampler=sampler, max_new_tokens=16, seed=[5, 6, 7], **kw)
        alone = [
            generate(m, tok, p, sampler=sampler, max_new_tokens=16, seed=[5 + i], **kw)
            for i, p in enumerate(PROMPTS)
        ]
    finally:
        tok.eos_id = eos_tok
    assert batched.rows[0].stopped_at_eos and batched.rows[0].tokens < 16
    for i, a in enumerate(alone):
        assert batched.tokens[i] == a.tokens[0], f"row {i}"
        assert batched.rows[i].nfe == a.rows[0].nfe


def test_nothing_committed_after_eos(make_model, tok):
    m = make_model(tok)
    probe = generate(
        m, tok, PROMPTS[0], sampler="bd3", max_new_tokens=16, order="confidence", temperature=0.0
    )
    old = tok.eos_id
    tok.eos_id = probe.tokens[0][3]
    try:
        out = generate(
            m,
            tok,
            PROMPTS[0],
            sampler="bd3",
            max_new_tokens=16,
            order="confidence",
            temperature=0.0,
            trace=True,
        )
    finally:
        tok.eos_id = old
    c = out.canvas
    e = int(c.eos_at[0])
    assert e < c.T
    commit_cols = [col for ev in c.trace for (_, col, _) in ev.get("committed", [])]
    eos_step = int(c.commit_step[0, e])
    late = [col for ev in c.trace if ev["step"] > eos_step for (_, col, _) in ev.get("committed", [])]
    assert all(col < e for col in late)
    assert max(commit_cols) <= c.G + 15
    rest = c.valid[0, e + 1 :]
    assert rest.any() and (c.tokens[0, e + 1 :][rest] == c.eos_id).all()  # EOS-filled, still visible
    assert not c.masked[0, e + 1 :].any()


def test_llada_nfe_and_schedule(make_model, tok):
    m = make_model(tok)
    out = generate(
        m,
        tok,
        PROMPTS[0],
        sampler="llada",
        max_new_tokens=32,
        block_size=8,
        steps=16,
        trace=True,
        stop_at_eos=False,
    )
    assert out.rows[0].nfe == 16
    per_step = [len(ev["committed"]) for ev in out.canvas.trace if "committed" in ev]
    assert per_step == [2] * 16  # 8 masks per block over 4 steps per block
    out = generate(
        m,
        tok,
        PROMPTS[0],
        sampler="llada",
        max_new_tokens=24,
        block_size=8,
        steps=9,
        trace=True,
        stop_at_eos=False,
    )
    per_step = [len(ev["committed"]) for ev in out.canvas.trace if "committed" in ev]
    assert out.rows[0].nfe == 9 and per_step == [3, 3, 2] * 3


@pytest.mark.parametrize("tau", [0.15, 0.3])
def test_fastdllm_threshold_rule(make_model, tok, tau):
    m = make_model(tok)
    out = generate(
        m,
        tok,
        PROMPTS,
        sampler="fastdllm",
        max_new_tokens=24,
        block_size=8,
        threshold=tau,
        cache="none",
        trace=True,
        stop_at_eos=False,
    )
    c = out.canvas
    multi = 0
    for ev in c.trace:
        by_row: dict = {}
        for r, col, _ in ev["committed"]:
            by_row.setdefault(r, []).append(float(c.conf[r, col]))
        for confs in by_row.values():
            assert len(confs) >= 1
            confs.sort(reverse=True)
            assert all(x >= tau for x in confs[1:])
            multi += len(confs) > 1
    assert multi > 0  # the rule did commit several tokens in one step somewhere
    for r, row in enumerate(out.rows):  # every forward of a row committed at least one token
        assert row.nfe == sum(any(rr == r for rr, _, _ in ev["committed"]) for ev in c.trace)


def test_dcd_without_deferral_is_fixed_block_threshold(make_model, tok):
    m = make_model(tok)
    for prompt in PROMPTS:
        a = generate(
            m,
            tok,
            prompt,
            sampler="dcd",
            max_new_tokens=24,
            window=8,
            deferral=False,
            threshold=0.6,
            cache="none",
        )
        b = generate(
            m, tok, prompt, sampler="fastdllm", max_new_tokens=24, block_size=8, threshold=0.6, cache="none"
        )
        assert a.tokens == b.tokens and a.rows[0].nfe == b.rows[0].nfe


def test_dcd_defers_low_confidence(make_model, tok):
    """With deferral the window moves past a low-confidence column instead of forcing it."""
    m = make_model(tok)
    out = generate(
        m,
        tok,
        PROMPTS[0],
        sampler="dcd",
        max_new_tokens=32,
        window=4,
        threshold=0.95,
        trace=True,
        cache="none",
        stop_at_eos=False,
    )
    c = out.canvas
    order = [col for ev in c.trace for (_, col, _) in ev.get("committed", [])]
    # some column was committed after a column more than 4 to its right (outside a fixed block of 4)
    assert any(later > col + 4 for i, col in enumerate(order) for later in order[:i])


def test_structural(make_model, tok):
    m = make_model(tok)
    kw = dict(block_size=4, order="confidence", temperature=0.0, max_new_tokens=24, stop_at_eos=False)
    draft = generate(m, tok, PROMPTS, sampler="bd3", **kw)
    same = generate(m, tok, PROMPTS, sampler="structural", stages=[], **kw)
    assert same.tokens == draft.tokens
    gamma = 0.3
    rev = generate(m, tok, PROMPTS, sampler="structural", stages=[(None, gamma)], trace=True, **kw)
    c = rev.canvas
    remasked = [ev["remasked"] for ev in c.trace if "remasked" in ev][0]
    for r in range(len(PROMPTS)):
        cols = {col for rr, col in remasked if rr == r}
        assert len(cols) == math.ceil(gamma * 24)
        for j, (a, b) in enumerate(zip(draft.tokens[r], rev.tokens[r], strict=True)):
            if c.G + j not in cols:
                assert a == b
    assert all(rv.nfe > d.nfe for rv, d in zip(rev.rows, draft.rows, strict=True))


def test_infilling_keeps_given_tokens(make_model, tok):
    m = make_model(tok)
    prompt = "To be or <|mask|><|mask|><|mask|> to be, that <|mask|><|mask|> the question"
    for sampler in ("mdlm", "llada"):
        kw = dict(steps=5) if sampler == "mdlm" else dict(block_size=5, steps=5)
        out = generate(m, tok, prompt, sampler=sampler, max_new_tokens=0 if sampler == "mdlm" else 5, **kw)
        c = out.canvas
        given = tok.encode(prompt)
        row = c.tokens[0, c.G - len(given) : c.G].tolist()
        for g, t in zip(given, row, strict=True):
            if g != tok.mask_id:
                assert g == t
            else:
                assert t != tok.mask_id
        assert not c.masked.any()
        if sampler == "mdlm":  # only the 5 blanks were decided: they are the row's tokens
            assert out.rows[0].tokens == 5 and out.rows[0].tokens_per_nfe == 1.0


def test_seeded_sampling_is_reproducible(make_model, tok):
    m = make_model(tok)
    kw = dict(sampler="bd3", max_new_tokens=16, temperature=1.0, stop_at_eos=False)
    a = generate(m, tok, PROMPTS, seed=1, **kw)
    b = generate(m, tok, PROMPTS, seed=1, **kw)
    c = generate(m, tok, PROMPTS, seed=2, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_a_character_cut_by_the_end_is_dropped_not_shown_as_a_replacement(make_model, tok):
    from blockdiff.decoding import start_decoding

    m = make_model(tok)
    ids = tok.encode("é\U0001f600")[:-2]  # é, then half of an emoji's bytes: the length limit hit
    d = start_decoding(m, tok, ["Hi"], sampler="ar", max_new_tokens=len(ids))
    c = d.c
    c.tokens[0, c.G :] = torch.tensor(ids)
    c.masked[0, c.G :] = False
    assert tok.decode(ids).endswith("\ufffd")  # the test can tell
    assert d.text(0) == "é"


def test_a_models_own_sampler_defaults_apply_and_the_callers_options_win(make_model, tok):
    from blockdiff.config import ConfigError, ModelConfig

    m = make_model(tok)
    kw = dict(sampler="bd3", max_new_tokens=16, stop_at_eos=False)
    assert generate(m, tok, "To be", seed=1, **kw).tokens != generate(m, tok, "To be", seed=2, **kw).tokens
    m.config.sampler_defaults = {"bd3": {"order": "confidence", "temperature": 0.0}}
    try:
        a, b = (generate(m, tok, "To be", seed=s, **kw) for s in (1, 2))
        assert a.tokens == b.tokens  # greedy now
        assert "bd3: this model's defaults order=confidence, temperature=0.0" in a.notes
        hot = [generate(m, tok, "To be", seed=s, temperature=1.0, **kw).tokens for s in (1, 2)]
        assert hot[0] != hot[1]  # the caller's temperature wins
        with pytest.raises(ValueError, match="order 'sideways' is not one of"):
            m.config.sampler_defaults = {"bd3": {"order": "sideways"}}
            generate(m, tok, "To be", **kw)
    finally:
        m.config.sampler_defaults = {}
    cfg = ModelConfig(sampler_defaults={"bd3": {"order": "confidence"}})
    assert ModelConfig.from_dict(cfg.to_dict()).sampler_defaults == {"bd3": {"order": "confidence"}}
    assert "sampler_defaults" not in ModelConfig().to_dict()["blockdiff"]
    with pytest.raises(ConfigError, match="sampler_defaults"):
        ModelConfig(sampler_defaults={"bd3": 3})
    cfg = ModelConfig(draft_acceptance=[0.4, 0.2, 0])  # spec's prior: rates, written when there
    assert ModelConfig.from_dict(cfg.to_dict()).draft_acceptance == [0.4, 0.2, 0]
    assert "draft_acceptance" not in ModelConfig().to_dict()["blockdiff"]
    for bad in ([1.5], [-0.1], ["0.4"], [True], 0.4):
        with pytest.raises(ConfigError, match="draft_acceptance"):
            ModelConfig(draft_acceptance=bad)
    m.config.sampler_notes = {"mdlm": "measured poor on this model"}
    try:
        assert (
            "mdlm: measured poor on this model"
            in generate(m, tok, "To", sampler="mdlm", max_new_tokens=8).notes
        )
    finally:
        m.config.sampler_notes = {}


def test_any_integer_seed_is_legal(make_model, tok):
    """OpenAI clients send 64-bit seeds; seed * 1000003 + row once overflowed torch's generator."""
    m = make_model(tok)
    a = generate(m, tok, ["To", "be"], sampler="bd3", max_new_tokens=8, temperature=1.0, seed=2**64 - 1)
    b = generate(m, tok, ["To", "be"], sampler="bd3", max_new_tokens=8, temperature=1.0, seed=2**64 - 1)
    assert a.tokens == b.tokens


def test_bad_input(make_model, tok):
    m = make_model(tok)
    with pytest.raises(ValueError, match="unknown sampler 'bd4'.*known samplers: ar, bd3"):
        generate(m, tok, "x", sampler="bd4")
    with pytest.raises(ValueError, match="threshold must be in"):
        generate(m, tok, "x", sampler="fastdllm", threshold=1.5)
    with pytest.raises(ValueError, match="larger than the canvas"):
        generate(m, tok, "x", sampler="bd3", block_size=16, max_new_tokens=8)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(m, tok, "x" * 60, sampler="bd3", max_new_tokens=8)
    for huge in (10**9, 2**63):  # refused before a canvas of that size is allocated
        with pytest.raises(ValueError, match="exceeds the model's context"):
            generate(m, tok, "x", sampler="ar", max_new_tokens=huge)
    with pytest.raises(ValueError, match="cache 'exact' needs block-causal"):
        generate(m, tok, "x", sampler="fastdllm", cache="exact", max_new_tokens=8, block_size=8)
    with pytest.raises(ValueError, match="block-causal decoding uses 'exact'"):
        generate(m, tok, "x", sampler="bd3", cache="prefix", max_new_tokens=8)


@pytest.mark.parametrize(
    "sampler, kw, message",
    [
        ("bd3", {"score": "prob"}, "sets its own scoring, so it does not take score; choose it with order"),
        ("mdlm", {"score": "prob"}, "sets its own scoring"),
        ("llada", {"score": "margin"}, "choose it with remasking"),
        ("structural", {"revise_by": "snapshop"}, "revise_by 'snapshop' is not one of snapshot, random"),
        (
            "bd3",
            {"order": "randm"},
            "order 'randm' is not one of random, confidence (did you mean 'random'?)",
        ),
        ("bd3", {"alg": "confidenc"}, "order 'confidenc' is not one of"),
        ("bd3", {"remasking": "random"}, "does not take remasking"),
        ("llada", {"remasking": "lowest"}, "remasking 'lowest' is not one of low_confidence, random"),
        ("fastdllm", {"cache": "duel"}, "cache 'duel' is not one of"),
        ("fastdllm", {"block_size": 0}, "block_size must be an integer >= 1"),
        ("bd3", {"block_size": -4}, "block_size must be an integer >= 1"),
        ("bd3", {"steps": -1}, "steps must be an integer >= 1"),
        ("bd3", {"steps": 0}, "steps must be an integer >= 1"),
        ("bd3", {"top_k": -1}, "top_k must be an integer >= 1"),
        ("bd3", {"temperature": -1}, "temperature must be in [0.0, 100.0]"),
        ("bd3", {"top_p": 1.5}, "top_p must be in (0.0, 1.0]"),
        ("ar", {"temperature": float("nan")}, "temperature must be a finite number"),
        ("fastdllm", {"threshold": float("inf")}, "threshold must be a finite number"),
        ("bd3", {"block_size": 4, "block_length": 4}, "given twice"),
        ("dcd", {"windw": 4}, "does not take windw (did you mean 'window'?)"),
    ],
)
def test_bad_option_values_are_errors(make_model, tok, sampler, kw, message):
    """A wrong option value is a clear error, never a different algorithm or a silent drop."""
    m = make_model(tok)
    with pytest.raises(ValueError) as e:
        generate(m, tok, "x", sampler=sampler, max_new_tokens=8, **kw)
    assert message in str(e.value)


def test_score_is_taken_where_it_means_something(make_model, tok):
    """The margin p1 - p2 never exceeds p1, so under one threshold it commits no more tokens per
    forward than the probability does: never fewer NFEs, and on this prompt strictly more. AR
    commits its one token whatever the score says."""
    m = make_model(tok)
    kw = dict(max_new_tokens=16, stop_at_eos=False, threshold=0.2)
    for sampler in ("fastdllm", "dcd"):
        prob = generate(m, tok, PROMPTS[0], sampler=sampler, score="prob", **kw).rows[0].nfe
        margin = generate(m, tok, PROMPTS[0], sampler=sampler, score="margin", **kw).rows[0].nfe
        assert margin > prob, (sampler, margin, prob)
    ar = [
        generate(m, tok, PROMPTS[0], sampler="ar", max_new_tokens=8, score=s).tokens
        for s in ("prob", "margin")
    ]
    assert ar[0] == ar[1]


def test_dcd_block_expansion(make_model, tok):
    """A low-confidence window cut by the block edge grows the block (by 4, at most +16) instead
    of committing; the wasted forwards are counted as NFEs."""
    m = make_model(tok)
    kw = dict(sampler="dcd", block_size=8, window=4, threshold=0.95, max_new_tokens=32, stop_at_eos=False)
    grown = generate(m, tok, PROMPTS[0], expand_below=0.99, trace=True, **kw)
    plain = generate(m, tok, PROMPTS[0], expand=False, **kw)
    c = grown.canvas
    gen_blocks = c.blk[0, c.G : c.G + 32]
    sizes = torch.bincount(gen_blocks - gen_blocks.min())
    assert sizes.max() > 8 and sizes.max() <= 8 + 16 and (sizes[:-1] - 8).remainder(4).eq(0).all()
    steps_with_commits = sum(1 for ev in c.trace if ev.get("committed"))
    assert grown.rows[0].nfe > steps_with_commits  # expansion forwards commit nothing
    assert plain.canvas.blk[0, c.G : c.G + 32].bincount().max() == 8


def test_top_k_top_p_filters():
    from blockdiff.decoding.policies import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, 2, None)) == [True, True, False, False]
    assert keep(filter_logits(logits, None, 0.7)) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert keep(filter_logits(logits, None, 0.45)) == [True, False, False, False]
    perm = torch.tensor([2, 0, 3, 1])  # order of the vocabulary does not matter
    assert keep(filter_logits(logits[:, perm], None, 0.7)) == [False, True, False, True]


@pytest.mark.parametrize("cache", ["none", "exact"])
def test_context_causal_decoding_matches_training_layout(tok, cache):
    """An NBDiff (context-causal, shifted) model must see at decoding time what it saw in
    training: a causal clean context, the current block bidirectional over itself. Oracle: the
    runner's logits for a half-decoded block equal the vectorised training forward's."""
    from blockdiff.config import ModelConfig
    from blockdiff.decoding.canvas import Canvas
    from blockdiff.model import BlockDiffLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logits="shifted", layout="context_causal",
        block_size=4, block_sizes=[4], mask_token_id=tok.mask_id, eos_token_id=tok.eos_id,
    )  # fmt: skip
    model = BlockDiffLM(cfg).eval()
    c = Canvas.build([tok.encode("To be, or")], 8, tok.mask_id, tok.eos_id, tok.pad_id, 4)
    c.set_grid(4)
    G = c.G
    fill = torch.tensor(tok.encode("not to b"))
    c.commit(torch.zeros(5, dtype=torch.long), torch.arange(G, G + 5), fill[:5], torch.ones(5))
    run = runner_mod.Runner(model, c, block_causal=True, cache=cache)
    with torch.no_grad():
        got = run.logits(G + 4, G + 8, frontier=G + 4, end=G + 8)
        x0 = c.tokens.clone()
        x0[0, G + 5 :] = fill[5:]
        xt = c.tokens.clone()
        L = c.T
        pos = torch.arange(L)
        vec = masks.vectorised(L, 4, 1, layout="context_causal", offsets=torch.tensor([G]))
        raw = model(torch.cat([xt, x0], 1), positions=torch.cat([pos, pos])[None], mask=vec)
    noisy, clean = raw[:, :L], raw[:, L:]
    want = torch.cat([clean[:, G + 3 : G + 4], noisy[:, G + 4 : G + 7]], 1)
    want = token_logits(want, cfg.__class__(**{**cfg.__dict__, "logits": "aligned"}))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # and the clean context really is causal: block-causal attention would differ
    run2 = runner_mod.Runner(model, c, block_causal=True, cache=cache)
    model.config.layout = "block_causal"
    with torch.no_grad():
        other = run2.logits(G + 4, G + 8, frontier=G + 4, end=G + 8)
    model.config.layout = "context_causal"
    assert not torch.allclose(other, want, atol=1e-3)


def test_dcd_global_prefix_cache_stores_the_prefix(make_model, tok, monkeypatch):
    """DCD over the whole canvas with the prefix cache: a refresh stores the columns before the
    window's left edge, and the forwards after it feed only what follows."""
    m = make_model(tok)  # mix-scale with the global block
    fed = []
    orig = runner_mod.Runner._forward

    def spy(self, lo, hi, write, out_from=None, clean_before=0):
        fed.append((lo, hi, write))
        return orig(self, lo, hi, write, out_from, clean_before)

    monkeypatch.setattr(runner_mod.Runner, "_forward", spy)
    out = generate(m, tok, ["Shall I"], sampler="dcd", max_new_tokens=40, refresh_every=8)
    G = out.canvas.G
    refreshes = [f for f in fed if f[0] == 0 and f[2] > 0]
    assert refreshes and all(w >= G for _, _, w in refreshes)  # the prompt at least is stored
    later = [f for f in fed if f[0] > 0]
    assert later and all(lo >= G for lo, _, _ in later)  # steps feed from the cached edge on
    assert max(w for _, _, w in refreshes) > G  # refreshes move with the decoded prefix
