"""Self-speculative decoding, chains and token trees: greedy = greedy AR token for token, batched =
unbatched, every fed token's AR logits and the cache after rejections = recomputation, sampled
output distributed as AR's (and a wrong acceptance rule caught), >= 1 token per forward, clear
errors for models without an AR path."""

import re

import pytest
import torch

from blockdiff.config import ModelConfig
from blockdiff.decoding import generate, speculative
from blockdiff.decoding.canvas import Canvas
from blockdiff.decoding.engine import _decode
from blockdiff.decoding.runner import Runner
from blockdiff.decoding.samplers import PLANS
from blockdiff.model import BlockDiffLM
from blockdiff.train import Trainer
from tests.conftest import tiny_recipe

PROMPTS = ["Shall I compare", "To be, or not", "The king is", "O", "Rough winds do shake the dar"]


@pytest.fixture(scope="module")
def nbdiff(corpus_dir, tmp_path_factory):
    """A tiny NBDiff model: shifted logits, context-causal layout, AR loss, blocks of 4."""
    r = tiny_recipe(corpus_dir, "shifted", (4,), steps=120)
    r.model["layout"] = "context_causal"
    r.objective.ar_weight = 0.5
    out = tmp_path_factory.mktemp("nbdiff")
    torch.manual_seed(0)
    Trainer(r, out).run()
    from blockdiff.models import load_model

    return load_model(out)


def test_tree_layout_by_hand():
    """Depths and what each token may attend to, for a chain and for the tree spec feeds with two
    drafts and two other candidates for the first (parents -1, 0, 1, 0); bad parents refused."""
    from blockdiff.decoding.runner import tree

    depth, follows = tree(None, 3)
    assert depth.tolist() == [0, 1, 2] and follows.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert speculative.parents(2, 2) == [-1, 0, 1, 0]
    depth, follows = tree([-1, 0, 1, 0], 4)
    assert depth.tolist() == [0, 1, 2, 1]
    assert follows.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    for bad in ([-1, 1, 0], [0, 0], [-1, -1]):
        with pytest.raises(ValueError, match="not a tree"):
            tree(bad, len(bad))


def _moves(monkeypatch) -> list[int]:
    """Counts the cache moves of accepted tree candidates (the test has power where > 0)."""
    from blockdiff.model import KVCache

    seen, orig = [], KVCache.move
    monkeypatch.setattr(KVCache, "move", lambda self, *a: seen.append(1) or orig(self, *a))
    return seen


@pytest.mark.parametrize("draft,width", [(1, 1), (2, 1), (3, 1), (5, 1), (1, 3), (3, 2), (3, 4)])
def test_greedy_spec_equals_greedy_ar(nbdiff, monkeypatch, draft, width):
    model, tok = nbdiff
    moves = _moves(monkeypatch)
    kw = {
        "sampler": "spec",
        "max_new_tokens": 24,
        "draft_len": draft,
        "draft_width": width,
        "stop_at_eos": False,
    }
    ar = generate(model, tok, PROMPTS, sampler="ar", max_new_tokens=24, stop_at_eos=False)
    sp = generate(model, tok, PROMPTS, **kw)
    assert sp.tokens == ar.tokens
    for i, p in enumerate(PROMPTS[:2]):  # batched = unbatched
        one = generate(model, tok, [p], **kw)
        assert one.tokens[0] == sp.tokens[i]
    assert all(r.nfe <= r.tokens for r in sp.rows)  # at least one token per forward
    if draft == 3:
        assert sum(r.nfe for r in sp.rows) < sum(r.nfe for r in ar.rows)  # it does speculate
    assert bool(moves) == (width > 1)  # trees: some first token was another candidate


def test_greedy_spec_with_eos_matches_ar(nbdiff):
    model, tok = nbdiff
    ar = generate(model, tok, PROMPTS, sampler="ar", max_new_tokens=32)
    sp = generate(model, tok, PROMPTS, sampler="spec", max_new_tokens=32)
    assert sp.texts == ar.texts


@pytest.mark.parametrize("width", [1, 3])
def test_cache_after_rejections_equals_recomputation(nbdiff, monkeypatch, width):
    """At every verifying forward, each fed token's AR logits equal a from-scratch forward over
    the committed prefix and the tokens it follows in the tree: the cache after rejected drafts
    and moved candidates, the tree's mask and its positions are right."""
    model, tok = nbdiff
    moves = _moves(monkeypatch)
    seen = {"steps": 0}
    orig = Runner.speculate

    def checked(self, n, clean, attach, B, parent=None):
        ar, dr = orig(self, n, clean, attach, B, parent)
        if len(attach) > 1:  # a verifying forward
            parent = parent or list(range(-1, clean.shape[1] - 1))
            for r in range(self.c.batch):
                pad = int(-self.c.pos[r, 0])
                for i in range(clean.shape[1]):
                    branch, j = [], i
                    while j > 0:
                        branch, j = [int(clean[r, j])] + branch, parent[j]
                    ids = torch.cat(
                        [self.c.tokens[r, pad : int(n[r]) + 1], torch.tensor(branch, dtype=torch.long)]
                    )
                    L = len(ids)
                    want = model(ids[None], mask=torch.ones(1, 1, L, L).tril().bool())[0, -1]
                    want[self.c.mask_id] = float("-inf")
                    assert torch.allclose(ar[r, i], want, atol=1e-4), (r, i)
            seen["steps"] += 1
        return ar, dr

    monkeypatch.setattr(Runner, "speculate", checked)
    kw = {"max_new_tokens": 30, "stop_at_eos": False, "draft_len": 3, "draft_width": width}
    out = generate(model, tok, PROMPTS[:3], sampler="spec", **kw)
    assert seen["steps"] > 3
    assert any(r.tokens < 4 * r.nfe for r in out.rows)  # some drafts were rejected on the way
    assert bool(moves) == (width > 1)


def _tiny_vocab_model():
    torch.manual_seed(3)
    cfg = ModelConfig(
        vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, logits="shifted", layout="context_causal", block_size=4, block_sizes=[4],
        ar_weight=0.5, mask_token_id=5, eos_token_id=4, pad_token_id=4, tie_word_embeddings=False,
    )  # fmt: skip
    model = BlockDiffLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(30.0 if p.ndim == 2 else 1.0)  # peaky, context-dependent distributions
    return model


class PairRule:
    """A constraint policy over the 6-token vocabulary: two tokens in 0..3 whose sum is odd."""

    def cursor(self, c, r, col):
        cur = _PairCursor(0)
        for k in range(int(c.start[r]), min(col, c.T)):  # the committed prefix
            cur.feed(int(c.tokens[r, k]))
        return cur

    def mask(self, c, r, cols, logits):  # the AR sampler's one-column steps
        return torch.stack([self.cursor(c, r, k).mask(logits[j]) for j, k in enumerate(cols.tolist())])

    def admit(self, c, r, cols, toks, conf):
        return torch.arange(len(cols))


class _PairCursor:
    def __init__(self, at):
        self.at, self.first = at, None

    def mask(self, logits):
        ok = torch.zeros(len(logits), dtype=torch.bool)
        if self.at == 0:
            ok[:4] = True
        elif self.at == 1:
            ok[[v for v in range(4) if (v + self.first) % 2]] = True
        else:
            return logits
        return logits.masked_fill(~ok, float("-inf"))

    def feed(self, tok):
        if self.at == 0:
            self.first = tok
        self.at += 1


def _first_two(model, sampler, n, seed0, constraint=None, **kw):
    c = Canvas.build([[1, 2, 3]] * n, 2, 5, 4, 4, 1)
    c.set_grid(1)
    c.stop_at_eos = False
    plan = PLANS[sampler](model, 2, [], temperature=1.0, **kw)
    plan.constraint = constraint
    gens = [torch.Generator().manual_seed(seed0 + r) for r in range(n)]
    with torch.no_grad():
        _decode(model, c, plan, gens, None)
    pairs = c.tokens[:, c.G] * 6 + c.tokens[:, c.G + 1]
    return torch.bincount(pairs, minlength=36).double()


def _chi2(a, b):
    keep = (a + b) > 0
    return float((((a - b) ** 2) / (a + b))[keep].sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("width", [1, 3])
def test_sampled_spec_is_distributed_as_ar(monkeypatch, width):
    """The second token (the first one verified: draft 1, or in a tree the other candidates
    after it, tried against the residual) is distributed as AR's, jointly with the first."""
    model = _tiny_vocab_model()
    n = 4000
    moves = _moves(monkeypatch)
    ar = _first_two(model, "ar", n, 0)
    sp = _first_two(model, "spec", n, 10**6, draft_width=width)
    stat, df = _chi2(ar, sp)
    assert df >= 8  # the test has power: many joint outcomes occur
    assert stat < df + 4 * (2 * df) ** 0.5, (stat, df)  # ~ 4 sigma of a chi-square with df
    assert (len(moves) > n // 20) == (width > 1)  # other candidates were often accepted
    monkeypatch.setattr(speculative, "accept", lambda u, p, q: True)  # the wrong rule: always accept
    bad = _first_two(model, "spec", n, 10**6, draft_width=width)
    stat_bad, df = _chi2(ar, bad)
    assert stat_bad > df + 4 * (2 * df) ** 0.5, (stat_bad, df)


def test_constrained_sampled_spec_is_distributed_as_constrained_ar():
    """Under a constraint the drafts are proposed from the masked drafter and verified against
    the masked AR path: the pairs are still distributed as constrained AR's (and all valid)."""
    model = _tiny_vocab_model()
    n = 4000
    ar = _first_two(model, "ar", n, 0, PairRule())
    sp = _first_two(model, "spec", n, 10**6, PairRule())
    a, b = torch.arange(36) // 6, torch.arange(36) % 6
    valid = (a < 4) & (b < 4) & ((a + b) % 2 == 1)
    assert ar[~valid].sum() == 0 and sp[~valid].sum() == 0
    stat, df = _chi2(ar, sp)
    assert df >= 5
    assert stat < df + 4 * (2 * df) ** 0.5, (stat, df)


def test_constrained_greedy_spec_equals_constrained_greedy_ar(nbdiff, monkeypatch):
    """Greedy under a regex: spec = ar token for token (every draft length), and both equal the
    decode with the brute-force enumeration in the constraint's place."""
    from blockdiff.decoding.constraint import Constrain
    from tests.test_constraint import Brute

    model, tok = nbdiff
    pattern, n = r"(the|a) (king|sea)( is)?\.", 14
    ar = generate(model, tok, PROMPTS, sampler="ar", max_new_tokens=n, regex=pattern)
    assert all(re.fullmatch(pattern, t) for t in ar.texts), ar.texts
    for draft in (1, 3):
        sp = generate(model, tok, PROMPTS, sampler="spec", max_new_tokens=n, draft_len=draft, regex=pattern)
        assert sp.tokens == ar.tokens
    kw = {"sampler": "spec", "max_new_tokens": n, "draft_len": 3, "draft_width": 3, "regex": pattern}
    sp = generate(model, tok, PROMPTS, **kw)  # a tree asked for under a constraint: a chain, told
    assert sp.tokens == ar.tokens and any("drafts are a chain" in x for x in sp.notes)
    pattern, n = r"(ab|ba)+c?", 6
    kw = {"sampler": "spec", "max_new_tokens": n, "regex": pattern, "temperature": 1.0, "draft_len": 3}
    real = generate(model, tok, PROMPTS, **kw)
    monkeypatch.setattr(Constrain, "bind", lambda self, t: Brute(pattern, "abc", t, n))
    brute = generate(model, tok, PROMPTS, **kw)
    assert real.tokens == brute.tokens


def best(*counts):
    return speculative.best_shape(speculative.rates(*counts))


def test_best_draft_length_by_hand():
    """Tokens per forward cost, hand-computed: with a forward of n tokens costing 1 + 0.1 (n - 1),
    k drafts feed (k + 1)(k + 2) tokens (blocks of k + 1): 1.5, 2.1, 2.9 for k = 1, 2, 3."""
    cost = lambda n: 1 + 0.1 * (n - 1)  # noqa: E731
    many = 10**6
    # every draft accepted: 2/1.5 = 1.33, 3/2.1 = 1.43, 4/2.9 = 1.38 -> k = 2
    assert best([many] * 3, [many] * 3, [0], 0, 3, 1, cost) == (2, 1)
    # half accepted: 1.5/1.5, 1.75/2.1, 1.875/2.9, none > 1 -> plain AR
    assert best([many] * 3, [2 * many] * 3, [0], 0, 3, 1, cost) == (0, 1)
    # first always, second never: 2/1.5 > 2/2.1 -> k = 1
    assert best([many, 0, 0], [many, many, 0], [0], 0, 3, 1, cost) == (1, 1)
    # a flat cost: any acceptance pays -> the longest
    assert best([1, 1, 1], [4, 4, 4], [0], 0, 3, 1, lambda n: 1.0) == (3, 1)
    # Laplace smoothing: nothing tried yet counts as 1/2
    assert best([0] * 3, [0] * 3, [0], 0, 3, 1, lambda n: 1.0) == (3, 1)


def test_best_tree_width_by_hand():
    """One draft (blocks of 2: (1 + w) 3 tokens a forward), a forward of n tokens costing
    1 + 0.05 (n - 1): 1.25, 1.4, 1.55 for w = 1, 2, 3. Draft 1 accepted 40 of 98 (Laplace: 0.41);
    the first token the drafter's 2nd choice in 30 of 98 forwards, its 3rd in 2 (of 98 + 2):
    1.41/1.25 = 1.13, 1.71/1.4 = 1.22, 1.73/1.55 = 1.12 -> w = 2; with the 2nd choice in 5 only
    1.46/1.4 = 1.04 -> the chain."""
    cost = lambda n: 1 + 0.05 * (n - 1)  # noqa: E731
    assert best([40], [98], [40, 30, 2], 98, 1, 3, cost) == (1, 2)
    assert best([40], [98], [40, 5, 5], 98, 1, 3, cost) == (1, 1)
    assert best([40], [98], [40, 30, 2], 98, 1, 1, cost) == (1, 1)  # width 1 only
    assert best([0], [98], [0, 0, 0], 98, 1, 3, cost) == (0, 1)  # nothing pays: AR


@pytest.mark.parametrize("slope", [0.0, 0.1, 0.2, 1.0])
def test_adaptive_spec_equals_ar_whatever_it_chooses(nbdiff, monkeypatch, slope):
    """Without --draft-len, spec picks its draft length from the runtime's cost table and the
    acceptance it measures; greedy output stays greedy AR's whatever it picks. A forward of n
    tokens costing 1 + slope (n - 1), blocks of k + 1 (k drafts: (k + 1)(k + 2) tokens, 6, 12,
    20): flat, it keeps drafting; at 0.1 one draft (1.5) pays only if it is accepted more than
    half the time — the probe's 4 forwards all accepted would show it (5/6, Laplace), so it
    probes, and stops as soon as even its remaining drafts all accepted could not pay; at 0.2
    (one draft: 2.0) not even that could, nor at 1: it never drafts."""
    from blockdiff.decoding import samplers

    model, tok = nbdiff
    monkeypatch.setattr(samplers, "forward_cost", lambda *a: lambda n: 1 + slope * (n - 1))
    ar = generate(model, tok, PROMPTS, sampler="ar", max_new_tokens=30, stop_at_eos=False)
    sp = generate(model, tok, PROMPTS, sampler="spec", max_new_tokens=30, stop_at_eos=False)
    assert sp.tokens == ar.tokens
    forwards = []  # spec's own forwards; once drafting ends, one row is the engine's AR step's
    orig = Runner.speculate
    monkeypatch.setattr(Runner, "speculate", lambda self, *a: forwards.append(1) or orig(self, *a))
    for i, p in enumerate(PROMPTS[:3]):
        forwards.clear()
        one = generate(model, tok, [p], sampler="spec", max_new_tokens=30, stop_at_eos=False)
        assert one.tokens[0] == ar.tokens[i]
        assert one.rows[0].tokens == 30 and one.rows[0].nfe <= 30
        if slope >= 0.2:  # never drafts: the AR step from the start
            assert not forwards
        elif slope == 0.1:  # the prefill and at most 4 probing forwards, then the AR step
            assert 1 <= len(forwards) <= 5 and one.rows[0].nfe > len(forwards)
    per_forward = sum(r.tokens for r in sp.rows) / sum(r.nfe for r in sp.rows)
    said = " ".join(sp.notes)
    if slope == 0:
        assert per_forward > 1.2 and "-> 0" not in said  # the widest tree, or its draft length
    elif slope == 0.1:
        assert re.search(r"draft length 3 -> 0 after [1-4] forwards?", said), sp.notes
        assert 1.0 <= per_forward < 1.2
    else:
        assert "no draft length pays" in said and per_forward == 1.0


def test_spec_equals_ar_whatever_shapes_it_switches_between(nbdiff, monkeypatch):
    """Shapes changing from forward to forward (longer chains than the last forward's blocks
    drafted, trees, back to chains): greedy output is AR's, batched as alone, and the shapes were
    all fed."""
    import itertools

    from blockdiff.decoding import samplers

    model, tok = nbdiff
    monkeypatch.setattr(samplers, "forward_cost", lambda *a: lambda n: 1.0)
    shapes = itertools.cycle([(1, 1), (3, 3), (2, 1), (3, 1), (1, 4), (2, 2)])

    def rates(*a):  # the next shape in the cycle promises clearly more than any other
        r = {(0, 1): 1.0, **{(k, w): 1.5 for k in range(1, 4) for w in range(1, 5)}}
        r[next(shapes)] = 2.0
        return r

    monkeypatch.setattr(speculative, "rates", rates)
    fed = set()
    orig = Runner.speculate

    def spy(self, n, clean, attach, B, parent=None):
        fed.add((clean.shape[1], B))
        return orig(self, n, clean, attach, B, parent)

    monkeypatch.setattr(Runner, "speculate", spy)
    ar = generate(model, tok, PROMPTS, sampler="ar", max_new_tokens=30, stop_at_eos=False)
    sp = generate(model, tok, PROMPTS, sampler="spec", max_new_tokens=30, stop_at_eos=False)
    assert sp.tokens == ar.tokens
    one = generate(model, tok, PROMPTS[:1], sampler="spec", max_new_tokens=30, stop_at_eos=False)
    assert one.tokens[0] == ar.tokens[0]
    # (clean tokens, block) fed: one draft, blocks of 2; two drafts (all the blocks of 3 made) while
    # blocks of 4 draft three; a tree of 4 candidates for draft 1, blocks of 2
    assert {(2, 2), (3, 4), (5, 2)} <= fed, sorted(fed)


@pytest.mark.parametrize("better", [1.01, 1.1])
def test_spec_keeps_its_shape_unless_another_clearly_pays_more(nbdiff, monkeypatch, better):
    """After the probe (three drafts, a chain), a tree of one draft and width 2 promising 1 %
    more does not replace it (near-even shapes would alternate forward after forward); 10 % more
    does."""
    from blockdiff.decoding import samplers

    model, tok = nbdiff
    monkeypatch.setattr(samplers, "forward_cost", lambda *a: lambda n: 1.0)
    monkeypatch.setattr(speculative, "rates", lambda *a: {(0, 1): 1.0, (3, 1): 1.5, (1, 2): 1.5 * better})
    fed = []
    orig = Runner.speculate
    monkeypatch.setattr(Runner, "speculate", lambda self, *a: fed.append(a[1].shape[1]) or orig(self, *a))
    out = generate(model, tok, PROMPTS[:1], sampler="spec", max_new_tokens=30, stop_at_eos=False)
    assert (3 in fed) == (better > 1.03)  # the tree: the pending token, draft 1, one other candidate
    assert bool(out.notes) == (better > 1.03)


@pytest.mark.parametrize("prior", [(0.3, 0.2, 0.1), (0.5, 0.5, 0.5), (0.9, 0.9, 0.9)])
def test_spec_starts_from_the_models_measured_acceptance(nbdiff, monkeypatch, prior):
    """A model's config may carry its drafts' measured acceptance: counted as 8 tries per position
    from the start. At a cost of 1 + 0.1 (n - 1) per forward the probe's drafts all accepted would
    pay, so without a prior spec probes (above). With one, spec starts from it alone: at
    0.3/0.2/0.1, and at 0.5 (one draft: 1.5 tokens for 1.5; the probe's drafts, all accepted,
    would lift it to paying: one row adds 4 tries per position, a batch of 3 adds 12), no draft
    length pays and spec is plain AR from the start, without one drafting forward; at 0.9
    (1.82 for 1.5) it drafts from the start, in the prior's best shape: one draft (1.82/1.5 =
    1.21 against two: 2.49/2.1 = 1.19, three: 1.05), so its blocks have 2 tokens from the
    prefill on, not k_max + 1 = 4. Greedy output is AR's."""
    from blockdiff.decoding import samplers

    model, tok = nbdiff
    monkeypatch.setattr(samplers, "forward_cost", lambda *a: lambda n: 1 + 0.1 * (n - 1))
    monkeypatch.setattr(model.config, "draft_acceptance", list(prior))
    forwards = []
    orig = Runner.speculate
    monkeypatch.setattr(Runner, "speculate", lambda self, *a: forwards.append(a[3]) or orig(self, *a))
    for p in PROMPTS[:2]:
        forwards.clear()
        ar = generate(model, tok, [p], sampler="ar", max_new_tokens=30, stop_at_eos=False)
        sp = generate(model, tok, [p], sampler="spec", max_new_tokens=30, stop_at_eos=False)
        assert sp.tokens == ar.tokens
        if prior[0] < 0.85:
            assert not forwards and "measured" in " ".join(sp.notes), sp.notes
            generate(model, tok, [p], sampler="spec", max_new_tokens=30, temperature=0.8, seed=1)
            assert forwards  # sampling: the greedy prior does not apply, it probes
        else:
            assert len(forwards) > 1 and forwards[0] == 2  # the prefill's block: one draft
    forwards.clear()  # a batch too: before its first forward its rows share their columns
    ar = generate(model, tok, PROMPTS, sampler="ar", max_new_tokens=30, stop_at_eos=False)
    sp = generate(model, tok, PROMPTS, sampler="spec", max_new_tokens=30, stop_at_eos=False)
    assert sp.tokens == ar.tokens and (not forwards) == (prior[0] < 0.85)


def test_spec_refuses_models_without_an_ar_path(make_model, tok, nbdiff):
    aligned = make_model(tok, "aligned", (4, 8, "L"))
    with pytest.raises(ValueError, match="aligned logits"):
        generate(aligned, tok, "To be", sampler="spec", max_new_tokens=8)
    ar_only = make_model(tok, "shifted", (1,))
    with pytest.raises(ValueError, match="layout|never trained"):
        generate(ar_only, tok, "To be", sampler="spec", max_new_tokens=8)
    model, _ = nbdiff
    for bad in (0, -2, 64):  # 64 drafts would feed 4225 tokens per forward
        with pytest.raises(ValueError, match="draft_len must be"):
            generate(model, tok, "To be", sampler="spec", max_new_tokens=8, draft_len=bad)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="draft_width must be"):
            generate(model, tok, "To be", sampler="spec", max_new_tokens=8, draft_width=bad)
    with pytest.raises(ValueError, match="draft_width 6 exceeds the vocabulary"):
        PLANS["spec"](_tiny_vocab_model(), 2, [], draft_width=6)  # 6 tokens, one of them the mask
    with pytest.raises(ValueError, match="blanks"):
        generate(model, tok, "To <|mask|> be", sampler="spec", max_new_tokens=8)
